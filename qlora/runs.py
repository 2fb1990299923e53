"""Find what a finished training run left: its config, its adapter and the base model it adapts.

Shared by the commands that come after training (merge, generate, evaluate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from qlora.config import ModelConfig, TrainConfig
from qlora.errors import QLoRAError


def load_run_config(run: str) -> TrainConfig:
    """The resolved config a run folder was trained with (its config.yaml)."""
    path = Path(run).expanduser() / "config.yaml"
    if not path.is_file():
        raise QLoRAError(f"run={run} is not a training run folder (it has no config.yaml).")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))


def find_adapter(run: Optional[str], adapter: Optional[str], base: Optional[str]) -> tuple[Path, ModelConfig]:
    """The adapter folder and its base model, from run=, adapter= and base= as the user gave them."""
    if run is None and adapter is None:
        raise QLoRAError("no adapter given: pass run=outputs/<run> (a training run folder) or adapter=PATH.")
    adapter_dir = Path(adapter or Path(run) / "adapter").expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QLoRAError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): check run= or adapter=.")
    if base is not None:
        return adapter_dir, ModelConfig(name_or_path=base)
    if run is not None:
        return adapter_dir, load_run_config(run).model
    saved_base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return adapter_dir, ModelConfig(name_or_path=saved_base)
