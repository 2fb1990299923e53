"""Pre-quantized base models: `python -m qlora.quantize`, then training without re-quantizing."""

import json

import bitsandbytes as bnb
import pytest
import torch

from conftest import run_cli
from qlora.config import ModelConfig, QuantizationConfig, QuantizeConfig
from qlora.compose import compose_config
from qlora.errors import QLoRAError
from qlora.pipeline import run_training
from qlora.quantize import quantize
from qlora.stages.model import load_quantized_model, loaded_quantization, quantization_conflicts, saved_quantization

TINY = str(compose_config([]).model.name_or_path)


def logged_losses(config) -> list[float]:
    summary = run_training(config)
    return [json.loads(line)["loss"] for line in open(f"{summary.run_dir}/metrics.jsonl")]


def test_pre_quantized_model_trains_like_on_the_fly_quantization(tmp_path):
    result = run_cli("output_dir=tiny-nf4", "quantization.compute_dtype=float32", cwd=tmp_path, command="qlora.quantize")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "tiny-nf4" / "config.json").read_text())["quantization_config"]
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"]

    steps = ["training.max_steps=2", "training.logging_steps=1", "eval.exact_match_samples=0"]
    on_the_fly = logged_losses(compose_config([f"training.output_dir={tmp_path / 'a'}", *steps]))
    pre_quantized = logged_losses(compose_config(
        [f"training.output_dir={tmp_path / 'b'}", f"model.name_or_path={tmp_path / 'tiny-nf4'}", *steps]))
    assert pre_quantized == pytest.approx(on_the_fly, abs=1e-6)


def test_saved_quantization_is_detected_and_conflicts_named(tmp_path):
    quantize(QuantizeConfig(model=ModelConfig(name_or_path=TINY, dtype="float32"),
                            quantization=QuantizationConfig(method="fp4", double_quant=False, compute_dtype="float32"),
                            output_dir=str(tmp_path / "tiny-fp4")))
    model_config = ModelConfig(name_or_path=str(tmp_path / "tiny-fp4"))
    saved = saved_quantization(model_config)
    assert saved == QuantizationConfig(method="fp4", double_quant=False, compute_dtype="float32")
    assert saved_quantization(ModelConfig(name_or_path=TINY)) is None
    conflicts = quantization_conflicts(saved, QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32"))
    assert conflicts == ["quantization.method=nf4 differs from the checkpoint's fp4",
                         "quantization.double_quant=True differs from the checkpoint's False"]
    # transformers' rule: the checkpoint's quantization wins over the requested one
    model = load_quantized_model(model_config, QuantizationConfig(), torch.device("cpu"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "fp4"


def test_the_start_up_summary_shows_the_quantization_in_use(tmp_path):
    # quantized with the quantize command's default bfloat16 compute; the tiny recipe asks for float32
    quantize(QuantizeConfig(model=ModelConfig(name_or_path=TINY, dtype="float32"), output_dir=str(tmp_path / "nf4")))
    steps = ["training.max_steps=1", "eval.exact_match_samples=0"]
    run_training(compose_config([f"training.output_dir={tmp_path / 'run'}", f"model.name_or_path={tmp_path / 'nf4'}",
                                 *steps]))
    summary = json.loads((tmp_path / "run" / "startup_summary.json").read_text())
    assert summary["quantization"] == "nf4 + double quant, bfloat16 compute (the pre-quantized checkpoint's own)"
    on_the_fly = compose_config(steps)
    model = load_quantized_model(on_the_fly.model, on_the_fly.quantization, torch.device("cpu"))
    assert loaded_quantization(model, on_the_fly.quantization) == on_the_fly.quantization


def test_quantize_never_writes_over_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier")
    with pytest.raises(QLoRAError, match="already exists"):
        quantize(QuantizeConfig(model=ModelConfig(name_or_path=TINY), output_dir=str(tmp_path / "out")))
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier"


def test_nothing_to_quantize(tmp_path):
    with pytest.raises(QLoRAError, match="nothing to quantize"):
        quantize(QuantizeConfig(model=ModelConfig(name_or_path=TINY),
                                quantization=QuantizationConfig(method="none", double_quant=False),
                                output_dir=str(tmp_path / "out")))
