"""The whole pipeline in-process on the tiny recipe: pinned first losses, files, learning."""

import json
from pathlib import Path

import yaml

import pytest

from qlora.config import compose_config
from qlora.pipeline import run_training

# The tiny recipe's first four losses on the CPU (seed 42, batch 16). A change that alters the
# numerics (data formatting, masking, quantization, LoRA init, optimizer) fails here loudly.
PINNED_FIRST_LOSSES = [6.764, 6.7784, 4.7908, 3.4158]


def test_first_losses_are_pinned(tiny_config):
    config = tiny_config("training.max_steps=4", "training.logging_steps=1", "eval.exact_match_samples=0")
    run_training(config)
    rows = [json.loads(line) for line in open(f"{config.training.output_dir}/metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == pytest.approx(PINNED_FIRST_LOSSES, abs=2e-3)


def test_run_folder_holds_config_metrics_adapter_and_summary(tiny_config):
    config = tiny_config("training.max_steps=30", "eval.exact_match_samples=8")
    summary = run_training(config)
    run_dir = Path(summary.run_dir)
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "train.log",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == 30
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib"} <= rows[-1].keys()
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["peak_memory_gib"] > 0
    assert summary.train_loss_last < summary.train_loss_first / 2
    assert summary.exact_match_before == 0.0
    assert summary.exact_match_after > summary.exact_match_before
    assert json.loads(open(f"{run_dir}/summary.json").read())["exact_match_after"] == summary.exact_match_after


def test_same_seed_and_config_give_the_same_losses(tmp_path):
    overrides = ["training.max_steps=3", "training.batch_size=4", "training.logging_steps=1", "eval.exact_match_samples=0"]
    losses = []
    for attempt in ("first", "second"):
        config = compose_config([f"training.output_dir={tmp_path / attempt}", *overrides])
        run_training(config)
        losses.append([json.loads(line)["loss"] for line in open(f"{config.training.output_dir}/metrics.jsonl")])
    assert len(losses[0]) == 3
    assert losses[0] == losses[1]  # bit-identical, not approximately equal
