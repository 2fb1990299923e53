"""The MLP's down projection left out of the layer's recomputation: `performance.skip_down_proj_recompute`.

Under gradient checkpointing the backward pass of a decoder layer first runs the layer's forward pass again, to
get back what the layer saved. torch stops that recomputation at the last tensor the layer saved (its early stop).
In a Llama-style layer the MLP's down projection comes last, and its output only goes into the residual sum; what
its backward pass needs is its input (and the adapter's weights and dropout mask). But a layer computes all of its
forward pass before autograd packs what it saves, so the recomputation still runs the down projection, a matmul of
tokens x intermediate x hidden size (a fifth of a Llama layer's matmul work), only to throw its output away.

Here the down projection's inputs are saved by a function of their own (SavedFirst) before it computes anything,
and the projection itself (DownProjection) saves nothing: the layer's last saved tensor is then its input, and the
recomputation stops there. It runs outside the compiled layer (a graph break: it must run as written for the early
stop to fall between the two), in eager torch ops, and recomputes x A^T (tokens x rank) in its backward pass rather
than keeping it. Where something after the down projection saves its output (Gemma's post-feedforward norm), the
recomputation runs it as before: the gradients are the same either way.

The MLPs of micro-batches longer than performance.mlp_chunk_tokens run in chunks whose backward pass recomputes the
MLP itself (qlora/stages/chunked_mlp.py); there the down projection runs the fused function as before.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.config import TrainConfig
from qlora.stages.fused_lora import _base_matmul, fused_forward, fused_lora, fusable, lora_gradients, pack_bits, \
    unpack_bits


def skips_down_proj_recompute(config: TrainConfig) -> bool:
    """performance.skip_down_proj_recompute applies to fused LoRA layers under gradient checkpointing."""
    return (config.performance.skip_down_proj_recompute and fused_lora(config)
            and config.training.gradient_checkpointing)


def save_down_proj_inputs_first(model: nn.Module) -> int:
    """Route the fused down projection of every checkpointed decoder layer's MLP through DownProjection; returns
    how many."""
    downs = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in model.modules()
             if isinstance(layer, GradientCheckpointingLayer)]
    downs = [down for down in downs if getattr(getattr(down, "forward", None), "__func__", None) is fused_forward]
    for down in downs:
        down.forward = types.MethodType(saved_first_forward, down)
    return len(downs)


def saved_first_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # the fused function where nothing is saved (no gradients), where the weight comes dequantized for a chunked
    # MLP (whose backward pass recomputes the MLP itself), and where the fused function itself does not apply
    if (args or kwargs or not (torch.is_grad_enabled() and x.requires_grad) or layer.qlora_dequantized is not None
            or not fusable(layer)):
        return fused_forward(layer, x, *args, **kwargs)
    y, lora = _saved_first(layer, x)
    y = y + lora
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


@torch.compiler.disable  # SavedFirst must run (and save) before DownProjection computes: no compiled graph around
def _saved_first(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = layer.active_adapters[0]
    base = layer.base_layer
    dtype = base.compute_dtype or x.dtype
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    lora_a, lora_b = layer.lora_A[adapter].weight.to(dtype), layer.lora_B[adapter].weight.to(dtype)
    # the same random draw, at the same point of the random stream, as the fused function's
    dropped, mask = torch.native_dropout(flat.detach(), p, True) if p > 0 else (None, None)
    saved = (flat, lora_a, lora_b) + (() if mask is None else (pack_bits(mask),))
    flat = SavedFirst.apply(*saved)
    return DownProjection.apply(flat, lora_a, lora_b, base.weight, base.weight.quant_state, layer.scaling[adapter],
                                p, dropped)


class SavedFirst(torch.autograd.Function):
    """Saves x and the other tensors given for the function that reads x next, and returns x as it is."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.save_for_backward(x, *others)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


class DownProjection(torch.autograd.Function):
    """LoRA4bitLinear's x W^T and scaling * (dropout(x) A^T) B^T (fused_lora.py) for an x that comes from
    SavedFirst, which saved x, A, B and the packed dropout mask: this function saves nothing. `dropped`: dropout(x),
    drawn before SavedFirst ran."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, scaling: float, p: float,
                dropped: Optional[torch.Tensor]):
        ctx.saved_first = x.grad_fn
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.keep_scale, ctx.in_torch = weight, quant_state, scaling, \
            1 / (1 - p), False
        y = _base_matmul(x, weight, quant_state, in_torch=False)
        xa = (x if dropped is None else dropped) @ lora_a.t()
        return y, (xa * scaling) @ lora_b.t()

    @staticmethod
    def backward(ctx, dy, dy_lora):
        x, lora_a, lora_b, *packed = ctx.saved_first.saved_tensors
        mask = unpack_bits(packed[0], x.shape) if packed else None
        dropped = x if mask is None else torch.ops.aten.native_dropout_backward(x, mask, ctx.keep_scale)
        xa = dropped @ lora_a.t()
        return lora_gradients(ctx, dy, dy_lora, x, mask, xa, lora_a, lora_b, None) + (None,) * 5
