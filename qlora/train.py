"""`python -m qlora.train [+recipe=NAME] [key=value ...]`: train a QLoRA adapter.

With no recipe, the tiny CPU recipe runs. Any key of qlora/config.py can be overridden, e.g.
`python -m qlora.train +recipe=llama7b data.path=my.jsonl training.lr=1e-4`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from qlora.cli import run_hydra_command
from qlora.config import typed_config
from qlora.validation import validate


def train(cfg: DictConfig) -> None:
    config = typed_config(cfg)
    validate(config)
    from qlora.pipeline import run_training  # heavy imports only after the config is known good

    run_training(config)


def main() -> None:
    run_hydra_command("train", train)


if __name__ == "__main__":
    main()
