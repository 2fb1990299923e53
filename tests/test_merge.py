"""`qlora.merge`: the merged checkpoint computes what base + adapter computed."""

import pytest
import torch
import peft
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import library_noise, run_cli
from qlora.config import MergeConfig
from qlora.errors import QLoRAError
from qlora.merge import merge
from qlora.stages.model import load_quantized_model

CPU = torch.device("cpu")


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["the film was superb and moving", "the plot was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def test_bf16_merge_equals_base_plus_adapter(trained_run, tmp_path):
    config, run_dir = trained_run
    result = run_cli(f"run={run_dir}", f"output_dir={tmp_path / 'merged'}", cwd=tmp_path, command="qlora.merge")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not library_noise(result) and not result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    assert merged.dtype == torch.bfloat16 and not hasattr(merged, "peft_config")
    base = AutoModelForCausalLM.from_pretrained(config.model.name_or_path, dtype=torch.bfloat16)
    base_logits = logits(base, tokenizer)
    with_adapter = logits(PeftModel.from_pretrained(base, run_dir / "adapter"), tokenizer)
    merged_logits = logits(merged, tokenizer)
    torch.testing.assert_close(merged_logits, with_adapter, rtol=0.02, atol=0.15)  # bf16 rounding
    assert (merged_logits - base_logits).abs().max() > 1.0  # the adapter is really in there


def test_dequantized_merge_equals_4bit_base_plus_adapter(trained_run, tmp_path):
    config, run_dir = trained_run
    result = merge(MergeConfig(run=str(run_dir), from_dequantized=True, output_dir=str(tmp_path / "merged")))
    assert 0.0 < result.dequantization_error < 0.2  # NF4 is lossy, but not that lossy
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    quantized = load_quantized_model(config.model, config.quantization, CPU)
    trained_against = logits(PeftModel.from_pretrained(quantized, run_dir / "adapter"), tokenizer)
    torch.testing.assert_close(logits(merged, tokenizer), trained_against, rtol=0.02, atol=0.15)


def test_merge_never_writes_over_a_folder(trained_run, tmp_path):
    _, run_dir = trained_run
    (tmp_path / "out").mkdir()
    with pytest.raises(QLoRAError, match="already exists"):
        merge(MergeConfig(run=str(run_dir), output_dir=str(tmp_path / "out")))


def test_merge_needs_an_adapter(tmp_path):
    with pytest.raises(QLoRAError, match="no adapter given"):
        merge(MergeConfig())
    with pytest.raises(QLoRAError, match="holds no LoRA adapter"):
        merge(MergeConfig(adapter=str(tmp_path)))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora-shard-by-shard", "dora-in-memory"])
def test_merge_into_a_sharded_base(tmp_path, trained_run, use_dora):
    config, _ = trained_run
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    base = AutoModelForCausalLM.from_pretrained(config.model.name_or_path, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base", max_shard_size="1MB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora))
    torch.manual_seed(0)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter something to merge
            param.data.normal_(std=0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    expected = logits(adapted, tokenizer)

    merge(MergeConfig(adapter=str(tmp_path / "adapter"), base=str(tmp_path / "base"), dtype="float32",
                      output_dir=str(tmp_path / "merged")))
    if not use_dora:  # streamed: the base's shards and index are kept
        assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
        assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=1e-4, atol=1e-4)
