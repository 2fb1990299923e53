"""Compose a training config as `python -m qlora.train OVERRIDES` does: Hydra's composition, then validation.

Apart from qlora.config so that the schema does not import its own validation (which imports the schema).
"""

from __future__ import annotations

from qlora.config import TrainConfig, configs_dir, register_configs, typed_config, with_default_recipe
from qlora.overrides import checked_overrides
from qlora.validation import validate


def compose_config(overrides: list[str]) -> TrainConfig:
    """Compose and validate a config exactly as `python -m qlora.train OVERRIDES` does."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=with_default_recipe(checked_overrides("train", overrides, recipes=True)))
    config = typed_config(cfg)
    validate(config)
    return config
