"""`python -m qlora.quantize model=llama2_7b output_dir=models/llama2-7b-nf4`: quantize once, train many.

Saves the base model quantized with bitsandbytes (its quantization_config in config.json) plus its
tokenizer. Training with `model.name_or_path=models/llama2-7b-nf4` then loads it without re-quantizing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from accelerate import PartialState

from qlora.cli import run_hydra_command
from qlora.config import QuantizeConfig, typed_config
from qlora.validation import validate_model, validate_quantization
from qlora.errors import QLoRAError

log = logging.getLogger("qlora")


def quantize(config: QuantizeConfig) -> Path:
    """Load config.model quantized per config.quantization and save it to config.output_dir."""
    from qlora.stages.model import describe_quantization, load_quantized_model, load_tokenizer, warn_about_remote_code

    validate_model(config.model)
    validate_quantization(config.quantization)
    if config.quantization.method == "none":
        raise QLoRAError("quantization.method=none: nothing to quantize. Pick quantization=nf4, fp4 or int8.")
    output = Path(config.output_dir).expanduser()
    if output.exists():
        raise QLoRAError(f"output_dir={output} already exists; refusing to write over it. Choose another output_dir.")
    device = PartialState().device  # this process's GPU, or the CPU, as in training
    warn_about_remote_code(config.model)
    tokenizer = load_tokenizer(config.model)
    model = load_quantized_model(config.model, config.quantization, device)
    partial = output.with_name(output.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(output)
    log.info("saved %s (%s, %.2f GiB) to %s", config.model.name_or_path, describe_quantization(config.quantization),
             model.get_memory_footprint() / 2**30, output)
    return output


def main() -> None:
    run_hydra_command("quantize", lambda cfg: quantize(typed_config(cfg)))


if __name__ == "__main__":
    main()
