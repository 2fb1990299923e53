"""`python -m qlora.plan [+recipe=NAME] [key=value ...] [--gpu-memory 80GiB]`: print the memory plan.

The planner itself is qlora.plan (the package's __init__); this is its command line and printed table.

The same recipe and overrides as `qlora.train`; nothing is loaded but the model's config.json.
"""

from __future__ import annotations

import re
import sys

import torch
from omegaconf import DictConfig

from qlora.cli import run_hydra_command
from qlora.config import PlanConfig, typed_config
from qlora.errors import QLoRAError
from qlora.plan import (LONGEST_SEQUENCE_SEARCHED, Architecture, GiB, MemoryPlan, largest_batch, load_architecture,
                        longest_sequence, plan_memory)
from qlora.stages.model import frozen_weights_dtype
from qlora.validation import validate

_UNITS = {"": GiB, "g": GiB, "gib": GiB, "gb": 10**9, "m": 2**20, "mib": 2**20, "mb": 10**6, "t": 2**40,
          "tib": 2**40, "tb": 10**12}


def plan_command(cfg: DictConfig) -> None:
    config: PlanConfig = typed_config(cfg)
    validate(config)
    memory, where = gpu_memory(config.plan.gpu_memory)
    architecture = load_architecture(config.model)
    plan = plan_memory(config, architecture=architecture)
    print(render(plan, config))
    if memory is None:
        print("\nno GPU here and no plan.gpu_memory (or --gpu-memory 80GiB) given: nothing to fit")
        return
    batch = largest_batch(config, memory, architecture)
    sequence = longest_sequence(config, memory, architecture, batch_size=1)
    print(f"\nfits {where} ({memory / GiB:.1f} GiB):")
    print(f"  largest batch size at data.max_length={plan.seq_len}: {batch or 'none (even 1 does not fit)'}")
    print(f"  longest sequence at batch size 1: {describe_sequence(sequence, architecture)}")


def describe_sequence(tokens: int, architecture: Architecture) -> str:
    if not tokens:
        return "none (even 64 tokens do not fit)"
    if tokens == LONGEST_SEQUENCE_SEARCHED:
        return f"{tokens:,} tokens or more"
    context = getattr(architecture.config.get_text_config(), "max_position_embeddings", None)
    beyond = f" (beyond the model's own context of {context:,}: longer needs RoPE scaling)" if context and \
        tokens > context else ""
    return f"{tokens:,} tokens{beyond}"


def render(plan: MemoryPlan, config: PlanConfig) -> str:
    p = plan.params
    checkpointing = "on" if plan.gradient_checkpointing else "off"
    lines = [
        f"model {config.model.name_or_path}: config.json from {plan.architecture_source}",
        "parameters",
        f"  quantized linear ({config.quantization.method}) {p.quantized:>16,}",
        f"  not quantized (embeddings, norms, lm_head) {p.unquantized:>16,}",
        f"  LoRA (trainable, r={config.lora.r}) {p.lora:>16,}",
        f"footprint after loading {_gib(plan.footprint)}",
        f"  quantized weights {_gib(plan.quantized_weights)}",
        f"  quantization statistics (absmax{', double quant' if config.quantization.double_quant else ''}) "
        f"{_gib(plan.quant_statistics)}",
        f"  not quantized, in {config.model.dtype} {_gib(plan.unquantized_weights)}",
        f"load peak (quantized model + the largest full-precision tensor) {_gib(plan.load_peak)}",
        "load bound (quantized model + the largest shard) "
        + (_gib(plan.load_bound) if plan.load_bound is not None else "unknown: the checkpoint is not a local folder"),
        f"training peak at batch {_batch(plan)} x {plan.seq_len} tokens, gradient checkpointing {checkpointing} "
        f"{_gib(plan.training_peak)}",
        f"  weights (unquantized ones in {_frozen_dtype(config)} after k-bit preparation) {_gib(plan.weights)}",
        f"  LoRA weights, gradients, optimizer states ({config.training.optim}) {_gib(plan.lora_and_optimizer)}",
        f"  activations {_gib(plan.activations)}",
        f"    with gradient checkpointing {_gib(plan.activations_with_checkpointing)}",
        f"    without gradient checkpointing {_gib(plan.activations_without_checkpointing)}",
        f"  logits and loss (TRL's fused head, in tiles) {_gib(plan.logits_loss)}",
        f"  workspace (dequantized weights, cuBLAS) {_gib(plan.workspace)}",
    ]
    if plan.host_embeddings:
        lines.append(f"  + the input embedding table, in host memory while training {_gib(plan.host_embeddings)}")
    if plan.reference_pass:
        # the peak counts this instead of activations + logits when it is larger
        lines.append(f"  or in the reference's pass (adapter off), with the policy's kept activations "
                     f"{_gib(plan.reference_pass)}")
    if plan.reference_adapter:
        lines.append(f"  + the reference's frozen copy of model.adapter {_gib(plan.reference_adapter)}")
    if plan.paged_optimizer:
        lines.append(f"  + paged optimizer states, in CUDA unified memory outside torch's allocator "
                     f"{_gib(plan.paged_optimizer)}")
    return "\n".join(_align(line, 96) for line in lines)


def gpu_memory(value: str | None) -> tuple[int | None, str]:
    """Bytes to fit, from plan.gpu_memory (e.g. 80GiB), else this machine's first GPU, else None."""
    if value is not None:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise QLoRAError(f"plan.gpu_memory={value} is not a memory size: use e.g. 80GiB, 24GB or 16000MiB.")
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()]), f"plan.gpu_memory={value}"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return None, ""


def _batch(plan: MemoryPlan) -> str:
    """The micro-batch: N sequences, or for DPO and ORPO N pairs of a chosen and a rejected sequence."""
    if plan.sequences_per_example == 2:
        return f"{plan.batch_size} pairs (2 x {plan.batch_size} sequences)"
    return str(plan.batch_size)


def _frozen_dtype(config: PlanConfig) -> str:
    return str(frozen_weights_dtype(config.performance, config.quantization)).removeprefix("torch.")


def _gib(value: int) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB / 10 else f"{value / 2**20:.1f} MiB"


def _align(line: str, width: int) -> str:
    """Right-align the trailing number of a line."""
    match = re.match(r"^(.*?)\s*([0-9,.]+( GiB| MiB)?)$", line)
    if not match or "config.json" in line or line.startswith("load bound (quantized model + the largest shard) unk"):
        return line
    label, number = match.group(1), match.group(2)
    return f"{label} {number:>{max(width - len(label) - 1, 1)}}"


def gpu_memory_flag(argv: list[str]) -> list[str]:
    """`--gpu-memory 80GiB` (as the issue spells it; Hydra owns argv) becomes plan.gpu_memory=80GiB."""
    result, args = [], iter(argv)
    for arg in args:
        if arg == "--gpu-memory":
            value = next(args, None)
            if value is None:
                raise SystemExit("qlora: error: --gpu-memory needs a value, e.g. --gpu-memory 80GiB")
            result.append(f"plan.gpu_memory={value}")
        elif arg.startswith("--gpu-memory="):
            result.append("plan.gpu_memory=" + arg.split("=", 1)[1])
        else:
            result.append(arg)
    return result


def main() -> None:
    run_hydra_command("plan", plan_command, gpu_memory_flag(sys.argv[1:]))


if __name__ == "__main__":
    main()
