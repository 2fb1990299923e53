"""Find what a finished training run left: its config, its adapter and the base model it adapts.

Shared by the commands that come after training (merge, generate, evaluate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from accelerate import PartialState
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora.config import ModelConfig, QuantizationConfig, TrainConfig
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


def load_adapted_model(
    run: Optional[str], adapter: Optional[str], base: Optional[str]
) -> tuple[PeftModel, PreTrainedTokenizerBase, Optional[TrainConfig]]:
    """The base model quantized as in training (nf4 defaults without a run) with the adapter on top,
    the tokenizer training saved with the adapter, and the run's config if there is a run."""
    from qlora.stages.artifacts import adapter_tensor_names
    from qlora.stages.model import load_quantized_model

    adapter_dir, base_model = find_adapter(run, adapter, base)
    if not adapter_tensor_names(Path(adapter_dir)):  # peft would only warn, and answer as the untrained base
        raise QLoRAError(f"the adapter in {adapter_dir} holds no LoRA weights (adapter_model.safetensors is missing "
                         f"or empty): train it again, or point to another adapter.")
    run_config = load_run_config(run) if run else None
    quantization = run_config.quantization if run_config else QuantizationConfig()
    device = PartialState().device  # this process's GPU, or the CPU, as in training
    model = PeftModel.from_pretrained(load_quantized_model(base_model, quantization, device), adapter_dir).eval()
    return model, AutoTokenizer.from_pretrained(adapter_dir), run_config
