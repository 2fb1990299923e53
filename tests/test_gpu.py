"""On a CUDA GPU (python -m pytest -m gpu): the tiny model with the 7B recipes' GPU settings."""

import json

import bitsandbytes as bnb
import pytest
import torch

from qlora.pipeline import run_training
from qlora.stages.model import load_quantized_model

pytestmark = pytest.mark.gpu

# What llama7b and the other GPU recipes use: bf16 compute, paged 8-bit AdamW, gradient checkpointing.
GPU_SETTINGS = ("quantization.compute_dtype=bfloat16", "model.dtype=bfloat16", "training.optim=paged_adamw_8bit",
                "training.gradient_checkpointing=true")


def test_quantized_weights_live_on_the_gpu(tiny_config):
    config = tiny_config(*GPU_SETTINGS)
    model = load_quantized_model(config.model, config.quantization, torch.device("cuda", 0))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.device.type == "cuda"


def test_tiny_model_learns_with_the_gpu_recipe_settings(tiny_config):
    config = tiny_config(*GPU_SETTINGS)
    summary = run_training(config)
    rows = [json.loads(line) for line in open(f"{summary.run_dir}/metrics.jsonl")]
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    assert summary.exact_match_before == 0.0 and summary.exact_match_after >= 0.9
    assert rows[-1]["peak_memory_gib"] > 0
