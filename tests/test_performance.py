"""The performance group: each switch does what it says, and the CPU paths compute the same function."""

import argparse
import gc
import json
import logging
import math
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from conftest import tiny_lora_model
from qlora.errors import QLoRAError
from qlora.stages.adapters import attach_lora
from qlora.stages.model import frozen_weights_dtype, load_quantized_model, load_tokenizer, prepare_for_kbit_training
from qlora.stages.trainer import build_sft_config, check_performance_support, uses_liger_kernel

CPU = torch.device("cpu")
REPO_ROOT = Path(__file__).resolve().parent.parent


def test_schema_defaults_are_on_and_off_turns_every_switch_off(tiny_config):
    fast = tiny_config("+recipe=llama7b").performance
    assert fast.torch_compile and fast.fused_lora and fast.reuse_recomputed_weights and fast.compiled_dequantize
    assert fast.offload_checkpoints and fast.mlp_chunk_tokens == 4096 and fast.embeddings_on_host
    assert not fast.frozen_weights_float32 and not fast.liger_kernel  # Inductor fuses what Liger would
    assert not tiny_config().performance.torch_compile  # the CPU recipe: compiling would take as long as training
    off = tiny_config("performance=off").performance
    assert not off.liger_kernel and off.frozen_weights_float32 and not off.fused_lora
    assert not off.reuse_recomputed_weights and not off.activation_offloading and not off.torch_compile
    assert not off.compiled_dequantize and not off.offload_checkpoints and off.mlp_chunk_tokens == 0
    assert not off.embeddings_on_host and not off.lm_head_gradient_in_forward
    assert fast.lm_head_gradient_in_forward


def _prepared(config):
    model = load_quantized_model(config.model, config.quantization, CPU)
    dtype = frozen_weights_dtype(config.performance, config.quantization)
    return attach_lora(prepare_for_kbit_training(model, False, dtype), config.lora)


