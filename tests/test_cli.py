"""`python -m qlora.train` run as a user types it, from a folder outside the repository."""

import json

import pytest
import yaml

from conftest import library_noise, run_cli


def test_tiny_recipe_trains_end_to_end(default_job):
    result, run_dir = default_job
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "train.log",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.2 * losses[0]  # it visibly learns
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exact_match_before"] == 0.0 and summary["exact_match_after"] >= 0.9
    assert "held-out exact match before training: 0/32" in result.stdout
    assert "held-out exact match after training" in result.stdout
    # not a terminal: our one line per logging step, not transformers' bar or printed dicts, no library noise
    assert "step 120/120  loss " in result.stdout and "tok/s" in result.stdout
    assert not library_noise(result)
    # the data's statistics once, named; no checkpoints/ folder when none was saved (the recipe's save_steps=0)
    assert result.stdout.count("512 examples from 512 rows") == 1 and "training data: " in result.stdout
    assert not (run_dir / "checkpoints").exists()


def test_cfg_job_prints_the_composed_llama7b_recipe(tmp_path):
    result = run_cli("+recipe=llama7b", "lora.r=8", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert config["quantization"]["method"] == "nf4" and config["lora"]["r"] == 8
    assert config["training"]["optim"] == "adamw_torch_fused"


def test_no_recipe_runs_the_tiny_recipe(tmp_path):
    default = run_cli("--cfg", "job", cwd=tmp_path)
    tiny = run_cli("+recipe=tiny", "--cfg", "job", cwd=tmp_path)
    assert default.returncode == 0 and default.stdout == tiny.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["+recipe=nope"], ["recipe=nope is not a recipe. The recipes are", "llama7b", "tiny"]),
        (["lora.rank=8"], ["lora.rank is not a key of python -m qlora.train (did you mean lora.r?)"]),
        (["+lora.rank=8"], ["lora.rank is not a key of python -m qlora.train (did you mean lora.r?)"]),
        (["lora.r=zero"], ["lora.r=zero", "could not be converted to Integer"]),
        (["lora.r=0"], ["lora.r=0 is out of range"]),
        (["lora.dropout=1.5"], ["lora.dropout=1.5 is out of range"]),
        (["training.lr=-1"], ["training.lr=-1.0 must be positive"]),
        (["quantization.method=int8"], ["quantization.double_quant=true only applies to 4-bit"]),
        (["data.path=missing.jsonl"], ["data.path=missing.jsonl does not exist"]),
        (["model.name_or_path=./no/such/model"], ["model.name_or_path=./no/such/model does not exist"]),
    ],
)
def test_bad_input_fails_early_without_traceback(tmp_path, args, expected):
    result = run_cli(*args, "training.output_dir=run", cwd=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


def test_hydra_flags_anywhere_and_recipe_without_plus(tmp_path):
    result = run_cli("lora.r=4", "--cfg", "job", "recipe=llama7b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["lora"]["r"] == 4 and config["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("output_dir", ["taken", "taken/run"])
def test_an_output_dir_on_a_file_is_refused_in_one_line(tmp_path, output_dir):
    (tmp_path / "taken").write_text("a file")
    result = run_cli(f"training.output_dir={output_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"qlora: error: training.output_dir={output_dir}: taken is a file, so the run folder " \
                            f"cannot be created there. Choose a folder, e.g. training.output_dir=outputs/run1.\n"
