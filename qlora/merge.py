"""`python -m qlora.merge run=outputs/<run>`: fold the LoRA adapter into the base model's weights.

The result is a plain transformers checkpoint (sharded safetensors, config, generation config,
tokenizer) that loads with `AutoModelForCausalLM.from_pretrained`. By default the adapter is merged
into the base model loaded in bf16 (merging into 4-bit weights would lose precision);
`from_dequantized=true` merges into the dequantized 4-bit weights instead, which is the function the
adapter was trained against, and reports how far those weights are from the originals.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qlora.cli import run_hydra_command
from qlora.config import MergeConfig, typed_config
from qlora.errors import QLoRAError
from qlora.runs import find_adapter, load_run_config

log = logging.getLogger("qlora")


@dataclass
class MergeResult:
    output_dir: Path
    # with from_dequantized: |W_dequantized - W_original| / |W_original| over the quantized layers
    dequantization_error: float | None = None


def merge(config: MergeConfig) -> MergeResult:
    adapter_dir, base = find_adapter(config.run, config.adapter, config.base)
    output = Path(config.output_dir or Path(config.run or adapter_dir.parent) / "merged").expanduser()
    if output.exists():
        raise QLoRAError(f"output_dir={output} already exists; refusing to write over it. Choose another output_dir.")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, config.dtype)
    error = None
    if config.from_dequantized:
        from qlora.stages.model import load_quantized_model

        if config.run is None:
            raise QLoRAError("from_dequantized=true needs run=outputs/<run>: its config says how the base was quantized.")
        run = load_run_config(config.run)
        quantized = load_quantized_model(base, run.quantization, device)
        model = quantized.dequantize(dtype=dtype)
        error = dequantization_error(model, base.name_or_path)
        log.info("dequantized %s weights differ from the originals by %.3f%% (relative Frobenius norm)",
                 run.quantization.method, 100 * error)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base.name_or_path, revision=base.revision, dtype=dtype, device_map={"": device},
            trust_remote_code=base.trust_remote_code,
        )
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged = merged.to(dtype)
    partial = output.with_name(output.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, max_shard_size=config.max_shard_size)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(partial)
    partial.rename(output)
    log.info("merged %s into %s: saved to %s", adapter_dir, base.name_or_path, output)
    return MergeResult(output_dir=output, dequantization_error=error)


@torch.no_grad()
def dequantization_error(model: PreTrainedModel, original: str) -> float:
    """Relative distance between the model's (dequantized) linear weights and the original checkpoint's,
    read tensor by tensor so that only one original tensor is in memory at a time."""
    folder = Path(original)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(original, allow_patterns=["*.safetensors", "*.json"]))
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
        raise QLoRAError(f"found no linear layer weights of {original} to compare with")
    return (diff_sq / norm_sq) ** 0.5


def main() -> None:
    run_hydra_command("merge", lambda cfg: merge(typed_config(cfg)))


if __name__ == "__main__":
    main()
