"""Gradient checkpoints in pinned host memory: `performance.offload_checkpoints`.

Under gradient checkpointing each decoder layer keeps only its input for the backward pass, which recomputes the
layer from it; those inputs are what grows with the sequence (layers x tokens x hidden size: 16 GiB for Llama-3-8B
at 65,536 tokens). Here the input of every layer but the last is copied to pinned host memory as soon as the
forward pass has written it, on a stream of its own, so the copy overlaps the next layers' work and the GPU copy is
freed. The backward pass needs the inputs in the reverse order; while one layer is recomputed and differentiated,
the input of the layer before it is already copied back, so the GPU seldom waits for a copy. The last layer's input
stays on the GPU: the backward pass needs it at once, and its backward pass covers the copy of the one before.

Only the checkpoint's saved inputs pass through these hooks: inside a checkpointed layer torch's own hooks (which
discard what the layer saves) take precedence, and nothing outside a layer's checkpoint call sees them. The Trainer
sets every layer's checkpoint function when training starts, so the wrapping happens then (OffloadCheckpoints).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.config import TrainConfig

log = logging.getLogger(__name__)

# a layer input smaller than this is left where it is: the copies would cost more than the memory they free
MIN_OFFLOAD_BYTES = 1 << 20


def offloads_checkpoints(config: TrainConfig, on_gpu: bool, sharded: bool = False) -> bool:
    """performance.offload_checkpoints applies under gradient checkpointing on a GPU; not under FSDP (unmeasured)."""
    return (config.performance.offload_checkpoints and config.training.gradient_checkpointing and on_gpu
            and not sharded)


class OffloadCheckpoints(TrainerCallback):
    """Wrap each checkpointed layer's checkpoint function, when the Trainer has set it, so that the layer's saved
    input goes to host memory (CheckpointInputs). Applies on CUDA only: elsewhere there is no device memory to free."""

    def __init__(self, offload: Optional["CheckpointInputs"] = None):
        self.offload = offload or CheckpointInputs()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        for index, layer in enumerate(layers):
            keep = index == len(layers) - 1
            layer._gradient_checkpointing_func = self.offload.wrap(layer._gradient_checkpointing_func, keep)
        log.info("performance.offload_checkpoints: the inputs of %d of %d checkpointed layers go to host memory",
                 max(len(layers) - 1, 0), len(layers))


class CheckpointInputs:
    """saved_tensors_hooks for the inputs the checkpoints save, in the order the forward pass saves them: each goes
    to pinned host memory on a copy stream (`keep`: stays where it is), and comes back when the backward pass
    unpacks it, which also starts copying back the one saved before it (the next one the backward pass needs).
    `devices`: the device types whose tensors are moved (tests move CPU tensors to exercise the bookkeeping)."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES, devices: tuple[str, ...] = ("cuda",)):
        self.min_bytes, self.devices = min_bytes, devices
        self.saved: list[Optional[_Saved]] = []  # this forward pass's, in order
        self.backward_started = False
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def wrap(self, checkpoint: Callable, keep: bool = False) -> Callable:
        """`checkpoint` (transformers' partial of torch's checkpoint) with its inputs saved through these hooks."""
        if getattr(checkpoint, "qlora_offload_wraps", None) is not None:  # the Trainer kept an earlier wrapping
            checkpoint = checkpoint.qlora_offload_wraps

        @functools.wraps(checkpoint)
        @torch.compiler.disable  # hooks are set outside any compiled region, around the checkpoint
        def offloaded(function, *args, **kwargs):
            pack = functools.partial(self.pack, keep=keep)
            with torch.autograd.graph.saved_tensors_hooks(pack, self.unpack):
                return checkpoint(function, *args, **kwargs)

        offloaded.qlora_offload_wraps = checkpoint
        return offloaded

    def pack(self, tensor: torch.Tensor, keep: bool = False) -> object:
        if (tensor.device.type not in self.devices or isinstance(tensor, nn.Parameter)
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        if self.backward_started:  # a new forward pass: the earlier one's entries are all unpacked or dropped
            self.saved, self.backward_started = [], False
        index = len(self.saved)
        saved = _Kept(tensor, index) if keep else _Saved(tensor, index, self._stream(tensor.device))
        self.saved.append(saved)
        return saved

    def unpack(self, saved: object) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        self.backward_started = True
        tensor = saved.fetch()
        self.saved[saved.index] = None  # the saved tensor itself holds it until the layer's backward ends
        earlier = self.saved[saved.index - 1] if saved.index > 0 else None
        if earlier is not None:
            earlier.prefetch()
        return tensor

    def _stream(self, device: torch.device) -> Optional[torch.cuda.Stream]:
        if device.type != "cuda":
            return None
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]


class _Kept:
    """A saved input left on its device; unpacking it starts copying back the one saved before it."""

    def __init__(self, tensor: torch.Tensor, index: int):
        self.tensor, self.index = tensor, index

    def fetch(self) -> torch.Tensor:
        tensor, self.tensor = self.tensor, None
        return tensor

    def prefetch(self) -> None:
        pass


class _Saved:
    """One input in pinned host memory: copied there on `stream` after the work that wrote it, and back on the same
    stream (so after that copy), into memory of the stream's own pool, which the compute stream then waits for."""

    def __init__(self, tensor: torch.Tensor, index: int, stream: Optional[torch.cuda.Stream]):
        self.index, self.device, self.stream = index, tensor.device, stream
        self.back: Optional[torch.Tensor] = None
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=stream is not None)
        if stream is None:
            self.host.copy_(tensor)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the forward pass has written it
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it

    def prefetch(self) -> None:
        if self.back is not None or self.host is None:
            return
        if self.stream is None:
            self.back = self.host.clone()
        else:
            with torch.cuda.stream(self.stream):
                self.back = self.host.to(self.device, non_blocking=True)
        self.host = None

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        tensor, self.back = self.back, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            tensor.record_stream(compute)  # allocated on the copy stream, used and freed on the compute stream
        return tensor
