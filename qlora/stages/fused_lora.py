"""LoRA over a 4-bit base layer as one autograd function: `performance.fused_lora`.

peft computes base(x) + lora_B(lora_A(dropout(x))) * scaling module by module: the base output is copied
(a defensive clone), the LoRA product is scaled and added by two more kernels over the whole output, the
dropout output is saved for the backward pass beside its mask, and every piece is a Python call, in the
forward pass, in its recomputation under gradient checkpointing and in the backward pass. Here:

    forward   y = x W^T (bitsandbytes' gemm_4bit) + scaling * (dropout(x) A^T) B^T
    backward  dx = dy W + dropout'((scaling * dy B) A)
              dA = (scaling * dy B)^T dropout(x);  dB = scaling * dy^T (dropout(x) A^T)

The same function, fewer kernels and Python calls; dropout keeps only its mask, eight to a byte (the input is saved
once, shared by the layers that read it): a decoder layer's seven masks are one byte per element of their inputs
(139 MiB for Llama-2-7B at 4,096 tokens) as torch's booleans, an eighth of it packed. The function returns the base
output and the LoRA term apart, and the layer adds them, so that under torch.compile Inductor may fuse that add into
whatever reads the layer's output next. Adding inside the function costs a pass over the output of its own: an addmm
into a new tensor first copies the base output there, and in place torch 2.11's compile makes every LoRA gradient
zero (pytorch/pytorch#180642). Inductor still turns some of these adds back into an addmm (measured on an H100: 363
base-output copies per Llama-2-7B step where the addmm inside the function made 484). The base weight is dequantized
again in the backward pass, as bitsandbytes does, so nothing of its size is kept.

Under gradient checkpointing a layer's saved tensors live only from its recomputation to its backward pass, which
follows at once, so there (`performance.reuse_recomputed_weights`) the function keeps the dequantized weight too:
the backward pass then does not dequantize again, for one decoder layer's weights in the compute dtype of memory.
The first, checkpointed forward pass keeps none of it: the checkpoint discards what it saves. The dropout output is
never kept (one tensor per layer of the input's size, where the input is shared and the packed mask is an eighth
of a byte per element).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from qlora.config import TrainConfig


def fused_lora(config: TrainConfig) -> bool:
    """Whether the LoRA layers run through the fused function: over 4-bit weights, when switched on."""
    return config.performance.fused_lora and config.quantization.method in ("nf4", "fp4")


def keeps_recomputed_tensors(config: TrainConfig) -> bool:
    """Whether the fused layers keep their dequantized weights for the backward pass: only where gradient
    checkpointing frees them again layer by layer."""
    return (fused_lora(config) and config.performance.reuse_recomputed_weights
            and config.training.gradient_checkpointing)


def fuse_lora_layers(model: nn.Module, keep_for_backward: bool = False, dequantize_in_torch: bool = False) -> int:
    """Route every peft LoRA layer over a bitsandbytes 4-bit layer through the fused function; returns how
    many. A layer falls back to peft's own forward whenever the fused one does not apply (see fusable).
    `keep_for_backward`: a forward pass with gradients keeps the dequantized weight for the backward pass; only
    for layers run under gradient checkpointing, which frees them (module docstring).
    `dequantize_in_torch`: inside a compiled region, dequantize in torch ops (performance.compiled_dequantize)."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    layers = [module for module in model.modules() if isinstance(module, LoraLinear4bit)]
    for layer in layers:
        layer.forward = types.MethodType(fused_forward, layer)
        layer.qlora_keep_for_backward = keep_for_backward
        layer.qlora_dequantize_in_torch = dequantize_in_torch
        layer.qlora_dequantized = None  # the weight dequantized for a chunked pass (dequantized_weights)
    return len(layers)


