"""The input embedding table in host memory while training: `performance.embeddings_on_host`.

The input embeddings are frozen and only looked up: a step reads one row per token out of a vocabulary x hidden
size table that otherwise sits in GPU memory for the whole run (0.24 GiB for Llama-2-7B, 0.98 GiB for Llama-3-8B's
128k vocabulary, in bf16). Here the table goes to host memory when training starts; each forward pass looks its
tokens up there, into pinned memory, and copies only those rows to the GPU (tokens x hidden size, asynchronously).

Only while the Trainer trains (on_train_begin to on_train_end): transformers takes a model's device from its first
parameter, the input embeddings, so generation with the table on the host would run on the CPU. Generation during
training (the held-out check) puts the table back for its duration (`on_device`). Applies to a frozen, untied
`nn.Embedding` (an output layer sharing the table reads all of it every step; a trained one needs its gradient on
the GPU; subclasses such as scaled embeddings have forwards of their own) in a single process on a GPU.
"""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from qlora.config import TrainConfig

log = logging.getLogger(__name__)


def keeps_embeddings_on_host(config: TrainConfig, on_gpu: bool, processes: int = 1) -> bool:
    """performance.embeddings_on_host applies on a GPU in a single process (unmeasured across processes)."""
    return config.performance.embeddings_on_host and on_gpu and processes == 1


def movable_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    """The model's input embeddings where the table can live on the host, else None (see the module docstring)."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if (type(embedding) is not nn.Embedding or embedding.weight.requires_grad or embedding.max_norm is not None
            or (output is not None and output.weight is embedding.weight)):
        return None
    return embedding


def move_to_host(embedding: nn.Embedding, host: torch.device = torch.device("cpu")) -> None:
    """Keep `embedding`'s table on `host`; its lookups still return rows on the device the table was on."""
    if getattr(embedding, "qlora_device", None) is None:
        embedding.qlora_device = embedding.weight.device
        embedding.forward = types.MethodType(_looked_up_on_host, embedding)
    embedding.to(host)
    embedding.qlora_host = host


def move_back(embedding: nn.Embedding) -> None:
    """The table back on its device, as loaded."""
    embedding.to(embedding.qlora_device)
    embedding.qlora_host = None


@contextmanager
def on_device(model: nn.Module) -> Iterator[None]:
    """The input embedding table on the model's device within (generation reads the model's device from it)."""
    embedding = model.get_input_embeddings()
    host = getattr(embedding, "qlora_host", None)
    if host is None:
        yield
        return
    move_back(embedding)
    try:
        yield
    finally:
        move_to_host(embedding, host)


def _looked_up_on_host(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if self.qlora_host is None:  # on its device (on_device, or after training)
        return F.embedding(ids, weight, self.padding_idx)
    rows = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, device=weight.device,
                       pin_memory=self.qlora_device.type == "cuda")
    # the token ids come to the host first, a wait for the GPU to reach this step: 1% of Llama-2-7B's tokens/s at
    # 2 x 2048 on an H200, with the gather and the copy (scripts/benchmarks/results/2026-11-29-h200-session2.md)
    torch.index_select(weight, 0, ids.to(weight.device).reshape(-1), out=rows)
    return rows.view(*ids.shape, weight.shape[1]).to(self.qlora_device, non_blocking=True)


class EmbeddingsOnHost(TrainerCallback):
    """The input embedding table on the host from the start of training to its end (move_to_host, move_back)."""

    def __init__(self):
        self.embedding: Optional[nn.Embedding] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.embedding = movable_embedding(model)
        if self.embedding is None:
            log.info("performance.embeddings_on_host: the input embeddings stay on the GPU (tied to the output layer, "
                     "trained, or not a plain embedding)")
            return
        move_to_host(self.embedding)
        table = self.embedding.weight
        log.info("performance.embeddings_on_host: the input embedding table (%.2f GiB) is looked up in host memory",
                 table.numel() * table.element_size() / 2**30)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """The table back on its device (also when training raised: trainer.restoring_on_error)."""
        if self.embedding is not None and getattr(self.embedding, "qlora_host", None) is not None:
            move_back(self.embedding)