def test_frozen_weights_stay_in_the_compute_dtype(tiny_config):
    config = tiny_config("quantization.compute_dtype=bfloat16")
    model = _prepared(config)
    frozen = {name: p.dtype for name, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen["base_model.model.lm_head.weight"] == torch.bfloat16
    assert frozen["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert all(dtype == torch.bfloat16 for dtype in frozen.values())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA trains in float32


def test_float32_switch_keeps_peft_upcast(tiny_config):
    config = tiny_config("quantization.compute_dtype=bfloat16", "performance.frozen_weights_float32=true")
    model = _prepared(config)
    assert model.base_model.model.lm_head.weight.dtype == torch.float32
    assert model.base_model.model.model.norm.weight.dtype == torch.float32


def test_bf16_frozen_weights_compute_the_same_loss(tiny_config):
    """Norms compute in float32 inside the layer either way: the loss barely moves (bf16 rounding only)."""
    tokenizer = load_tokenizer(tiny_config().model)
    batch = tokenizer(["the film was wonderful and moving", "the plot was dull"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = {}
    for switch in ("true", "false"):
        config = tiny_config("quantization.compute_dtype=bfloat16", f"performance.frozen_weights_float32={switch}")
        torch.manual_seed(0)
        model = _prepared(config)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses[switch] = model(**batch, labels=labels).loss.item()
    assert losses["false"] == pytest.approx(losses["true"], rel=0.01)


def test_liger_is_skipped_without_cuda(tiny_config, caplog, tmp_path):
    config = tiny_config("performance.liger_kernel=true")
    with caplog.at_level(logging.INFO, logger="qlora"):
        check_performance_support(config.performance, CPU)
    assert "need CUDA" in caplog.text
    assert not uses_liger_kernel(config.performance)
    args = build_sft_config(config, tmp_path)
    assert not args.use_liger_kernel


def test_liger_missing_on_cuda_is_a_clear_error(tiny_config, monkeypatch):
    import importlib.util

    performance = tiny_config("performance.liger_kernel=true").performance
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a))
    with pytest.raises(QLoRAError, match="pip install liger-kernel.*performance.liger_kernel=false"):
        check_performance_support(performance, torch.device("cuda"))


def _lora_model(config, fused: bool, keep_for_backward: bool = False):
    """The tiny model with LoRA, under gradient checkpointing."""
    return tiny_lora_model(config, fused, keep_for_backward)


def _loss_and_gradients(model, autocast: bool = False):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_computes_peft_function(tiny_config, dropout):
    """Forward, recomputation (gradient checkpointing) and backward: the same loss and gradients as peft's layers,
    the same dropout masks included."""
    config = tiny_config(f"lora.dropout={dropout}")
    fused_model = _lora_model(config, fused=True)
    assert sum(isinstance(m.__dict__.get("forward"), types.MethodType) for m in fused_model.modules()) == 28
    loss, grads = _loss_and_gradients(fused_model)
    reference_loss, reference = _loss_and_gradients(_lora_model(config, fused=False))
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in reference.items():  # float32 sums in another order: ~1e-7 apart on gradients of ~0.5
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("shape", [(4, 64), (3, 5, 7), (1,)])
def test_dropout_masks_are_kept_eight_to_a_byte(shape):
    from qlora.stages.fused_lora import pack_bits, unpack_bits

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reused_recomputed_weights_save_a_dequantization_and_compute_the_same(tiny_config, monkeypatch, dropout):
    """performance.reuse_recomputed_weights under gradient checkpointing: each 4-bit weight is dequantized twice
    per step (forward, recomputation) instead of three times; what the checkpointed forward pass dequantized is
    freed before the backward pass starts; the loss and gradients are those without the switch (peft's)."""
    from qlora.stages import fused_lora

    dequantizations, dequantized = [], []
    base_matmul, dequantize = fused_lora._base_matmul, fused_lora._dequantize

    def counted_matmul(*args):
        dequantizations.append("gemm_4bit")
        return base_matmul(*args)

    def counted_dequantize(*args):
        weight = dequantize(*args)
        dequantizations.append("dequantize")
        dequantized.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(fused_lora, "_base_matmul", counted_matmul)
    monkeypatch.setattr(fused_lora, "_dequantize", counted_dequantize)
    config = tiny_config(f"lora.dropout={dropout}")
    model = _lora_model(config, fused=True, keep_for_backward=True).train()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    assert len(dequantized) == 28 and all(ref() is None for ref in dequantized)  # the checkpoint kept none
    loss.backward()
    assert dequantizations == ["dequantize"] * 2 * 28
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    dequantizations.clear()
    reference_loss, reference = _loss_and_gradients(_lora_model(config, fused=True))
    assert dequantizations.count("gemm_4bit") == 2 * 28 and dequantizations.count("dequantize") == 28
    assert loss.item() == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in reference.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(256, 192), (301, 191)])  # the second: a partial last block, an odd count
