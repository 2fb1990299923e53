"""Faults turned into clear errors: signals, NaN/inf steps, out of memory, a full or unwritable disk."""

import errno
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Trainer, TrainerState
from trl import SFTTrainer

import qlora.pipeline
from conftest import run_with_fault
from qlora.errors import QLoRAError
from qlora.pipeline import run_training
from qlora.stages import disk_space, faults
from qlora.stages.artifacts import prepare_run_dir

FAST = ("training.batch_size=4", "training.logging_steps=1", "eval.exact_match_samples=0")


def test_sigterm_saves_a_checkpoint_at_the_step_end_and_exits_nonzero(tmp_path):
    result = run_with_fault("sigterm", 2, *FAST, "training.max_steps=50", "training.output_dir=run", cwd=tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "training stopped by SIGTERM after step 2" in result.stderr
    assert "Resume with: python -m qlora.train" in result.stderr and "training.resume=auto" in result.stderr
    assert "Traceback" not in result.stderr
    checkpoint = tmp_path / "run/checkpoints/checkpoint-2"  # saved although training.save_steps=0
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (tmp_path / "run/adapter").exists()  # an interrupted run is not passed off as finished


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(faults.os, "_exit", exits.append)
    stop = faults.StopOnSignal()
    with stop.finishing_first("saving a checkpoint at the end of this step"):
        stop._handle(signal.SIGINT, None)
        assert stop.received == signal.SIGINT and exits == []  # the first one only asks to stop at the step end
        stop._handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_a_signal_in_start_up_stops_at_once_with_the_stage_and_the_resume_command(tmp_path):
    result = run_with_fault("sigterm-in-start-up", 0, *FAST, "training.output_dir=run", cwd=tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert ("qlora: error: training stopped by SIGTERM in stage 'quantized model'; nothing was trained yet. "
            "Resume with: python -m qlora.train") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run/adapter.partial").exists() and not (tmp_path / "run/checkpoints").exists()


def test_a_signal_while_the_adapter_is_saved_lets_the_run_finish(tmp_path):
    result = run_with_fault("sigterm-in-final-save", 0, *FAST, "training.max_steps=2", "training.output_dir=run",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SIGTERM received: finishing the run first" in result.stdout
    assert "SIGTERM arrived while the run was finishing; it finished first" in result.stdout
    run_dir = tmp_path / "run"
    assert not (run_dir / "adapter.partial").exists()
    assert (run_dir / "adapter/adapter_model.safetensors").is_file() and (run_dir / "adapter/tokenizer.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2 and (run_dir / "report.md").is_file()


def test_signal_handlers_are_restored_after_training():
    before = signal.getsignal(signal.SIGTERM)
    with faults.StopOnSignal().handling_signals():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def nan_loss_at_steps(monkeypatch, *steps: int) -> None:
    compute_loss = SFTTrainer.compute_loss

    def with_nan(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * math.nan if self.state.global_step + 1 in steps else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", with_nan)


# the tiny recipe's optimizer, checked before its update, and the fused one (the GPU recipes'), checked a step later
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused"]


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_nan_loss_stops_with_step_checkpoint_and_causes(tiny_config, monkeypatch, optim):
    nan_loss_at_steps(monkeypatch, 3)
    with pytest.raises(QLoRAError) as error:
        run_training(tiny_config(*FAST, "training.max_steps=4", "training.save_steps=2", f"training.optim={optim}"))
    message = str(error.value)
    assert "training stopped at step 3" in message and "NaN/inf" in message
    assert "checkpoints/checkpoint-2" in message
    assert "float16 overflow" in message and "training.lr" in message and "training.on_nonfinite=skip" in message


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_nan_loss_step_is_skipped_when_asked_and_counted(tiny_config, monkeypatch, optim):
    nan_loss_at_steps(monkeypatch, 2)
    summary = run_training(tiny_config(*FAST, "training.max_steps=3", "training.on_nonfinite=skip",
                                       "training.max_skipped_fraction=0.5", f"training.optim={optim}"))
    weights = load_file(Path(summary.adapter_dir) / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    run_dir = Path(summary.run_dir)
    assert "step 2: NaN/inf loss or gradients; skipped" in (run_dir / "train.log").read_text()
    # transformers keeps the NaN out of the logged losses (skipping runs keep its host check, stopping ones not)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if math.isfinite(row["loss"])] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 1
    assert "| skipped steps (NaN/inf) | 1 of 3 |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_a_resumed_run_counts_the_steps_skipped_before_its_checkpoint(tiny_config, monkeypatch, optim):
    nan_loss_at_steps(monkeypatch, 2)  # the step of the checkpoint: the fused optimizer's verdict is read before it
    skipping = (*FAST, "training.save_steps=2", "training.on_nonfinite=skip", "training.max_skipped_fraction=0.5",
                f"training.optim={optim}")
    run_training(tiny_config(*skipping, "training.max_steps=2"))
    summary = run_training(tiny_config(*skipping, "training.max_steps=4", "training.resume=auto"))
    assert (summary.steps, summary.skipped_steps) == (4, 1)


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_a_run_that_skips_more_than_its_share_of_steps_fails_and_keeps_its_checkpoint(tiny_config, monkeypatch,
                                                                                     optim):
    nan_loss_at_steps(monkeypatch, 3, 4, 5)
    config = tiny_config(*FAST, "training.max_steps=10", "training.save_steps=2", "training.on_nonfinite=skip",
                         "training.max_skipped_fraction=0.2", f"training.optim={optim}")
    with pytest.raises(QLoRAError) as error:
        run_training(config)
    checkpoint = Path(config.training.output_dir) / "checkpoints/checkpoint-4"  # with step 4's update skipped
    # two skips of ten steps are allowed; the fused optimizer's verdict reaches the host a step later
    assert str(error.value).startswith("training stopped at step 5: 3 steps had NaN/inf loss or gradients and were "
                                       "skipped, more than training.max_skipped_fraction=0.2 of the run's 10 steps")
    assert f"last checkpoint: {checkpoint}." in str(error.value)
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint.parent.parent / "adapter").exists()  # a failing run is not passed off as finished


def test_only_a_run_that_skips_nonfinite_steps_reads_every_loss_on_the_host(tiny_config, tmp_path):
    from qlora.stages.trainer import build_sft_config

    assert build_sft_config(tiny_config("training.on_nonfinite=skip"), tmp_path).logging_nan_inf_filter
    assert not build_sft_config(tiny_config("training.on_nonfinite=stop"), tmp_path).logging_nan_inf_filter


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_one_nonfinite_gradient_element_is_caught(tmp_path, bad):
    """The guard checks every gradient through their total norm: one NaN/inf element anywhere is enough."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e30)  # large but finite: still a finite total norm in float32
    args, state = type("Args", (), {"device": torch.device("cpu")})(), type("State", (), {"global_step": 6})()
    guard = faults.NonFiniteGuard("stop", tmp_path, 1e-4, 0.1)
    guard.on_pre_optimizer_step(args, state, None, model=model)  # finite: nothing happens
    model[1].bias.grad[1] = bad
    with pytest.raises(QLoRAError, match="training stopped at step 7"):
        guard.on_pre_optimizer_step(args, state, None, model=model)


class FusedAdamWSteps:
    """Optimizer steps of a small model under the guard, with torch's fused AdamW (it takes the verdict itself)."""

    def __init__(self, action: str, tmp_path: Path):
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1, fused=True)
        self.guard = faults.NonFiniteGuard(action, tmp_path, 0.1, max_skipped_fraction=0.5)
        self.args = type("Args", (), {"device": torch.device("cpu")})()
        self.guard.on_train_begin(self.args, TrainerState(max_steps=10), None)
        self.step = 0

    def take(self, bad: float = 1.0) -> None:
        for param in self.model.parameters():
            param.grad = torch.ones_like(param)
        self.model.bias.grad[1] = bad
        state = type("State", (), {"global_step": self.step})()
        self.guard.on_pre_optimizer_step(self.args, state, None, model=self.model, optimizer=self.optimizer)
        self.optimizer.step()
        self.step += 1

    def snapshot(self) -> list[torch.Tensor]:
        state = [t for s in self.optimizer.state.values() for t in s.values()]
        return [t.detach().clone() for t in [*self.model.parameters(), *state]]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_with_a_fused_optimizer_a_nonfinite_update_is_skipped_and_stops_the_run_a_step_later(tmp_path, bad):
    steps = FusedAdamWSteps("stop", tmp_path)
    steps.take()
    before = steps.snapshot()
    steps.take(bad)  # the host has not waited for the verdict: no error yet, but the optimizer skipped the update
    assert all(torch.equal(a, b) for a, b in zip(before, steps.snapshot()))  # weights, moments and step count
    with pytest.raises(QLoRAError, match="training stopped at step 2: .*weights were not updated"):
        steps.guard.on_train_end(steps.args, None, None)  # or the next step's check, whichever comes first


def test_with_a_fused_optimizer_skipped_steps_are_counted_and_training_goes_on(tmp_path):
    steps = FusedAdamWSteps("skip", tmp_path)
    steps.take()
    steps.take(math.nan)
    before = steps.snapshot()
    steps.take()
    assert steps.guard.skipped_steps == [2]
    assert not torch.equal(before[0], steps.model.weight) and torch.isfinite(steps.model.weight).all()


def test_out_of_memory_names_the_stage_and_the_fix(tiny_config, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(qlora.pipeline, "load_quantized_model", out_of_memory)
    with pytest.raises(QLoRAError, match="out of GPU memory in stage 'quantized model'") as error:
        run_training(tiny_config())
    for fix in ("training.batch_size", "data.max_length", "training.gradient_checkpointing=true"):
        assert fix in str(error.value)


def test_too_little_disk_space_is_refused_before_training(tiny_config, monkeypatch):
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1024})())
    with pytest.raises(QLoRAError, match="not enough disk space in training.output_dir=.*GiB free"):
        run_training(tiny_config(*FAST))


def save_fails_at_step(monkeypatch, step: int, error: Exception, free_after: int) -> None:
    """The disk has room until the save of `step`, which fails with `error`, leaving `free_after` bytes free."""
    free = {"bytes": 2**40}
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free["bytes"]})())
    save_rng_state = Trainer._save_rng_state

    def fail_at_step(self, output_dir):
        if self.state.global_step == step:
            free["bytes"] = free_after
            raise error
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", fail_at_step)


