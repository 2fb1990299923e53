"""The MLP in sequence chunks: `performance.mlp_chunk_tokens`.

A decoder layer's MLP holds tensors of tokens x intermediate size (gate, up, their product, and their gradients in
the backward pass): 1.75 GiB each for Llama-3-8B at 65,536 tokens, several at once, more than the rest of the layer.
The MLP acts on every token alone, so it can run on a few thousand tokens at a time. Here the MLP of a micro-batch of
more tokens than the chunk size runs chunk by chunk without keeping anything but its input; its backward pass runs
the forward again, chunk by chunk, each chunk's forward and backward before the next (the same dropout masks, from
the same random state), and adds up the adapters' gradients, so no full tokens x intermediate tensor ever exists.
Each 4-bit weight is dequantized once per pass for all the chunks (fused_lora.dequantized_weights), not per chunk.
With compiled decoder layers (`compiled`, performance.torch_compile) each chunk runs through one compiled function
that serves every layer: eager, the MLP's elementwise work (SiLU, products, dropout, the LoRA adds) is a kernel each
over chunk x intermediate tensors, which cost an H200 18% of a Llama-2-7B step in two chunks of 2,048 tokens.

The chunked MLP saves its input through a separate function (_SaveInput) before it computes anything. Under
gradient checkpointing the layer's recomputation stops at the last tensor the layer saved (torch's early stop), which
for a layer whose MLP output only goes into the residual sum (Llama, Mistral, Qwen2) is that input: the MLP is not
run a third time just to be thrown away. Smaller micro-batches run the MLP as before, compiled with its layer.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.stages.fused_lora import dequantized_weights
from qlora.stages.model import inductor_options


def chunk_mlps(model: nn.Module, chunk_tokens: int, compiled: bool = False, round_like_eager: bool = False) -> int:
    """Run the MLP of every decoder layer in chunks of `chunk_tokens` tokens whenever it gets more, each chunk
    compiled if `compiled` (rounding like the eager code if `round_like_eager`: model.inductor_options); returns how
    many."""
    mlps = [layer.mlp for layer in model.modules()
            if isinstance(layer, GradientCheckpointingLayer) and isinstance(getattr(layer, "mlp", None), nn.Module)]
    for mlp in mlps:
        mlp.forward = types.MethodType(chunked_forward, mlp)
        mlp.qlora_chunk_tokens = chunk_tokens
        mlp.qlora_chunk_forward = _compiled_chunk_forward(round_like_eager) if compiled else _chunk_forward
    return len(mlps)


def _chunk_forward(mlp: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """The MLP's own forward on one chunk."""
    return type(mlp).forward(mlp, chunk)


@functools.cache
def _compiled_chunk_forward(round_like_eager: bool = False):
    """_chunk_forward compiled once for every layer's MLP (the modules are its arguments, as in the compiled
    decoder layers), on first use."""
    return torch.compile(_chunk_forward, options=inductor_options(round_like_eager))


def chunked_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.shape[:-1].numel() <= mlp.qlora_chunk_tokens or not torch.is_grad_enabled():
        return type(mlp).forward(mlp, x)
    return _run_in_chunks(mlp, x)


@torch.compiler.disable  # a graph break: the chunks' backward pass runs autograd itself
def _run_in_chunks(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    trained = [param for param in mlp.parameters() if param.requires_grad]
    if x.requires_grad:
        x = _SaveInput.apply(x)
    return _ChunkedMLP.apply(x, mlp, mlp.qlora_chunk_tokens, *trained)


class _SaveInput(torch.autograd.Function):
    """Saves the MLP's input for _ChunkedMLP's backward pass, before the MLP runs (module docstring)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ChunkedMLP(torch.autograd.Function):
    """mlp(x) chunk by chunk, keeping nothing; the backward pass recomputes and differentiates each chunk and returns
    the gradients of x and of the MLP's trained parameters (summed over the chunks in float32)."""

    @staticmethod
    def forward(ctx, x, mlp, chunk_tokens, *trained):
        ctx.mlp, ctx.chunk_tokens = mlp, chunk_tokens
        # the input comes from _SaveInput's saved tensor; without gradients for x it is saved here
        ctx.input_node = x.grad_fn if isinstance(x.grad_fn, _SaveInput._backward_cls) else None
        ctx.x = None if ctx.input_node is not None else x.detach()
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        flat = x.reshape(-1, x.shape[-1])
        with dequantized_weights(mlp):
            out = torch.cat([mlp.qlora_chunk_forward(mlp, chunk) for chunk in flat.split(chunk_tokens)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.input_node.saved_tensors[0] if ctx.input_node is not None else ctx.x
        trained = [param for param in ctx.mlp.parameters() if param.requires_grad]
        flat, grad_flat = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        sums = [torch.zeros_like(param, dtype=torch.float32) for param in trained]
        cpu_rng, device_rng = ctx.rng
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], device_type=x.device.type), \
                torch.autocast(x.device.type, dtype=dtype, enabled=enabled), torch.enable_grad(), \
                dequantized_weights(ctx.mlp):
            torch.set_rng_state(cpu_rng)
            if device_rng is not None:
                torch.cuda.set_rng_state(device_rng, x.device)
            for start in range(0, flat.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                chunk = flat[rows].detach().requires_grad_(grad_x is not None)
                out = ctx.mlp.qlora_chunk_forward(ctx.mlp, chunk)
                inputs = ([chunk] if grad_x is not None else []) + trained
                grads = torch.autograd.grad(out, inputs, grad_flat[rows], allow_unused=True)
                if grad_x is not None:
                    grad_x[rows], grads = grads[0], grads[1:]
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total += grad
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        return (grad_x, None, None, *[total.to(param.dtype) for total, param in zip(sums, trained)])
