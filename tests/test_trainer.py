"""The trainer stage: training.batch_size=auto (the memory planner on a GPU, a documented start on the CPU,
shrunk on out-of-memory until a step fits) and the plan logged next to the memory after the first step."""

import logging

import pytest
import torch
from trl import SFTTrainer

from qlora.config import AUTO_BATCH_SIZE_START
from qlora.pipeline import run_training
from qlora.plan import GiB, plan_memory
from qlora.stages.memory import planned_batch_size


def test_batch_size_auto_finds_the_largest_batch_that_fits(tiny_config, monkeypatch):
    training_step = SFTTrainer.training_step
    tried = []

    def fits_up_to_16(self, model, inputs, *args, **kwargs):
        tried.append(inputs["input_ids"].shape[0])
        if tried[-1] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", fits_up_to_16)
    summary = run_training(tiny_config("training.batch_size=auto", "training.max_steps=1", "eval.exact_match_samples=0"))
    # on the CPU: start at AUTO_BATCH_SIZE_START, 10% smaller after each out-of-memory, keep the first that fits
    assert tried[0] == AUTO_BATCH_SIZE_START == 64 and tried == sorted(tried, reverse=True)
    assert tried[-1] <= 16 < tried[-2]  # 64, 57, 51, ... 17, 15
    assert summary.train_loss_first is not None


def test_fixed_batch_size_is_kept(tiny_config):
    assert planned_batch_size(tiny_config("training.batch_size=3")) == 3


def test_first_step_logs_memory_next_to_the_plan(tiny_config, caplog):
    config = tiny_config("training.max_steps=2", "eval.exact_match_samples=0")
    with caplog.at_level(logging.INFO):
        run_training(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory after first step")]
    planned = plan_memory(config).training_peak / GiB
    assert len(lines) == 1 and f"(planned {planned:.2f} GiB" in lines[0]


@pytest.mark.gpu
def test_batch_size_auto_plans_the_largest_batch_that_fits_the_gpu(tiny_config):
    config = tiny_config("training.batch_size=auto", "quantization.compute_dtype=bfloat16", "model.dtype=bfloat16")
    batch = planned_batch_size(config)
    free, _ = torch.cuda.mem_get_info()
    assert plan_memory(config, batch_size=batch).training_peak <= free + torch.cuda.memory_allocated()
    assert batch > 16  # the tiny model fits far more than the tiny recipe's batch
