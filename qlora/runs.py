"""Find what a finished training run left: its config, its adapter and the base model it adapts.

Shared by the commands that come after training (merge, generate, evaluate).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from accelerate import PartialState
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora.config import ModelConfig, QuantizationConfig, TrainConfig
from qlora.errors import QLoRAError
from qlora.stages.model import load_quantized_model, warn_about_remote_code

log = logging.getLogger("qlora")


def load_run_config(run: str) -> TrainConfig:
    """The resolved config a run folder was trained with (its config.yaml)."""
    path = Path(run).expanduser() / "config.yaml"
    if not path.is_file():
        raise QLoRAError(f"run={run} is not a training run folder (it has no config.yaml).")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))


def find_adapter(run: Optional[str], adapter: Optional[str], base: Optional[str], *,
                 trust_remote_code: bool) -> tuple[Path, ModelConfig]:
    """The adapter folder and its base model, from run=, adapter=, base= and trust_remote_code= as the user gave them.

    The base model runs code shipped with it only when this command's own trust_remote_code=true says so: a run
    folder's config.yaml may have been written by someone else, so its model.trust_remote_code is never honoured.
    """
    adapter_dir = checked_adapter_dir(run, adapter)
    base_model = _base_model(run, adapter_dir, base)
    if base_model.trust_remote_code and not trust_remote_code:
        log.warning("%s sets model.trust_remote_code=true; ignored: remote code runs only when this command is "
                    "given trust_remote_code=true", Path(run) / "config.yaml")
    base_model.trust_remote_code = trust_remote_code
    warn_about_remote_code(base_model)  # before anything is loaded with it
    return adapter_dir, base_model


def checked_adapter_dir(run: Optional[str], adapter: Optional[str]) -> Path:
    """The folder of the adapter that run= or adapter= names; an error when it holds none."""
    if run is None and adapter is None:
        raise QLoRAError("no adapter given: pass run=outputs/<run> (a training run folder) or adapter=PATH.")
    adapter_dir = Path(adapter or Path(run) / "adapter").expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QLoRAError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): check run= or adapter=.")
    return adapter_dir


def _base_model(run: Optional[str], adapter_dir: Path, base: Optional[str]) -> ModelConfig:
    if base is not None:
        return ModelConfig(name_or_path=base)
    if run is not None:
        return load_run_config(run).model
    saved_base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return ModelConfig(name_or_path=saved_base)


def load_adapted_model(
    run: Optional[str], adapter: Optional[str], base: Optional[str], *, trust_remote_code: bool
) -> tuple[PeftModel, PreTrainedTokenizerBase, Optional[TrainConfig]]:
    """The base model quantized as in training (nf4 defaults without a run) with the adapter on top,
    the tokenizer training saved with the adapter, and the run's config if there is a run."""
    from qlora.stages.artifacts import adapter_tensor_names

    adapter_dir, base_model = find_adapter(run, adapter, base, trust_remote_code=trust_remote_code)
    if not adapter_tensor_names(Path(adapter_dir)):  # peft would only warn, and answer as the untrained base
        raise QLoRAError(f"the adapter in {adapter_dir} holds no LoRA weights (adapter_model.safetensors is missing "
                         f"or empty): train it again, or point to another adapter.")
    run_config = load_run_config(run) if run else None
    quantization = run_config.quantization if run_config else QuantizationConfig()
    device = PartialState().device  # this process's GPU, or the CPU, as in training
    model = PeftModel.from_pretrained(load_quantized_model(base_model, quantization, device), adapter_dir).eval()
    return model, AutoTokenizer.from_pretrained(adapter_dir), run_config
