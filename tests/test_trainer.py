"""The trainer stage: training.batch_size=auto shrinks the batch on out-of-memory until a step fits."""

import torch
from trl import SFTTrainer

from qlora.pipeline import run_training


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
    # accelerate's search: start at 64, 10% smaller after each out-of-memory, keep the first size that fits
    assert tried[0] == 64 and tried == sorted(tried, reverse=True)
    assert tried[-1] <= 16 < tried[-2]  # 64, 57, 51, ... 17, 15
    assert summary.train_loss_first is not None
