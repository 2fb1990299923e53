"""The whole pipeline in-process on the tiny recipe: pinned first losses, files, learning."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, set_seed

from qlora.config import ASSETS_DIR
from qlora.compose import compose_config
from qlora.data import prepare_sft_data
from qlora.pipeline import run_training
from qlora.stages.adapters import attach_lora
from qlora.stages.artifacts import prepare_run_dir
from qlora.stages.model import load_quantized_model, load_tokenizer, prepare_for_kbit_training
from qlora.stages.trainer import build_trainer

CPU = torch.device("cpu")

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
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "startup_summary.json", "report.md", "report.png"):
        assert (run_dir / name).is_file(), name
    startup = json.loads((run_dir / "startup_summary.json").read_text())
    assert startup["steps"] == 30 and startup["trainable_parameters"] == 77_824
    assert startup["memory_after_first_step_gib"] > 0
    assert startup["resume_command"].endswith(f"training.output_dir={run_dir} training.resume=auto")
    assert "| held-out exact match | 0% -> " in (run_dir / "report.md").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == 30
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib"} <= rows[-1].keys()
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["peak_memory_gib"] > 0
    assert summary.train_loss_last < summary.train_loss_first / 2
    assert summary.exact_match_before == 0.0
    assert summary.exact_match_after > summary.exact_match_before
    assert json.loads(open(f"{run_dir}/summary.json").read())["exact_match_after"] == summary.exact_match_after


def small_dataset(tmp_path, rows=16):
    lines = (ASSETS_DIR / "sentiment" / "train.jsonl").read_text().splitlines()[:rows]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_packed_and_unpacked_training_give_the_same_losses(tiny_config, tmp_path):
    """All 16 examples in one batch: packed (padding-free, position ids) or padded, the loss is the same,
    before and after an update, so packed examples never see each other."""
    losses, rows = {}, {}
    for packing in (False, True):
        config = tiny_config(f"data.path={small_dataset(tmp_path)}", f"data.packing={packing}", "training.max_steps=2",
                             "training.logging_steps=1", "training.warmup_ratio=0", "eval.exact_match_samples=0",
                             f"training.output_dir={tmp_path / f'run-{packing}'}")
        set_seed(config.training.seed)  # the same LoRA initialisation for both
        tokenizer = load_tokenizer(config.model)
        data = prepare_sft_data(config.data, tokenizer, config.training.seed)
        model = load_quantized_model(config.model, config.quantization, CPU)
        model = attach_lora(prepare_for_kbit_training(model, False), config.lora)
        trainer = build_trainer(config, model, tokenizer, data.train, prepare_run_dir(config))
        trainer.train()
        losses[packing] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        rows[packing] = len(trainer.train_dataset)
    assert rows[False] == 16 and rows[True] <= 8  # ~60-token examples, two per 128-token pack
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[False][1] < losses[False][0]  # the second step is after a real update


def test_validation_loss_is_logged_every_eval_steps(tiny_config, tmp_path):
    config = tiny_config(f"data.path={small_dataset(tmp_path, 40)}", "data.val_size=8", "training.eval_steps=2",
                         "training.max_steps=4", "training.logging_steps=1", "eval.exact_match_samples=0")
    run_training(config)
    rows = [json.loads(line) for line in open(f"{config.training.output_dir}/metrics.jsonl")]
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    stats = json.loads(open(f"{config.training.output_dir}/data_stats.json").read())
    assert stats["examples"] == 40 and stats["trained_tokens"] > 0


def test_chat_data_trains_and_the_adapter_keeps_its_chat_template(tiny_config):
    config = tiny_config(f"data.path={ASSETS_DIR / 'examples' / 'sharegpt.jsonl'}", "data.chat_template=chatml",
                         "data.heldout_path=null", "training.max_steps=2", "training.batch_size=3")
    summary = run_training(config)
    assert summary.train_loss_first > 0
    saved = AutoTokenizer.from_pretrained(Path(summary.adapter_dir))
    assert "{%- generation %}" in saved.chat_template and "<|im_start|>" in saved.chat_template


def test_same_seed_and_config_give_the_same_losses(tmp_path):
    overrides = ["training.max_steps=3", "training.batch_size=4", "training.logging_steps=1", "eval.exact_match_samples=0"]
    losses = []
    for attempt in ("first", "second"):
        config = compose_config([f"training.output_dir={tmp_path / attempt}", *overrides])
        run_training(config)
        losses.append([json.loads(line)["loss"] for line in open(f"{config.training.output_dir}/metrics.jsonl")])
    assert len(losses[0]) == 3
    assert losses[0] == losses[1]  # bit-identical, not approximately equal


def test_heldout_answers_are_scored_during_training(tiny_config):
    config = tiny_config("eval.during_training=true", "training.eval_steps=2", "training.max_steps=4",
                         "eval.exact_match_samples=4", "eval.max_new_tokens=2")
    run_training(config)
    rows = [json.loads(line) for line in open(f"{config.training.output_dir}/metrics.jsonl")]
    scored = [row for row in rows if "heldout_exact_match" in row]
    assert [row["step"] for row in scored] == [2, 4]
    assert all(0.0 <= row["heldout_exact_match"] <= row["heldout_contains"] <= 1.0 for row in scored)
