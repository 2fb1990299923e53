"""The trainer stage: training.batch_size=auto (the memory planner on a GPU, a documented start on the CPU,
shrunk on out-of-memory until a step fits), the plan logged next to the memory after the first step, and
metrics going to the loggers of training.report_to."""

import json
import logging
from pathlib import Path

import pytest
import torch
from trl import SFTTrainer

from conftest import run_cli
from qlora.config import AUTO_BATCH_SIZE_START
from qlora.errors import QLoRAError
from qlora.pipeline import run_training
from qlora.plan import GiB, plan_memory
from qlora.stages.memory import planned_batch_size


def test_batch_size_auto_finds_the_largest_batch_that_fits(tiny_config, monkeypatch):
    training_step = SFTTrainer.training_step
    tried = []

    def fits_up_to_48(self, model, inputs, *args, **kwargs):
        tried.append(inputs["input_ids"].shape[0])
        if tried[-1] > 48:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", fits_up_to_48)
    summary = run_training(tiny_config("training.batch_size=auto", "training.max_steps=1", "eval.exact_match_samples=0"))
    # on the CPU: start at AUTO_BATCH_SIZE_START, 10% smaller after each out-of-memory, keep the first that fits
    assert tried[0] == AUTO_BATCH_SIZE_START == 64 and tried == sorted(tried, reverse=True)
    assert tried == [64, 57, 51, 45]
    assert summary.train_loss_first is not None


def test_fixed_batch_size_is_kept(tiny_config):
    assert planned_batch_size(tiny_config("training.batch_size=3")) == 3


def test_first_step_logs_memory_next_to_the_plan(tiny_config, caplog):
    config = tiny_config("training.max_steps=2", "eval.exact_match_samples=0")
    with caplog.at_level(logging.INFO):
        run_training(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory after first step:")]
    planned = plan_memory(config).training_peak / GiB
    assert len(lines) == 1 and f"(planned {planned:.2f} GiB" in lines[0]


@pytest.mark.gpu
def test_batch_size_auto_plans_the_largest_batch_that_fits_the_gpu(tiny_config):
    config = tiny_config("training.batch_size=auto", "quantization.compute_dtype=bfloat16", "model.dtype=bfloat16")
    batch = planned_batch_size(config)
    free, _ = torch.cuda.mem_get_info()
    assert plan_memory(config, batch_size=batch).training_peak <= free + torch.cuda.memory_allocated()
    assert batch > 16  # the tiny model fits far more than the tiny recipe's batch
def _logged_losses(run_dir):
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_metrics_go_to_tensorboard_by_default(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config("training.max_steps=3", "training.logging_steps=1", "eval.exact_match_samples=0")
    assert config.training.report_to == ["tensorboard"]
    run_dir = Path(run_training(config).run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    written = events.Scalars("train/loss")
    assert [event.step for event in written] == [1, 2, 3]
    assert [event.value for event in written] == pytest.approx(_logged_losses(run_dir), rel=1e-6)
    assert len(events.Scalars("train/learning_rate")) == 3


def test_wandb_and_mlflow_write_offline_into_the_run_folder(tmp_path, monkeypatch):
    # A fresh process, as users run it: within one process, an earlier run's MLflowCallback (transformers)
    # ends the active MLflow run whenever it is garbage-collected.
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run_cli("training.output_dir=run", "training.max_steps=2", "training.logging_steps=1",
                     "eval.exact_match_samples=0", "training.report_to=[wandb,mlflow]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    losses = _logged_losses(run_dir)
    # MLflow's file store: one "<time> <value> <step>" line per logged value
    (loss_file,) = (run_dir / "mlruns").glob("*/*/metrics/loss")
    assert [float(line.split()[1]) for line in loss_file.read_text().splitlines()] == pytest.approx(losses)
    # wandb's offline run file (protobuf records) holds each logged loss as JSON text
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert all(json.dumps(loss).encode() in wandb_file.read_bytes() for loss in losses)
    assert not (run_dir / "tensorboard").exists()


def test_report_to_names_a_missing_package_with_the_fix(tiny_config, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(QLoRAError, match=r"training.report_to includes wandb, but wandb is not installed: `pip install wandb`"):
        tiny_config("training.report_to=wandb")
    with pytest.raises(QLoRAError, match="training.report_to=comet is not supported"):
        tiny_config("training.report_to=[tensorboard,comet]")
    assert tiny_config("training.report_to=none").training.report_to == "none"


def test_training_that_raises_puts_back_the_lm_head_and_the_embedding_table(tiny_config, tmp_path, monkeypatch):
    """on_train_end does not run when training raises: TRL's LM head function and the input embedding table's
    place, changed for training, are put back all the same (a notebook or a benchmark goes on in the process)."""
    import trl.trainer.utils
    from trl.kernels import ChunkedLogProbFunction

    from qlora.stages import trainer as trainer_stage
    from qlora.stages.lm_head import LMHeadGradientInForward, LogProbsWithGradient

    monkeypatch.setattr(trainer_stage, "keeps_embeddings_on_host", lambda *args, **kwargs: True)
    seen = {}

    def fail(self, args, state, control, model=None, **kwargs):
        seen["head"] = trl.trainer.utils._ChunkedLogProbFunction
        seen["embedding"] = model.get_input_embeddings()
        seen["host"] = seen["embedding"].qlora_host
        raise RuntimeError("a failing step")

    monkeypatch.setattr(LMHeadGradientInForward, "on_step_end", fail, raising=False)
    with pytest.raises(RuntimeError, match="a failing step"):
        run_training(tiny_config("training.max_steps=3", f"training.output_dir={tmp_path}"))
    assert seen["head"] is LogProbsWithGradient and seen["host"] is not None  # as training left them
    assert trl.trainer.utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert seen["embedding"].qlora_host is None
