"""What every `python -m qlora.X key=value ...` command shares: Hydra composition over the schema,
and user errors printed as one paragraph (exit code 2; 128 + N after signal N) instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

from qlora.config import configs_dir, register_configs
from qlora.errors import QLoRAError


def run_hydra_command(config_name: str, command: Callable[[DictConfig], None]) -> None:
    """Compose configs/<config_name>.yaml with the command line and run `command` on it."""
    register_configs()

    def guarded(cfg: DictConfig) -> None:
        try:
            command(cfg)
        except QLoRAError as error:
            print(f"qlora: error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)

    hydra.main(config_path=str(configs_dir()), config_name=config_name, version_base="1.3")(guarded)()
