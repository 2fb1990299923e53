"""CUDA's caching allocator with expandable segments: `performance.expandable_segments`.

torch's caching allocator reserves GPU memory in segments and hands out blocks from them; a freed block stays
reserved and serves later requests that fit in it. Long sequences allocate tensors of gigabytes (4.3 GiB, 32 KiB
a token, at 139,264 tokens of Llama-3-8B) between many smaller ones, and a large request can find no free range
big enough inside the reserved segments while the process is at its cap: under a 24 GiB cap qlora
ran out of memory at 139,264 tokens with 18.6 GiB allocated and 4.3 GiB requested, the rest of the 22.7 GiB reserved
in pieces (scripts/benchmarks/results/2026-11-29-h200-session4.md, call 1). With expandable segments a segment grows
in place by mapping more pages, so freed memory is reused whatever its place (PyTorch's documented
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`; unsloth sets it too).

A PYTORCH_CUDA_ALLOC_CONF the user set is left as it is.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

SETTING = "expandable_segments:True"


def expand_segments(enabled: bool) -> bool:
    """Turn on expandable segments for this process's CUDA allocations unless off, not on CUDA, or the user set
    PYTORCH_CUDA_ALLOC_CONF; returns whether it did. Before CUDA starts the environment variable does it (and
    reaches the processes started from this one); once started, the allocator's own setting (new segments)."""
    if not enabled or "PYTORCH_CUDA_ALLOC_CONF" in os.environ or not torch.cuda.is_available():
        return False
    if torch.cuda.is_initialized():
        set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
        if set_settings is None:
            set_settings = torch.cuda.memory._set_allocator_settings
        set_settings(SETTING)
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = SETTING
    log.info("performance.expandable_segments: CUDA memory in expandable segments (%s)", SETTING)
    return True
