"""Load the tokenizer and the quantized base model, and prepare it for k-bit training."""

from __future__ import annotations

import logging

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from qlora.config import ModelConfig, QuantizationConfig
from qlora.errors import QLoRAError

log = logging.getLogger(__name__)


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except OSError as error:
        raise QLoRAError(
            f"could not load the tokenizer of model.name_or_path={model.name_or_path}: it is neither a "
            f"local model folder nor reachable on the Hugging Face Hub (offline, gated without a token, "
            f"or misspelt). Details: {error}"
        ) from error
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        # Padding with EOS would teach the model nothing wrong (padding is masked), but it makes EOS
        # ambiguous in batches; UNK is never a real target.
        tokenizer.pad_token = tokenizer.unk_token
        log.info("tokenizer has no pad token: padding with its unk token %r", tokenizer.unk_token)
    return tokenizer


def build_bnb_config(quantization: QuantizationConfig) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for the quantization group, or None for quantization.method=none."""
    if quantization.method == "none":
        return None
    if quantization.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.method,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quantization.quant_storage),
    )


def load_quantized_model(
    model: ModelConfig, quantization: QuantizationConfig, device: torch.device
) -> PreTrainedModel:
    """Load the base model, quantizing while loading, entirely onto this process's device.

    Under `accelerate launch` every process passes its own device, so each holds a full copy (DDP);
    device_map="auto" would instead spread one copy over all GPUs.
    """
    check_device_support(model, quantization, device)
    if model.trust_remote_code:
        log.warning("model.trust_remote_code=true: running code shipped with %s", model.name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model.name_or_path,
            revision=model.revision,
            quantization_config=build_bnb_config(quantization),
            dtype=model.dtype if model.dtype == "auto" else getattr(torch, model.dtype),
            device_map={"": device},
            attn_implementation=model.attn_implementation,
            trust_remote_code=model.trust_remote_code,
        )
    except OSError as error:
        raise QLoRAError(f"could not load model.name_or_path={model.name_or_path}: {error}") from error


def check_device_support(model: ModelConfig, quantization: QuantizationConfig, device: torch.device) -> None:
    """Refuse, before loading gigabytes, a dtype the device lacks or a bitsandbytes that cannot run on it."""
    wants_bf16 = "bfloat16" in (model.dtype, quantization.compute_dtype)
    if wants_bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise QLoRAError(
            f"bfloat16 is requested (model.dtype={model.dtype}, quantization.compute_dtype="
            f"{quantization.compute_dtype}) but {torch.cuda.get_device_name(device)} has no bfloat16 support "
            f"(it needs compute capability 8.0, e.g. A100, H100, RTX 30xx). Set "
            f"quantization.compute_dtype=float16 and model.dtype=float16."
        )
    if quantization.method == "none":
        return
    try:
        import bitsandbytes
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except ImportError as error:
        raise QLoRAError(
            f"quantization.method={quantization.method} needs bitsandbytes, which cannot be imported ({error}). "
            f"Install it with `pip install bitsandbytes`, or train without quantization: quantization=none."
        ) from error
    # bitsandbytes imports without its native library and only fails at the first quantized matmul
    if device.type not in bitsandbytes.supported_torch_devices or (
        device.type == "cuda" and isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    ):
        raise QLoRAError(
            f"bitsandbytes {bitsandbytes.__version__} has no usable backend for the {device.type} device "
            f"(its native library did not load; `python -m bitsandbytes` shows why). Reinstall bitsandbytes "
            f"for your CUDA version, or train without quantization: quantization=none."
        )


def prepare_for_kbit_training(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """peft's k-bit preparation: freeze the base, upcast norms, make inputs require grad."""
    if gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise QLoRAError(
            f"training.gradient_checkpointing=true, but {type(model).__name__} does not support gradient "
            f"checkpointing. Set training.gradient_checkpointing=false (and lower training.batch_size or "
            f"data.max_length if memory runs short)."
        )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        # the non-reentrant variant works with DDP and with frozen inputs
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
