"""scripts/benchmarks/reference_check.py: where DPO's reference pass parts from the trained pass."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmarks" / "reference_check.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("reference_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_first_layer_whose_input_differs_is_named_with_the_summed_log_probability_difference():
    check = _script_module()
    recorder = check.Recorder()
    hidden = [torch.randn(2, 3, 4) for _ in range(4)]
    logprobs = torch.tensor([-1.0, -2.0, -3.0])
    with torch.enable_grad():  # the trained pass
        for value in hidden:
            recorder.add("layer_input", value)
        recorder.add("logprobs", logprobs)
    with torch.no_grad():  # the reference pass: layers 0 and 1 the same, 2 off by one element, 3 off everywhere
        for i, value in enumerate(hidden):
            changed = value.clone()
            if i == 2:
                changed[0, 0, 0] += 0.5
            if i == 3:
                changed += 1
            recorder.add("layer_input", changed)
        recorder.add("logprobs", logprobs + torch.tensor([0.0, 0.25, 0.0]))

    result = check.compare_passes(recorder, 0, "policy", 0, "reference")

    assert result["layers_compared"] == 4 and result["first_layer_whose_input_differs"] == 2
    assert [d["differing"] for d in result["layer_inputs"]] == [0, 0, 1, 24]
    assert result["layer_inputs"][2]["max_abs"] == pytest.approx(0.5)
    assert result["logprobs"]["differing"] == 1
    assert result["summed_logprob_difference"] == pytest.approx(-0.25)


def test_on_the_tiny_model_the_reference_pass_computes_what_the_trained_pass_computes(tmp_path):
    """On the CPU in float32 both passes of qlora's tiny DPO recipe give the same values, so the script reports no
    difference anywhere, two steps that compute the same, and DPO's first losses log 2."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--seq", "32", "--batch", "2", "--variant", "qlora",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "reference-check-qlora.json").read_text())
    assert result["losses"] == pytest.approx([math.log(2)] * 2, abs=1e-6)
    assert result["decoder_layers"] > 0
    for key in ("policy_vs_reference_step1", "policy_step1_vs_step2", "reference_step1_vs_step2"):
        comparison = result[key]
        assert comparison["layers_compared"] == result["decoder_layers"], key
        assert comparison["first_layer_whose_input_differs"] is None, key
        assert comparison["logprobs"]["differing"] == 0 and comparison["logprobs"]["elements"] > 0, key
        assert comparison["summed_logprob_difference"] == 0.0, key
    head = result["head_functions"]
    assert head["trl_vs_qlora_head"]["elements"] > 0 and head["trl_vs_qlora_head"]["max_abs"] < 1e-5
    assert "== qlora" in done.stdout
