"""`python -m qlora.train [+recipe=NAME] [key=value ...]`: train a QLoRA adapter.

With no recipe, the tiny CPU recipe runs. Any key of qlora/config.py can be overridden, e.g.
`python -m qlora.train +recipe=llama7b data.path=my.jsonl training.lr=1e-4`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from qlora.config import configs_dir, register_configs, to_train_config, validate, with_default_recipe
from qlora.errors import QLoRAError

def train(cfg: DictConfig) -> None:
    try:
        config = to_train_config(cfg)
        validate(config)
        from qlora.pipeline import run_training  # heavy imports only after the config is known good

        run_training(config)
    except QLoRAError as error:
        print(f"qlora: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


def main() -> None:
    register_configs()
    sys.argv[1:] = with_default_recipe(sys.argv[1:])
    hydra.main(config_path=str(configs_dir()), config_name="train", version_base="1.3")(train)()


if __name__ == "__main__":
    main()