def fused_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not fusable(layer):
        return type(layer).forward(layer, x, *args, **kwargs)
    adapter = layer.active_adapters[0]
    base = layer.base_layer
    quant_state = base.weight.quant_state
    dtype = base.compute_dtype or x.dtype  # what bitsandbytes computes the base matmul in
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    keep = layer.qlora_keep_for_backward and torch.is_grad_enabled()
    in_torch = layer.qlora_dequantize_in_torch and torch.compiler.is_compiling()
    y, lora = LoRA4bitLinear.apply(flat, layer.lora_A[adapter].weight.to(dtype),
                                   layer.lora_B[adapter].weight.to(dtype), base.weight, quant_state,
                                   layer.scaling[adapter], p, keep, in_torch, layer.qlora_dequantized)
    y = y + lora
    if base.bias is not None:
        y = y + base.bias.to(dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def fusable(layer: nn.Module) -> bool:
    """Plain LoRA, one active adapter, a frozen base: what the fused function computes. Anything else (DoRA,
    several or disabled adapters, a merged layer, a trainable bias, a weight bitsandbytes repacked for CPU
    inference, double quantization with other blocks than gemm_4bit takes) is peft's."""
    base = layer.base_layer
    active = layer.active_adapters
    quant_state = base.weight.quant_state
    return (
        not layer.disable_adapters
        and not layer.merged
        and len(active) == 1
        and active[0] in layer.lora_A
        and active[0] not in layer.lora_variant
        and (base.bias is None or not base.bias.requires_grad)
        and quant_state is not None
        and (not quant_state.nested or quant_state.state2.blocksize == 256)  # what gemm_4bit supports
        and not getattr(quant_state, "packing_format_for_cpu", False)
    )


class LoRA4bitLinear(torch.autograd.Function):
    """x W^T and scaling * (dropout(x) A^T) B^T for a 4-bit W, whose sum is the LoRA layer's output; x is 2-D and
    in the compute dtype. `keep`: save the dequantized W for the backward pass instead of dequantizing again there;
    `in_torch`: dequantize in torch ops (see _dequantize); `given`: W already dequantized (dequantized_weights),
    used and saved instead."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, scaling: float, p: float, keep: bool, in_torch: bool,
                given: Optional[torch.Tensor]):
        dequantized = given if given is not None else _dequantize(weight, quant_state, x.dtype, in_torch) if keep \
            else None
        y = x @ dequantized.t() if dequantized is not None else _base_matmul(x, weight, quant_state, in_torch)
        x_dropped, mask = torch.native_dropout(x, p, True) if p > 0 else (x, None)
        xa = x_dropped @ lora_a.t()
        lora = (xa * scaling) @ lora_b.t()
        # x, not dropout(x): x is one tensor shared by the layers that read it, dropout(x) one per layer
        ctx.save_for_backward(x, None if mask is None else pack_bits(mask), xa, lora_a, lora_b, dequantized)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale = weight, quant_state, scaling, 1 / (1 - p)
        ctx.in_torch = in_torch
        return y, lora

    @staticmethod
    def backward(ctx, dy, dy_lora):  # both the layer output's gradient: the layer adds the two outputs
        x, packed_mask, xa, lora_a, lora_b, dequantized = ctx.saved_tensors
        mask = None if packed_mask is None else unpack_bits(packed_mask, x.shape)
        dy, dy_lora = dy.to(x.dtype), dy_lora.to(x.dtype)
        dxa = dy_lora @ (lora_b * ctx.scaling)  # the gradient reaching x A^T
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            if dequantized is not None:
                weight = dequantized
            else:
                weight = _dequantize(ctx.weight, ctx.quant_state, dy.dtype, ctx.in_torch)
            dx_lora = dxa @ lora_a
            if mask is not None:
                dx_lora = torch.ops.aten.native_dropout_backward(dx_lora, mask, ctx.keep_scale)
            dx = dy @ weight + dx_lora
        if ctx.needs_input_grad[1]:
            x_dropped = x if mask is None else torch.ops.aten.native_dropout_backward(x, mask, ctx.keep_scale)
            da = dxa.t() @ x_dropped
        if ctx.needs_input_grad[2]:
            db = dy_lora.t() @ (xa * ctx.scaling)
        return dx, da, db, None, None, None, None, None, None, None


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, eight elements to a byte (the first in the lowest bit); padded to a multiple of 8."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """pack_bits' boolean tensor of `shape`, back."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(-1)[: shape.numel()].view(shape).bool()


@contextmanager
def dequantized_weights(module: nn.Module) -> Iterator[None]:
    """Within it every fused LoRA layer of `module` computes with its 4-bit weight dequantized once, on entry, instead
    of at each call: for a layer run on its input in chunks (qlora/stages/chunked_mlp.py), which would otherwise
    dequantize per chunk. The weight is an attribute of its layer, which compiled chunks read as an input of their
    graph (a ContextVar would break the graph: Dynamo cannot trace one). Holds the module's weights in the compute
    dtype meanwhile (three for an MLP: 0.34 GiB for Llama-3-8B)."""
    layers = [layer for layer in module.modules()
              if getattr(layer, "qlora_dequantized", False) is None and fusable(layer)
              and layer.base_layer.compute_dtype is not None]
    for layer in layers:
        weight = layer.base_layer.weight
        layer.qlora_dequantized = _dequantize_with_bitsandbytes(weight, weight.quant_state,
                                                                layer.base_layer.compute_dtype)
    try:
        yield
    finally:
        for layer in layers:
            layer.qlora_dequantized = None


def _base_matmul(x: torch.Tensor, weight: torch.Tensor, quant_state, in_torch: bool) -> torch.Tensor:
    """x W^T through bitsandbytes' own op, with its double-quantized statistics, as its Linear4bit does, or
    from the weight dequantized in torch ops (`in_torch`, see _dequantize)."""
    if in_torch:
        return x @ _dequantize(weight, quant_state, x.dtype, in_torch).t()
    packed = weight.view(-1, 1)
    if not quant_state.nested:
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, quant_state.shape, quant_state.absmax,
                                                        quant_state.blocksize, quant_state.quant_type)
    return torch.ops.bitsandbytes.gemm_4bit.default(
        x, packed, quant_state.shape, quant_state.state2.absmax, quant_state.blocksize, quant_state.quant_type,
        absmax_8bit=quant_state.absmax, absmax_code=quant_state.state2.code, absmax_offset=quant_state.offset,
    )


