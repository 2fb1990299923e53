"""Load the tokenizer and the quantized base model, and prepare it for k-bit training."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.config import ModelConfig, PerformanceConfig, QuantizationConfig
from qlora.errors import QLoRAError
from qlora.hub import prepare_hub_access, why_not_loaded

log = logging.getLogger(__name__)


def warn_about_remote_code(model: ModelConfig) -> None:
    """Say that the model's own code will run; each command calls it before its first load of the model."""
    if model.trust_remote_code:
        log.warning("trust_remote_code=true: running code shipped with %s", model.name_or_path)


def from_model_source(load: Callable, model: ModelConfig, what: str, **kwargs):
    """`load`(model.name_or_path, revision, trust_remote_code, **kwargs) after the Hub check (qlora.hub), its
    failure to find or read the files said in one line naming `what` and why."""
    prepare_hub_access(model.name_or_path)
    try:
        return load(model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code, **kwargs)
    except OSError as error:
        raise QLoRAError(f"could not load {what}model.name_or_path={model.name_or_path}: "
                         f"{why_not_loaded(model.name_or_path, error)}") from error


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = from_model_source(AutoTokenizer.from_pretrained, model, "the tokenizer of ")
    if tokenizer.pad_token is None:
        set_pad_token(tokenizer)
    return tokenizer


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without one a pad token that is not EOS, reusing a token the model already has.

    Padding with EOS makes EOS ambiguous in batches, and collators that mask padding by id would then
    mask the real EOS too, so the model would never learn to stop. UNK, or an unused reserved token
    (Llama 3 has 250), is never a real target; only when there is none is a new token added.
    """
    added = sorted(tokenizer.get_added_vocab(), key=lambda token: tokenizer.convert_tokens_to_ids(token))
    candidates = [tokenizer.unk_token]
    candidates += [t for t in added if "pad" in t.lower()] + [t for t in added if "reserved" in t]
    for token in candidates:
        if token is not None and token != tokenizer.eos_token:
            tokenizer.pad_token = token
            log.info("tokenizer has no pad token: padding with %r rather than EOS, so that EOS stays a target", token)
            return
    tokenizer.add_special_tokens({"pad_token": "<|qlora_pad|>"})
    log.warning(
        "tokenizer has no pad token and no unused one to reuse: added <|qlora_pad|> (not EOS, so that EOS stays "
        "a target); the model's embeddings are resized to match"
    )


def fit_embeddings_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained a token (a new pad token); padding is never trained."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


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
    model: ModelConfig, quantization: QuantizationConfig, device: torch.device, sharded: bool = False
) -> PreTrainedModel:
    """Load the base model, quantizing while loading, entirely onto this process's device.

    Under `accelerate launch` every process passes its own device, so each holds a full copy (DDP);
    device_map="auto" would instead spread one copy over all GPUs. `sharded` (FSDP): no device map, so
    that transformers loads as FSDP expects (its cpu_ram_efficient_loading path) and FSDP then shards
    the weights over the processes.
    """
    check_device_support(model, quantization, device)
    saved = saved_quantization(model)
    if saved is not None:
        # transformers loads a pre-quantized checkpoint with its own quantization_config and ignores
        # the one passed in; say which of the user's settings that overrides.
        log.info("%s is already quantized (%s): loading it without re-quantizing", model.name_or_path,
                 describe_quantization(saved))
        for conflict in quantization_conflicts(saved, quantization):
            log.warning("%s; the checkpoint's setting is used", conflict)
    # A pre-quantized checkpoint must not even see quantization_config=None: transformers would then
    # load its packed 4-bit tensors as if they were plain weights.
    quantization_kwargs = {} if saved is not None else {"quantization_config": build_bnb_config(quantization)}
    loaded = from_model_source(
        AutoModelForCausalLM.from_pretrained, model, "",
        dtype=model.dtype if model.dtype == "auto" else getattr(torch, model.dtype),
        device_map=None if sharded else {"": device},
        attn_implementation=model.attn_implementation,
        **quantization_kwargs,
    )
    keep_4bit_layout(loaded)
    return loaded


def saved_quantization(model: ModelConfig) -> QuantizationConfig | None:
    """The quantization a pre-quantized bitsandbytes checkpoint was saved with, or None."""
    config = from_model_source(AutoConfig.from_pretrained, model, "the config.json of ")
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method") != "bitsandbytes":
        raise QLoRAError(
            f"model.name_or_path={model.name_or_path} is quantized with {saved.get('quant_method')}; qlora "
            f"trains on bitsandbytes 4-bit or 8-bit bases. Use the unquantized model instead."
        )
    return _as_quantization_config(saved)


def loaded_quantization(model: PreTrainedModel, requested: QuantizationConfig) -> QuantizationConfig:
    """The quantization a loaded model computes with: the requested one, or a pre-quantized checkpoint's own."""
    used = getattr(model.config, "quantization_config", None)
    if used is None:  # quantization.method=none
        return requested
    return _as_quantization_config(used if isinstance(used, dict) else used.to_dict())


