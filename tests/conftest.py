"""Shared fixtures: configs composed exactly as the CLI composes them, written into tmp folders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch
from preloaded_python import python_argv, run_python

from qlora.config import TrainConfig
from qlora.compose import compose_config

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
# set by in-process runs of this session: their run folders (direct_loggers_to) and wandb's service, which a
# child process would otherwise share (its files then written by this process, later)
LOGGER_ENV = ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "MLFLOW_TRACKING_URI", "WANDB_SERVICE")


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., TrainConfig]:
    """compose_config for the tiny recipe, writing its run folder under tmp_path."""

    def make(*overrides: str) -> TrainConfig:
        return compose_config([f"training.output_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def default_job(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The tiny recipe's full run as a user types it (held-out exact match 30/32), shared by the test of what it
    prints and writes and by the tests that use a finished run: merge, generate, evaluate."""
    folder = tmp_path_factory.mktemp("default-job")
    result = run_cli("+recipe=tiny", "training.output_dir=run", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, folder / "run"


@pytest.fixture(scope="session")
def trained_run(default_job) -> tuple[TrainConfig, Path]:
    """The default job's config, as the CLI composes it, and its run folder."""
    _, run_dir = default_job
    return compose_config([f"training.output_dir={run_dir}"]), run_dir


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The tiny DPO recipe run as the docs show it, shared by the tests that use a finished DPO run."""
    folder = tmp_path_factory.mktemp("dpo")
    result = run_cli("+recipe=tiny_dpo", "training.output_dir=run", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, folder / "run"


def run_cli(*args: str, cwd: Path, command: str = "qlora.train", input: str | None = None,
            env: dict[str, str | None] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m COMMAND ARGS` (`python COMMAND ARGS` for a script) as a user types it, from `cwd`, with `input`
    as what they type next; `env` changes the environment (None removes a variable, e.g. HF_HUB_OFFLINE, which is
    set otherwise). On a machine without a GPU, the process is forked from one that has imported the libraries in
    the same environment (preloaded_python.py; a new one where the environment changes)."""
    changed = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in LOGGER_ENV:
        changed.pop(name, None)
    full_env = {name: value for name, value in changed.items() if value is not None}
    # a new Python on a GPU machine: the libraries initialise CUDA as they are imported, and CUDA cannot be
    # initialised again in a forked process
    if not torch.cuda.is_available():
        return run_python(command, list(args), cwd, full_env, input, timeout)
    return subprocess.run(
        python_argv(command, list(args)), cwd=cwd, env=full_env, input=input, capture_output=True, text=True,
        timeout=timeout,
    )


# what the libraries print that a quiet command must not: progress bars, notices, printed metric dicts
LIBRARY_NOISE = ("it/s]", "examples/s]", "FutureWarning", "pin_memory", "gemm_4bit_forward", "{'loss'", "{'eval_loss'")


def library_noise(result: subprocess.CompletedProcess) -> list[str]:
    return [noise for noise in LIBRARY_NOISE if noise in result.stdout + result.stderr]


def run_with_fault(fault: str, step: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run qlora.train ARGS with a fault injected at `step` (see tests/fault_injection.py), a process of its own."""
    script = Path(__file__).resolve().parent / "fault_injection.py"
    return run_cli(fault, str(step), *args, cwd=cwd, command=str(script))


def tiny_lora_model(config: TrainConfig, fused: bool = True, keep_for_backward: bool = False,
                    checkpointing: bool = True):
    """The tiny model of `config` with LoRA (B random, so that every LoRA term shows in the gradients), prepared for
    k-bit training with or without gradient checkpointing, in training mode."""
    from qlora.stages.adapters import attach_lora
    from qlora.stages.model import frozen_weights_dtype, load_quantized_model, prepare_for_kbit_training

    torch.manual_seed(0)
    model = load_quantized_model(config.model, config.quantization, torch.device("cpu"))
    dtype = frozen_weights_dtype(config.performance, config.quantization)
    model = attach_lora(prepare_for_kbit_training(model, checkpointing, dtype), config.lora, fused=fused,
                        keep_for_backward=keep_for_backward)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide every LoRA term but A's gradient
            param.data.normal_(0, 0.05)
    return model.train()