def _dequantize(weight: torch.Tensor, quant_state, dtype: torch.dtype, in_torch: bool) -> torch.Tensor:
    """W in `dtype`: through the same bitsandbytes ops as gemm_4bit dequantizes with, or (`in_torch`, only in a
    compiled layer: eager it would be many kernels) in torch ops, which Inductor fuses into one kernel launched
    from its own code; bitsandbytes' ops are Python functions reached through the dispatcher, two kernels and
    host time for every weight."""
    if in_torch:
        return dequantize_in_torch(weight, quant_state).to(dtype)
    return _dequantize_with_bitsandbytes(weight, quant_state, dtype)


def _dequantize_with_bitsandbytes(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, state2.absmax, state2.code,
                                                                     state2.blocksize, torch.float32)
        absmax = absmax + quant_state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.view(-1, 1), absmax, quant_state.blocksize,
                                                          quant_state.quant_type, quant_state.shape, dtype)


def dequantize_in_torch(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization in torch ops, in float32: code[q] * absmax of the q's block, two 4-bit
    codes per byte (high nibble first), the absmax itself 8-bit-quantized in blocks (double quantization) plus an
    offset. What bitsandbytes' kernels compute, in the same float32 operations."""
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        blocks = state2.absmax.repeat_interleave(state2.blocksize)[: absmax.numel()]
        absmax = state2.code[absmax.int()] * blocks + quant_state.offset
    count = quant_state.shape.numel()
    packed = weight.view(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1)[:count]
    values = quant_state.code[codes.int()] * absmax.repeat_interleave(quant_state.blocksize)[:count]
    return values.view(quant_state.shape)