def _as_quantization_config(bnb: dict) -> QuantizationConfig:
    """A bitsandbytes quantization_config (as config.json holds it) as the quantization group's values."""
    if bnb.get("load_in_8bit"):
        return QuantizationConfig(method="int8", double_quant=False)
    return QuantizationConfig(
        method=bnb["bnb_4bit_quant_type"],
        double_quant=bnb["bnb_4bit_use_double_quant"],
        compute_dtype=str(bnb["bnb_4bit_compute_dtype"]).removeprefix("torch."),
        quant_storage=str(bnb["bnb_4bit_quant_storage"]).removeprefix("torch."),
    )


def quantization_conflicts(saved: QuantizationConfig, requested: QuantizationConfig) -> list[str]:
    """The requested quantization settings that differ from a pre-quantized checkpoint's."""
    if requested.method == "none":
        return [f"quantization.method=none, but the checkpoint is quantized ({describe_quantization(saved)})"]
    return [
        f"quantization.{key}={getattr(requested, key)} differs from the checkpoint's {getattr(saved, key)}"
        for key in ("method", "double_quant", "compute_dtype", "quant_storage")
        if getattr(requested, key) != getattr(saved, key) and not (saved.method == "int8" and key != "method")
    ]


def describe_quantization(quantization: QuantizationConfig) -> str:
    if quantization.method in ("int8", "none"):
        return quantization.method
    double = " + double quant" if quantization.double_quant else ""
    return f"{quantization.method}{double}, {quantization.compute_dtype} compute"


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


def prepare_for_kbit_training(
    model: PreTrainedModel,
    gradient_checkpointing: bool,
    frozen_weights_dtype: torch.dtype = torch.float32,
    sharded: bool = False,
) -> PreTrainedModel:
    """peft's k-bit preparation: freeze the base, upcast non-quantized weights, make inputs require grad.

    peft upcasts every non-quantized weight (embeddings, norms, lm_head) to float32. The frozen ones
    need no more than the compute dtype (norms compute in float32 inside the layer anyway), so with
    `frozen_weights_dtype` set to it they are cast back: half their memory and no cast in every step.

    `sharded` (FSDP): freeze and make inputs require grad only. FSDP flattens each wrapped layer's
    weights into one tensor of one dtype, so the norms stay in the storage dtype of the 4-bit weights
    instead of peft's float32 upcast (TRL skipped the preparation for sharded QLoRA for the same reason).
    """
    if gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise QLoRAError(
            f"training.gradient_checkpointing=true, but {type(model).__name__} does not support gradient "
            f"checkpointing. Set training.gradient_checkpointing=false (and lower training.batch_size or "
            f"data.max_length if memory runs short)."
        )
    if sharded:
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:  # the Trainer turns checkpointing on; the frozen inputs must carry grads
            model.enable_input_require_grads()
        return model
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        # the non-reentrant variant works with DDP and with frozen inputs
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if frozen_weights_dtype != torch.float32:
        for param in model.parameters():
            if param.dtype == torch.float32 and not param.requires_grad:
                param.data = param.data.to(frozen_weights_dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the float32 copies' blocks
    return model


def keep_4bit_layout(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, the first forward pass of a Linear4bit in eval mode without gradients (the
    held-out check, evaluation, generation) repacks its weight into an inference layout. From then on every
    matmul goes through a kernel that computes in bf16 whatever quantization.compute_dtype says, and that has
    no backward: a later training step's gradients stop at every base weight, silently.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False


def compile_decoder_layers(model: nn.Module, round_like_eager: bool = False) -> int:
    """performance.torch_compile: compile every decoder layer in place, each on its own, so that one compilation
    serves all the layers and the gradient checkpoint around each layer stays outside the compiled code; returns
    how many. `round_like_eager`: see inductor_options."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(options=inductor_options(round_like_eager))
    return len(layers)


def inductor_options(round_like_eager: bool) -> Optional[dict]:
    """Inductor keeps a fused kernel's intermediate values in float32 where the eager code casts them to bfloat16
    (the norms' output before their weight, with the frozen weights in bfloat16), and fuses a layer's graph with
    gradients otherwise than its graph without: the two then compute other values. `round_like_eager` rounds at
    every cast as the eager code does (emulate_precision_casts), so that a preference method's reference pass (no
    gradients, adapter off) computes what the trained model computed at the start: DPO's first rewards are zero."""
    return {"emulate_precision_casts": True} if round_like_eager else None


def frozen_weights_dtype(performance: PerformanceConfig, quantization: QuantizationConfig) -> torch.dtype:
    """The dtype the frozen non-quantized weights train in: float32 (peft's choice) or the compute dtype."""
    return torch.float32 if performance.frozen_weights_float32 else getattr(torch, quantization.compute_dtype)
