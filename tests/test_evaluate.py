"""`qlora.evaluate`: loss as training computes it, answer metrics, eval.json."""

import json
import logging
import math
import shutil

import pytest
import torch
import yaml

from conftest import library_noise, run_cli
from qlora.config import ASSETS_DIR, DataConfig, EvaluateConfig
from qlora.errors import QLoRAError
from qlora.data import load_sft_dataset
from qlora.evaluate import evaluate
from qlora.runs import load_adapted_model


def test_cli_writes_eval_json_with_loss_and_answer_metrics(trained_run, tmp_path):
    config, run_dir = trained_run
    result = run_cli(f"run={run_dir}", f"data.path={config.data.heldout_path}", "max_new_tokens=4",
                     "regex='(positive|negative)'", cwd=tmp_path, command="qlora.evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not library_noise(result) and not result.stderr
    assert result.stdout.startswith(f"evaluation data: {config.data.heldout_path} (alpaca): 32 examples")
    assert "training data" not in result.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["examples"] == 32
    assert report["perplexity"] == pytest.approx(math.exp(report["eval_loss"]))
    assert report["exact_match"] >= 0.9 and report["contains"] >= report["exact_match"]
    assert report["regex"] == report["exact_match"]  # the answers are exactly the label
    assert {"prompt", "reference", "answer"} <= report["samples"][0].keys()


def test_eval_loss_is_the_mean_loss_of_completion_tokens(trained_run, tmp_path):
    config, run_dir = trained_run
    report = evaluate(EvaluateConfig(run=str(run_dir), data=DataConfig(path=config.data.heldout_path), batch_size=64,
                                     generation=False, output_file=str(tmp_path / "eval.json")))
    model, tokenizer, _ = load_adapted_model(str(run_dir), None, None, trust_remote_code=False)
    total, count = 0.0, 0
    for example in load_sft_dataset(config.data.heldout_path):
        prompt = tokenizer(example["prompt"])["input_ids"]
        completion = tokenizer(example["completion"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
        count += len(completion)
    assert report["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    assert "exact_match" not in report


def test_text_rows_get_loss_only(trained_run, tmp_path):
    _, run_dir = trained_run
    (tmp_path / "text.jsonl").write_text('{"text": "the film was great"}\n{"text": "the plot was dull"}\n')
    report = evaluate(EvaluateConfig(run=str(run_dir), data=DataConfig(path=str(tmp_path / "text.jsonl")),
                                     output_file=str(tmp_path / "eval.json")))
    assert report["examples"] == 2 and report["eval_loss"] > 0 and "exact_match" not in report
    assert json.loads((tmp_path / "eval.json").read_text())["eval_loss"] == report["eval_loss"]


def test_without_data_path_the_runs_heldout_file_is_evaluated(trained_run, tmp_path):
    config, run_dir = trained_run
    output = tmp_path / "eval.json"
    result = run_cli(f"run={run_dir}", "max_samples=8", "max_new_tokens=2", f"output_file={output}", cwd=tmp_path,
                     command="qlora.evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["data"] == f"{config.data.heldout_path} (the run's data.heldout_path)"
    assert report["examples"] == 8 and report["exact_match"] >= 0.75


def run_with_data(run_dir, folder, **data):
    """A copy of the trained run (config and adapter) whose config.yaml has these data.* values instead."""
    folder.mkdir()
    shutil.copytree(run_dir / "adapter", folder / "adapter")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"].update(data)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return str(folder)


def test_without_data_path_the_runs_validation_file_comes_first(trained_run, tmp_path):
    config, run_dir = trained_run
    sentiment = ASSETS_DIR / "sentiment"
    run = run_with_data(run_dir, tmp_path / "run", val_path=str(sentiment / "heldout.jsonl"),
                        heldout_path=str(sentiment / "train.jsonl"))
    report = evaluate(EvaluateConfig(run=run, generation=False, output_file=str(tmp_path / "eval.json")))
    assert report["data"] == f"{sentiment / 'heldout.jsonl'} (the run's data.val_path)" and report["examples"] == 32


def test_without_data_path_the_runs_validation_split_is_evaluated_for_loss(trained_run, tmp_path, caplog):
    _, run_dir = trained_run
    run = run_with_data(run_dir, tmp_path / "run", val_size=16)
    with caplog.at_level(logging.INFO, logger="qlora"):
        report = evaluate(EvaluateConfig(run=run, output_file=str(tmp_path / "eval.json")))
    assert report["data"] == "the run's validation split (data.val_size=16)" and report["examples"] == 16
    assert report["eval_loss"] > 0 and "exact_match" not in report
    assert "answers are not scored (the split keeps no prompts)" in caplog.text


def test_a_run_without_validation_or_heldout_data_needs_data_path(trained_run, tmp_path):
    _, run_dir = trained_run
    run = run_with_data(run_dir, tmp_path / "run", heldout_path=None)
    with pytest.raises(QLoRAError, match=r"nothing to evaluate on: run=.* has no validation set \(data.val_path, "
                                         r"data.val_size\) or held-out file \(data.heldout_path\); set data.path="):
        evaluate(EvaluateConfig(run=run))
