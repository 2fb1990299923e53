"""The memory planner in training: the batch size for training.batch_size=auto, and the expected peak
shown in the start-up summary next to the memory actually used after the first step."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from qlora.config import AUTO_BATCH_MEMORY_MARGIN, AUTO_BATCH_SIZE_START, TrainConfig
from qlora.errors import QLoRAError
from qlora.plan import GiB, largest_batch, plan_memory

log = logging.getLogger(__name__)


def planned_batch_size(config: TrainConfig) -> int:
    """training.batch_size=auto: the largest batch whose planned peak fits this GPU's memory, less a margin.

    transformers' auto_find_batch_size then confirms it with the real steps and shrinks it by 10% on
    out-of-memory. On the CPU there is no device memory to fit: AUTO_BATCH_SIZE_START is the start.
    """
    if config.training.batch_size != "auto":
        return config.training.batch_size
    if not torch.cuda.is_available():
        log.info("training.batch_size=auto on the CPU: starting at %d (nothing to plan against)", AUTO_BATCH_SIZE_START)
        return AUTO_BATCH_SIZE_START
    free, _ = torch.cuda.mem_get_info()
    # the plan counts the loaded model too, so its memory is part of the budget
    available = free + torch.cuda.memory_allocated()
    plan = plan_memory(config, batch_size=1)
    budget = int(available * (1 - AUTO_BATCH_MEMORY_MARGIN)) - plan.paged_optimizer
    batch = max(largest_batch(config, budget), 1)
    log.info("training.batch_size=auto: %d, the largest batch whose planned peak (%.2f GiB) fits %.2f GiB "
             "(%.0f%% of the %.2f GiB available)", batch, plan_memory(config, batch_size=batch).training_peak / GiB,
             budget / GiB, 100 * (1 - AUTO_BATCH_MEMORY_MARGIN), available / GiB)
    return batch


def expected_training_peak(config: TrainConfig, batch_size: int) -> Optional[float]:
    """The planner's training peak in GiB for this batch, or None when the model's architecture cannot be
    planned (e.g. remote code the meta device cannot build): the run goes on without an estimate."""
    try:
        return plan_memory(config, batch_size=batch_size).training_peak / GiB
    except (QLoRAError, ValueError, KeyError, AttributeError) as error:
        log.warning("no memory estimate for %s: %s", config.model.name_or_path, error)
        return None