# what a full disk raises: an OSError from Python's own writes; from torch.save only its zip writer's complaint
DISK_FULL = {"oserror": OSError(errno.ENOSPC, "No space left on device"),
             "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 255872 vs 255760")}


@pytest.mark.parametrize("error", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_full_disk_during_a_save_says_so_first_and_keeps_the_previous_checkpoint(tiny_config, monkeypatch, error):
    save_fails_at_step(monkeypatch, 4, error, free_after=3 * 2**20)
    config = tiny_config(*FAST, "training.max_steps=4", "training.save_steps=2")
    checkpoints = Path(config.training.output_dir) / "checkpoints"
    with pytest.raises(QLoRAError) as raised:
        run_training(config)
    assert str(raised.value).startswith(f"no space left on {checkpoints} (3.0 MiB free) while saving the checkpoint of "
                                        f"step 4. Nothing was lost: the previous checkpoint {checkpoints}/checkpoint-2 "
                                        f"is intact.")
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.endswith(".md")) == ["checkpoint-2"]
    assert (checkpoints / "checkpoint-2/adapter_model.safetensors").is_file()


def test_a_failed_save_with_space_left_names_the_error(tiny_config, monkeypatch):
    save_fails_at_step(monkeypatch, 2, PermissionError(errno.EACCES, "Permission denied"), free_after=2**40)
    with pytest.raises(QLoRAError, match=r"could not save the checkpoint of step 2 in .*Permission denied.*none yet"):
        run_training(tiny_config(*FAST, "training.max_steps=2", "training.save_steps=2"))


def test_a_full_disk_while_saving_the_adapter_says_so_and_leaves_no_partial_folder(tiny_config, monkeypatch):
    config = tiny_config(*FAST, "training.max_steps=2", "training.save_steps=2")
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**40})())
    save_pretrained = PeftModel.save_pretrained

    def disk_full_in_the_run_folder(self, folder, *args, **kwargs):
        if Path(folder).name == "adapter.partial":
            monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**20})())
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_pretrained(self, folder, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full_in_the_run_folder)
    with pytest.raises(QLoRAError) as raised:
        run_training(config)
    run_dir = Path(config.training.output_dir)
    assert str(raised.value).startswith(f"no space left on {run_dir} (1.0 MiB free) while saving the adapter; the "
                                        f"checkpoints in {run_dir / 'checkpoints'} are kept.")
    assert not (run_dir / "adapter.partial").exists() and not (run_dir / "adapter").exists()
    assert (run_dir / "checkpoints/checkpoint-2/adapter_model.safetensors").is_file()


def test_unwritable_output_folder_is_a_clear_error(tiny_config, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(QLoRAError, match="cannot write to training.output_dir=.*Permission denied"):
        prepare_run_dir(tiny_config())