def test_dequantizing_in_torch_is_bitsandbytes_dequantization(quant_type, nested, shape):
    import bitsandbytes.functional as bnb_functional

    from qlora.stages.fused_lora import dequantize_in_torch

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=nested)
    assert torch.equal(dequantize_in_torch(packed, state), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("in_torch", [True, False])
def test_compiled_layers_dequantize_in_torch_ops_when_switched_on(in_torch):
    """performance.compiled_dequantize: in a compiled region the fused function dequantizes in torch ops, which
    Inductor compiles with the rest of the layer; switched off, bitsandbytes' ops are in the graph."""
    import bitsandbytes.functional as bnb_functional

    from qlora.stages.fused_lora import _dequantize

    packed, state = bnb_functional.quantize_4bit(torch.randn(128, 64), blocksize=64, compress_statistics=True)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    compiled = torch.compile(lambda: _dequantize(packed, state, torch.bfloat16, in_torch), backend=capture,
                             fullgraph=True)
    assert torch.equal(compiled(), _dequantize(packed, state, torch.bfloat16, False))
    assert len(graphs) == 1 and ("bitsandbytes" in graphs[0]) != in_torch


@pytest.mark.parametrize("switch", ["true", "false"])
def test_compiled_dequantize_switch_reaches_the_compiled_layers(tiny_config, switch):
    from qlora.stages.adapters import attach_training_adapters

    config = tiny_config("performance.torch_compile=true", f"performance.compiled_dequantize={switch}")
    model = load_quantized_model(config.model, config.quantization, CPU)
    model = attach_training_adapters(model, config)
    flags = {m.qlora_dequantize_in_torch for m in model.modules() if hasattr(m, "qlora_dequantize_in_torch")}
    assert flags == {switch == "true"}
    eager = attach_training_adapters(load_quantized_model(config.model, config.quantization, CPU),
                                     tiny_config("performance.torch_compile=false"))
    assert {m.qlora_dequantize_in_torch for m in eager.modules() if hasattr(m, "qlora_dequantize_in_torch")} == {False}


def test_reusing_recomputed_weights_needs_gradient_checkpointing(tiny_config):
    """Without checkpointing nothing frees what the layers keep: all the dequantized weights would stay."""
    from qlora.stages.fused_lora import keeps_recomputed_tensors

    assert keeps_recomputed_tensors(tiny_config("training.gradient_checkpointing=true"))
    assert not keeps_recomputed_tensors(tiny_config("training.gradient_checkpointing=false"))
    assert not keeps_recomputed_tensors(tiny_config("training.gradient_checkpointing=true", "performance=off"))
    assert not keeps_recomputed_tensors(tiny_config("training.gradient_checkpointing=true", "quantization=int8"))


def test_fused_lora_in_bf16_under_autocast(tiny_config):
    config = tiny_config("quantization.compute_dtype=bfloat16", "lora.dropout=0.1")
    loss, grads = _loss_and_gradients(_lora_model(config, fused=True), autocast=True)
    reference_loss, reference = _loss_and_gradients(_lora_model(config, fused=False), autocast=True)
    assert loss == pytest.approx(reference_loss, rel=1e-2)
    for name, grad in reference.items():  # bf16 rounding: the fused layer rounds twice where peft rounds thrice
        assert torch.linalg.norm(grads[name] - grad) <= 0.05 * torch.linalg.norm(grad), name


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply(tiny_config):
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    fused_model, plain = _lora_model(tiny_config(), fused=True), _lora_model(tiny_config(), fused=False)
    with torch.no_grad():
        with fused_model.disable_adapter(), plain.disable_adapter():  # the base model alone
            assert torch.allclose(fused_model(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert torch.allclose(fused_model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    config = tiny_config("lora.use_dora=true")  # DoRA's magnitude is peft's to compute
    dora_loss, dora_grads = _loss_and_gradients(_lora_model(config, fused=True))
    reference_loss, reference = _loss_and_gradients(_lora_model(config, fused=False))
    assert dora_loss == reference_loss and all(torch.equal(dora_grads[n], g) for n, g in reference.items())


def test_fused_lora_switch_reaches_the_pipeline(tiny_config, caplog):
    from qlora.pipeline import run_training

    assert tiny_config().performance.fused_lora and not tiny_config("performance=off").performance.fused_lora
    first_losses = {}
    for switch in ("true", "false"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            summary = run_training(tiny_config(f"performance.fused_lora={switch}", "training.max_steps=2",
                                               "eval.exact_match_samples=0", "training.overwrite_output_dir=true"))
        assert ("28 LoRA layers over 4-bit weights fused" in caplog.text) == (switch == "true")
        first_losses[switch] = summary.train_loss_first
    assert first_losses["true"] == pytest.approx(first_losses["false"], rel=1e-6)


def test_switches_reach_the_trainer_arguments(tiny_config, tmp_path):
    config = tiny_config("performance.activation_offloading=true", "performance.torch_compile=true")
    args = build_sft_config(config, tmp_path)
    assert args.activation_offloading
    assert not args.torch_compile  # qlora compiles the decoder layers itself, not the whole model


def test_torch_compile_compiles_the_decoder_layers_once_for_all(tiny_config, caplog):
    """performance.torch_compile on the CPU: every decoder layer compiled, one compilation serving them all; the
    same losses as uncompiled over 20 steps; the held-out check's generation runs uncompiled (it would compile
    again for every length)."""
    from qlora.pipeline import run_training

    shared = ("lora.dropout=0", "eval.exact_match_samples=2", "training.overwrite_output_dir=true")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with caplog.at_level(logging.INFO):
        first = run_training(tiny_config("performance.torch_compile=true", "training.max_steps=2", *shared))
    assert "performance.torch_compile: 4 decoder layers compiled" in caplog.text
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs < 4, graphs  # not one per layer
    assert first.exact_match_after is not None  # generation ran (uncompiled)
    compiled = run_training(tiny_config("performance.torch_compile=true", "training.max_steps=20", *shared))
    eager = run_training(tiny_config("training.max_steps=20", *shared))
    assert compiled.train_loss_first == pytest.approx(eager.train_loss_first, rel=1e-4)
    # it trains as the eager layers do (on CUDA the GPU tests check the gradients themselves)
    assert compiled.train_loss_last == pytest.approx(eager.train_loss_last, rel=0.02)
    assert compiled.train_loss_last < 0.5 * compiled.train_loss_first


def test_torch_compile_excludes_liger(tiny_config):
    performance = tiny_config("performance.torch_compile=true", "performance.liger_kernel=true").performance
    with pytest.raises(QLoRAError, match="exclude each other.*performance.liger_kernel=false"):
        check_performance_support(performance, torch.device("cuda"))
    check_performance_support(tiny_config("+recipe=llama7b").performance, torch.device("cuda"))  # the defaults


def test_benchmark_runs_every_recipe_on_the_cpu(tmp_path):
    """scripts/benchmark.py still works end to end; on the CPU only correctness is checked, not speed. unsloth is
    not installed here (nor would it run without a GPU): the report says so and the others run; a qlora variant
    (qlora:KEY=VALUE) runs with its overrides; RECIPE@N starts training from seed N: other dropout masks, the same
    initialisation and data."""
    variant_name = "qlora:lora.dropout=0.5;performance.mlp_chunk_tokens=16"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--seq", "32", "--batch", "2",
         "--steps", "3", "--warmup", "1", "--out", str(tmp_path), "--unsloth-path", str(tmp_path / "none"),
         "--recipes", f"plain,unsloth,unsloth@1,qlora,{variant_name},{variant_name}@7,{variant_name}@8"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "benchmark.md").read_text()
    assert "| plain |" in report and "| qlora |" in report
    assert "unsloth: not run, it is not installed in --unsloth-path=" in report
    assert "unsloth@1: not run, it is not installed in --unsloth-path=" in report
    import json

    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    plain, ours, variant, seven, eight = (next(r for r in rows if r["recipe"] == name) for name in (
        "plain", "qlora", variant_name, f"{variant_name}@7", f"{variant_name}@8"))
    # B starts at 0, so the first step's loss does not see dropout: the same data and initialisation whatever the
    # seed; from the second step the masks differ
    assert variant["losses"][0] == seven["losses"][0] == eight["losses"][0]
    assert len({variant["losses"][2], seven["losses"][2], eight["losses"][2]}) == 3
    # losses recorded at every step although the trainers log only at the last one (a host read per step would
    # synchronise with the GPU); one time per step
    assert len(plain["losses"]) == len(ours["losses"]) == len(ours["step_seconds"]) == 3
    # the same data, seed and LoRA initialisation: the same function, so the same first loss
    assert ours["losses"][0] == pytest.approx(plain["losses"][0], rel=0.01)
    assert ours["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0
    assert variant["losses"][2] != ours["losses"][2]  # its dropout 0.5 applied (B starts at 0: from step 2)
    # qlora trains its adapters in float32 on the CPU (pipeline's cast for a float32 compute dtype); the report
    # names each recipe's
    assert ours["trained_dtypes"] == ["float32"] and plain["trained_dtypes"]
    assert f"trained weights: plain {'/'.join(plain['trained_dtypes'])}; qlora float32" in report


def test_benchmark_dpo_mode_runs_trl_and_qlora_on_the_cpu(tmp_path):
    """--method dpo: TRL's documented DPOTrainer + peft recipe beside qlora's, on pairs cut to --seq tokens a side. On
    the CPU only correctness: both train, and both start at loss log 2 (at step 1 the policy is its reference)."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--method", "dpo", "--seq",
         "32", "--batch", "2", "--steps", "3", "--warmup", "1", "--out", str(tmp_path),
         "--recipes", "plain,unsloth,qlora"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "benchmark.md").read_text()
    assert "DPO, batch 2 pairs of 2 x 32 tokens" in report and "| plain |" in report and "| qlora |" in report
    assert "unsloth: not run, this benchmark has no DPO mode for it" in report
    import json

    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    plain, ours = (next(r for r in rows if r["recipe"] == name) for name in ("plain", "qlora"))
    assert plain["method"] == ours["method"] == "dpo" and len(plain["losses"]) == len(ours["losses"]) == 3
    assert plain["losses"][0] == pytest.approx(math.log(2), abs=1e-4) and ours["losses"][0] == pytest.approx(
        math.log(2), abs=1e-4)
    assert ours["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("start, probes", [
    (8192, [8192, 12288, 16384, 24576, 40960, 73728, 139264, 106496, 90112, 81920, 86016]),  # up from below
    (98304, [98304, 94208, 90112, 81920, 86016]),  # down from above
    (86016, [86016, 90112]),  # at the answer: two probes
])
def test_longest_context_steps_out_by_doubling_steps_then_bisects(monkeypatch, start, probes):
    benchmark = _benchmark_module()
    tried = []

    def run(recipe, checkpoint, args, out, batch, seq):  # a recipe that trains up to 90,000 tokens
        tried.append(seq)
        return {"recipe": recipe, "seq": seq, **({"error": "out of memory"} if seq > 90_000 else {})}

    monkeypatch.setattr(benchmark, "spawn_worker", run)
    args = types.SimpleNamespace(seq=4096, max_context_start={"qlora": start, "unsloth": 1},
                                 max_context_limit=1 << 20, max_context_step=4096)
    result = benchmark.longest_context("qlora", None, args, None)
    assert tried == probes
    assert result["longest_seq"] == 86016 and result["failed"]["seq"] == 90112


def test_max_context_starts_are_parsed_or_refused():
    benchmark = _benchmark_module()
    assert benchmark.starts("unsloth=98304,qlora=147456") == {"unsloth": 98304, "qlora": 147456}
    with pytest.raises(argparse.ArgumentTypeError, match="RECIPE=TOKENS"):
        benchmark.starts("qlora:147456")


def test_longest_context_of_every_recipe_at_once_on_the_cpu(tmp_path):
    """--max-context --concurrent: both recipes' searches run side by side (each probe a process of its own);
    on the CPU nothing runs out of memory, so each search steps up to --max-context-limit."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--seq", "32", "--steps", "2",
         "--warmup", "1", "--recipes", "plain,qlora", "--max-context", "--concurrent", "--max-context-limit", "48",
         "--max-context-step", "16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[plain 48] " in done.stdout and "[qlora 32] " in done.stdout  # each worker's lines say whose they are
    report = (tmp_path / "benchmark.md").read_text()
    assert "| plain | 48 |" in report and "| qlora | 48 |" in report and "not comparable" in report
    probes = [json.loads(line) for line in (tmp_path / "max-context-probes.jsonl").read_text().splitlines()]
    assert sorted((probe["recipe"], probe["seq"]) for probe in probes) == [("plain", 32), ("plain", 48),
                                                                           ("qlora", 32), ("qlora", 48)]


def test_a_failed_worker_says_why_in_its_row(monkeypatch, capsys):
    benchmark = _benchmark_module()
    command = [sys.executable, "-c", "print('loading'); raise SystemExit('the worker ran out of patience')"]
    returncode, last_lines = benchmark.run_echoing(command, {})
    assert returncode == 1 and last_lines == ["loading", "the worker ran out of patience"]
    assert "loading" in capsys.readouterr().out  # passed through as it came


def test_memory_peak_names_the_code_of_the_blocks_alive_at_the_peak():
    """scripts/benchmarks/memory_peak.py on a handmade allocator trace: the peak is after the third allocation
    (before the second is freed); the blocks then are grouped by the innermost frame outside torch."""
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))
    from memory_peak import describe_peak

    def frames(*names):
        return [{"filename": f"/usr/lib/site-packages/{name.split(':')[0]}", "line": 1, "name": name.split(":")[1]}
                for name in names]

    layer = frames("torch/nn/modules/module.py:_call_impl", "qlora/stages/fused_lora.py:forward")
    head = frames("trl/trainer/utils.py:_fused_forward")
    trace = [{"action": "alloc", "addr": 1, "size": 2**30, "frames": layer},
             {"action": "alloc", "addr": 2, "size": 2**29, "frames": head},
             {"action": "alloc", "addr": 3, "size": 2**30, "frames": layer},
             {"action": "free_requested", "addr": 2, "size": 2**29, "frames": head},
             {"action": "free_completed", "addr": 2, "size": 2**29, "frames": head},
             {"action": "alloc", "addr": 4, "size": 2**28, "frames": head}]
    report = describe_peak({"device_traces": [trace]}, max_allocated=3 * 2**30)
    assert "recorded peak 2.500 GiB" in report and "the rest, 0.500 GiB" in report
    rows = [line for line in report.splitlines() if line.startswith("| 2.000") or line.startswith("| 0.500")]
    assert rows == ["| 2.000 | 2 | qlora/stages/fused_lora.py:1 forward |",
                    "| 0.500 | 1 | trl/trainer/utils.py:1 _fused_forward |"]


def test_gpu_memory_sizes_are_read_as_the_issue_writes_them():
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))
    from training_run import memory_bytes

    assert memory_bytes("24GiB") == 24 * 2**30 and memory_bytes("80GB") == 80 * 10**9
    assert memory_bytes("16000MiB") == 16000 * 2**20
    with pytest.raises(argparse.ArgumentTypeError, match="not a memory size"):
        memory_bytes("lots")


def test_trace_gaps_finds_where_the_gpu_waits_for_the_host():
    """scripts/benchmarks/trace_gaps.py on a handmade profiler trace: two forward kernels 60 us apart, then a
    backward kernel launched 310 us after the GPU went idle, once the host had synchronised."""
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))
    from trace_gaps import step_gaps

    def op(cat, name, ts, dur, tid=1, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {} if correlation is None else {"correlation": correlation}}

    events = [
        op("user_annotation", "ProfilerStep#1", 0, 1000),
        op("cpu_op", "LoRA4bitLinear", 0, 400),
        op("cpu_op", "aten::mm", 90, 20),
        op("cuda_runtime", "cudaLaunchKernel", 100, 5, correlation=1),
        op("cuda_driver", "cuLaunchKernelEx", 350, 5, correlation=2),  # how cuBLAS and Triton launch
        op("cuda_runtime", "cudaStreamSynchronize", 600, 100),
        op("cpu_op", "autograd::engine::evaluate_function: LoRA4bitLinearBackward", 700, 250, tid=2),
        op("cuda_runtime", "cudaLaunchKernel", 800, 5, tid=2, correlation=3),
        op("kernel", "gemm", 110, 190, tid=7, correlation=1),
        op("kernel", "dropout", 360, 140, tid=7, correlation=2),
        op("kernel", "gemm_backward", 810, 90, tid=7, correlation=3),
    ]
    result = step_gaps(events)
    assert result.wall_us == 1000 and result.busy_us == 190 + 140 + 90
    first, second = sorted(result.gaps, key=lambda g: g["start"])[1:]  # the first gap is the step's start
    assert (first["us"], first["inner"], first["outer"], first["synced"]) == (60, "LoRA4bitLinear",
                                                                             "main thread: LoRA4bitLinear", False)
    assert second["us"] == 310 and second["outer"] == "backward" and second["synced"]
    assert second["inner"] == "autograd::engine::evaluate_function: LoRA4bitLinearBackward"
