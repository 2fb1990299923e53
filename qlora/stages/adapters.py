"""Attach LoRA adapters built from the lora config group, or continue a trained adapter (model.adapter)."""

from __future__ import annotations

import logging
from typing import Optional

import peft
from transformers import PreTrainedModel

from qlora.config import REFERENCE_METHODS, LoraConfig, TrainConfig, adapter_folder
from qlora.stages.chunked_mlp import chunk_mlps
from qlora.stages.fused_lora import fuse_lora_layers, fused_lora, keeps_recomputed_tensors
from qlora.stages.model import compile_decoder_layers

log = logging.getLogger(__name__)


def attach_lora(model: PreTrainedModel, lora: LoraConfig, fused: bool = False, keep_for_backward: bool = False,
                dequantize_in_torch: bool = False, adapter: Optional[str] = None) -> peft.PeftModel:
    """peft's LoRA adapters from the lora group, or the trained adapter `adapter` (model.adapter) to continue;
    `fused` (performance.fused_lora) routes the layers over 4-bit weights through qlora's fused LoRA function,
    `keep_for_backward` (performance.reuse_recomputed_weights, under gradient checkpointing only) lets it keep its
    dequantized weights for the backward pass, `dequantize_in_torch` (performance.compiled_dequantize) lets compiled
    layers dequantize in torch ops."""
    if adapter is not None:
        folder = adapter_folder(adapter)
        log.info("model.adapter: continuing the adapter in %s", folder)
        model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        return _fused(model, fused, keep_for_backward, dequantize_in_torch)
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return _fused(peft.get_peft_model(model, peft_config), fused, keep_for_backward, dequantize_in_torch)


def _fused(model: peft.PeftModel, fused: bool, keep_for_backward: bool, dequantize_in_torch: bool) -> peft.PeftModel:
    if fused:
        fused_layers = fuse_lora_layers(model, keep_for_backward, dequantize_in_torch)
        log.info("performance.fused_lora: %d LoRA layers over 4-bit weights fused", fused_layers)
    return model


def attach_training_adapters(model: PreTrainedModel, config: TrainConfig,
                             sharded: bool = False) -> peft.PeftModel:
    """The adapters as a run trains them, with the performance switches that act on the layers: the fused LoRA
    function (and its reuse of recomputed weights), the chunked MLPs and the compiled decoder layers. Under FSDP
    (`sharded`) none applies: FSDP flattens the 4-bit weights the fused function reads, and none is measured there."""
    performance = config.performance
    model = attach_lora(model, config.lora, fused=fused_lora(config) and not sharded,
                        keep_for_backward=keeps_recomputed_tensors(config),
                        dequantize_in_torch=performance.torch_compile and performance.compiled_dequantize,
                        adapter=config.model.adapter)
    # a reference pass computes without gradients what the trained model computed with them (model.inductor_options)
    round_like_eager = config.training.method in REFERENCE_METHODS
    if performance.mlp_chunk_tokens and not sharded:
        chunked = chunk_mlps(model, performance.mlp_chunk_tokens, performance.torch_compile, round_like_eager)
        log.info("performance.mlp_chunk_tokens: %d MLPs run in chunks of %d tokens on longer micro-batches",
                 chunked, performance.mlp_chunk_tokens)
    if performance.torch_compile and not sharded:
        log.info("performance.torch_compile: %d decoder layers compiled",
                 compile_decoder_layers(model, round_like_eager))
    return model
