"""`python -m qlora.merge run=outputs/<run>`: fold the LoRA adapter into the base model's weights.

The result is a plain transformers checkpoint (sharded safetensors, config, generation config,
tokenizer) that loads with `AutoModelForCausalLM.from_pretrained`. By default the adapter is merged
into the base model's original weights, saved in bf16 (merging into 4-bit weights would lose
precision), one shard at a time so that models larger than memory merge too;
`from_dequantized=true` merges into the dequantized 4-bit weights instead, which is the function the
adapter was trained against, and reports how far those weights are from the originals.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qlora.cli import run_hydra_command
from qlora.config import MergeConfig, ModelConfig, TrainConfig, typed_config
from qlora.errors import QLoRAError
from qlora.hub import prepare_hub_access, why_not_loaded
from qlora.runs import find_adapter, load_run_config

log = logging.getLogger("qlora")


@dataclass
class MergeResult:
    output_dir: Path
    # with from_dequantized: |W_dequantized - W_original| / |W_original| over the quantized layers
    dequantization_error: float | None = None


def merge(config: MergeConfig) -> MergeResult:
    adapter_dir, base = find_adapter(config.run, config.adapter, config.base,
                                     trust_remote_code=config.trust_remote_code)
    output = Path(config.output_dir or Path(config.run or adapter_dir.parent) / "merged").expanduser()
    if output.exists():
        raise QLoRAError(f"output_dir={output} already exists; refusing to write over it. Choose another output_dir.")
    if config.from_dequantized and config.run is None:
        raise QLoRAError("from_dequantized=true needs run=outputs/<run>: its config says how the base was quantized.")
    dtype = getattr(torch, config.dtype)
    partial = output.with_name(output.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    error = None
    if config.from_dequantized:
        error = _merge_into_dequantized(base, adapter_dir, load_run_config(config.run), dtype, partial,
                                        config.max_shard_size)
    elif plain_lora_scale(adapter_dir) is not None:
        merge_shard_by_shard(checkpoint_folder(base), adapter_dir, dtype, partial)
    else:  # DoRA, modules_to_save or per-module ranks: let peft merge, with the whole model in memory
        prepare_hub_access(base.name_or_path)
        model = AutoModelForCausalLM.from_pretrained(base.name_or_path, revision=base.revision, dtype=dtype,
                                                     trust_remote_code=base.trust_remote_code)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.to(dtype).save_pretrained(partial, max_shard_size=config.max_shard_size)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(partial)
    partial.rename(output)
    log.info("merged %s into %s: saved to %s", adapter_dir, base.name_or_path, output)
    return MergeResult(output_dir=output, dequantization_error=error)


def plain_lora_scale(adapter_dir: Path) -> float | None:
    """alpha / r (alpha / sqrt(r) with rsLoRA) for an adapter that is only LoRA A/B pairs, else None."""
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (adapter.get("peft_type") != "LORA" or adapter.get("use_dora") or adapter.get("modules_to_save")
            or adapter.get("rank_pattern") or adapter.get("alpha_pattern") or adapter.get("fan_in_fan_out")):
        return None
    return adapter["lora_alpha"] / (math.sqrt(adapter["r"]) if adapter.get("use_rslora") else adapter["r"])


@torch.no_grad()
def merge_shard_by_shard(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, output: Path) -> None:
    """W + scale * B @ A for every adapted weight, one base shard in memory at a time, so merging
    needs about one shard of memory rather than the whole model. Shard names and index are kept."""
    scale = plain_lora_scale(adapter_dir)
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    pairs = {}  # "model.layers.0.self_attn.q_proj.weight" -> (A, B)
    for name in lora:
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            pairs[module + ".weight"] = (lora[name].float(), lora[name.replace(".lora_A.", ".lora_B.")].float())
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise QLoRAError(f"{base_dir} has no .safetensors weights to merge into.")
    output.mkdir(parents=True)
    merged, total_size = set(), 0
    for shard in shards:
        tensors = {}
        with safe_open(shard, framework="pt") as source:
            for name in source.keys():
                tensor = source.get_tensor(name)
                if name in pairs:
                    a, b = pairs[name]
                    tensor = tensor.float() + scale * (b @ a)
                    merged.add(name)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                total_size += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, output / shard.name, metadata={"format": "pt"})
        del tensors
    if merged != pairs.keys():
        raise QLoRAError(f"the adapter adapts weights the base model lacks: {sorted(pairs.keys() - merged)[:3]}; "
                         f"is base= the model the adapter was trained on?")
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        content = json.loads(index.read_text())
        content.setdefault("metadata", {})["total_size"] = total_size
        (output / index.name).write_text(json.dumps(content, indent=2))
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (output / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", output)


def checkpoint_folder(base: ModelConfig) -> Path:
    """The base model's local folder, downloading only its weights and configs from the Hub if needed."""
    folder = Path(base.name_or_path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    prepare_hub_access(base.name_or_path)
    try:
        return Path(snapshot_download(base.name_or_path, revision=base.revision,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except OSError as error:  # huggingface_hub's errors for a missing, gated or unreachable repository
        raise QLoRAError(f"could not load the base model {base.name_or_path}: "
                         f"{why_not_loaded(base.name_or_path, error)}") from error


def _merge_into_dequantized(base: ModelConfig, adapter_dir: Path, run: TrainConfig, dtype: torch.dtype,
                            output: Path, max_shard_size: str) -> float:
    from qlora.stages.model import load_quantized_model

    device = PartialState().device  # this process's GPU, or the CPU, as in training
    model = load_quantized_model(base, run.quantization, device).dequantize(dtype=dtype)
    error = dequantization_error(model, checkpoint_folder(base))
    log.info("dequantized %s weights differ from the originals by %.3f%% (relative Frobenius norm)",
             run.quantization.method, 100 * error)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.to(dtype).save_pretrained(output, max_shard_size=max_shard_size)
    return error


@torch.no_grad()
def dequantization_error(model: PreTrainedModel, folder: Path) -> float:
    """Relative distance between the model's (dequantized) linear weights and the original checkpoint's,
    read tensor by tensor so that only one original tensor is in memory at a time."""
    weights = dict(model.named_parameters())
    diff_sq = norm_sq = 0.0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                if name in weights and name.endswith("proj.weight"):
                    reference = tensors.get_tensor(name).float()
                    ours = weights[name].detach().float().cpu()
                    diff_sq += (ours - reference).pow(2).sum().item()
                    norm_sq += reference.pow(2).sum().item()
    if norm_sq == 0:
        raise QLoRAError(f"found no linear layer weights in {folder} to compare with")
    return (diff_sq / norm_sq) ** 0.5


def main() -> None:
    run_hydra_command("merge", lambda cfg: merge(typed_config(cfg)))


if __name__ == "__main__":
    main()
