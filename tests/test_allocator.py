"""performance.expandable_segments: CUDA's allocator grows its segments in place, unless the user chose otherwise."""

import pytest
import torch

from qlora.stages import allocator


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA device as far as expand_segments asks, not yet started; `settings` collects what the running
    allocator is told."""
    settings = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", settings.append, raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # records the variable's state, restored after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    return settings


def test_before_cuda_starts_the_environment_sets_it(cuda):
    import os

    assert allocator.expand_segments(True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert cuda == []  # the allocator reads the variable when CUDA starts


def test_once_cuda_runs_the_allocator_is_told(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert allocator.expand_segments(True)
    assert cuda == ["expandable_segments:True"]


def test_the_users_setting_off_and_cpu_are_left_alone(cuda, monkeypatch):
    import os

    assert not allocator.expand_segments(False) and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert not allocator.expand_segments(True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512" and cuda == []
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not allocator.expand_segments(True) and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_training_sets_it_before_the_processes_start(tiny_config, monkeypatch, tmp_path):
    """run_training calls it first, with the config's switch, before accelerate's state (which starts CUDA)."""
    from qlora import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "expand_segments", lambda enabled: calls.append(("expand", enabled)))
    monkeypatch.setattr(pipeline, "process_state", lambda: calls.append(("state",)) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline.run_training(tiny_config(f"training.output_dir={tmp_path}"))
    assert calls == [("expand", True), ("state",)]
    assert not tiny_config("performance=off").performance.expandable_segments
