"""The performance group: each switch does what it says, and the CPU paths compute the same function."""

import gc
import logging
import types
import weakref

import pytest
import torch

from conftest import tiny_lora_model
from qlora.errors import QLoRAError
from qlora.stages.adapters import attach_lora
from qlora.stages.model import frozen_weights_dtype, load_quantized_model, load_tokenizer, prepare_for_kbit_training
from qlora.stages.trainer import build_sft_config, check_performance_support, uses_liger_kernel

CPU = torch.device("cpu")


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

