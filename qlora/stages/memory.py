"""The memory planner in training: the batch size for training.batch_size=auto, and the plan next to
the memory actually used after the first optimizer step."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from qlora.config import AUTO_BATCH_MEMORY_MARGIN, AUTO_BATCH_SIZE_START, TrainConfig
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


class FirstStepMemory(TrainerCallback):
    """Log 'memory after first step: X GiB (planned Y GiB)' once the first optimizer step is done."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.logged = False

    def on_step_end(self, args, state, control, **kwargs):
        from qlora.stages.trainer import peak_memory_gib

        if self.logged or not state.is_world_process_zero:
            return
        self.logged = True
        batch = state.train_batch_size or args.per_device_train_batch_size
        planned = plan_memory(self.config, batch_size=batch).training_peak / GiB
        where = "" if torch.cuda.is_available() else " on a GPU; here the process's peak resident memory"
        log.info("memory after first step: %.2f GiB (planned %.2f GiB%s)", peak_memory_gib(), planned, where)
