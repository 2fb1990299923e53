"""performance.skip_down_proj_recompute: the same loss and gradients, with the down projection left out of the
layer's recomputation under gradient checkpointing."""

import logging

import pytest
import torch

from conftest import tiny_lora_model
from qlora.stages import down_projection, fused_lora
from qlora.stages.chunked_mlp import chunk_mlps
from qlora.stages.down_projection import save_down_proj_inputs_first
from qlora.stages.model import compile_decoder_layers, load_quantized_model

CPU = torch.device("cpu")
LAYERS = 4


def _model(config, skip: bool, checkpointing: bool = True, compiled: bool = False, chunk_tokens: int = 0):
    model = tiny_lora_model(config, checkpointing=checkpointing)
    if skip:
        assert save_down_proj_inputs_first(model) == LAYERS
    if chunk_tokens:
        chunk_mlps(model, chunk_tokens, compiled=compiled)
    if compiled:
        compile_decoder_layers(model)
    return model


def _step(model):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(config, checkpointing=True, compiled=False, chunk_tokens=0, rtol=1e-5, atol=1e-7):
    loss, grads = _step(_model(config, True, checkpointing, compiled, chunk_tokens))
    reference_loss, reference = _step(_model(config, False, checkpointing, compiled, chunk_tokens))
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        assert torch.allclose(grads[name], grad, rtol=rtol, atol=atol), name


def _down_matmuls(monkeypatch, model) -> list:
    """The 4-bit matmuls run on the down projections' weights, whichever function runs them."""
    downs = {id(layer.mlp.down_proj.base_layer.weight) for layer in model.base_model.model.model.layers}
    calls, base_matmul = [], fused_lora._base_matmul

    def counted(x, weight, *args, **kwargs):
        if id(weight) in downs:
            calls.append(x.shape[0])
        return base_matmul(x, weight, *args, **kwargs)

    monkeypatch.setattr(fused_lora, "_base_matmul", counted)
    monkeypatch.setattr(down_projection, "_base_matmul", counted)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_same_loss_and_gradients_with_and_without(tiny_config, dropout, checkpointing):
    """The same dropout masks (the same draw at the same point of the random stream) and the same gradients of
    every adapter, with and without gradient checkpointing."""
    _assert_same(tiny_config(f"lora.dropout={dropout}"), checkpointing)


@pytest.mark.parametrize("compiled", [False, True])
def test_recomputation_stops_before_the_down_projection(tiny_config, monkeypatch, compiled):
    """Under gradient checkpointing the down projections' matmul runs once per step (the forward pass); without the
    switch twice (the recomputation too). Compiled layers stop there as well: the projection is a graph break."""
    torch._dynamo.reset()
    config = tiny_config("lora.dropout=0.3")
    for skip, runs in ((True, 1), (False, 2)):
        model = _model(config, skip, compiled=compiled)
        calls = _down_matmuls(monkeypatch, model)
        _step(model)
        if skip or not compiled:  # compiled without the switch, the matmul is in the traced graph: not counted
            assert calls == [2 * 24] * LAYERS * runs


def test_compiled_layers_give_the_same_loss_and_gradients(tiny_config):
    torch._dynamo.reset()
    _assert_same(tiny_config("lora.dropout=0.3"), compiled=True, rtol=1e-3, atol=1e-5)


def test_an_output_saved_after_the_projection_is_recomputed(tiny_config, monkeypatch):
    """Where something after the down projection saves its output (as Gemma's post-feedforward norm does), the
    recomputation runs the projection too, and the gradients stay the same."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: torch.sin(forward(self, x)))  # sin saves its input
    model = _model(tiny_config("lora.dropout=0"), True)
    calls = _down_matmuls(monkeypatch, model)
    _step(model)
    assert calls == [2 * 24] * LAYERS * 2
    _assert_same(tiny_config("lora.dropout=0.3"))


def test_chunked_mlps_keep_the_fused_function(tiny_config, monkeypatch):
    """A micro-batch longer than the chunk runs the MLP in chunks, whose backward pass recomputes it: the down
    projection runs the fused function there (once per pass on the dequantized weight), the same gradients."""
    model = _model(tiny_config("lora.dropout=0"), True, chunk_tokens=10)
    calls = _down_matmuls(monkeypatch, model)
    _step(model)
    assert calls == []  # chunks compute with the weights dequantized once per pass, not through the 4-bit matmul
    _assert_same(tiny_config("lora.dropout=0.3"), chunk_tokens=10, rtol=1e-4, atol=1e-6)


def test_the_switch_reaches_the_layers_and_off_leaves_them(tiny_config, caplog):
    from qlora.stages.adapters import attach_training_adapters

    def downs(config):
        model = attach_training_adapters(load_quantized_model(config.model, config.quantization, CPU), config)
        return {layer.mlp.down_proj.forward.__func__ for layer in model.base_model.model.model.layers}

    checkpointed = "training.gradient_checkpointing=true"  # the tiny recipe trains without
    with caplog.at_level(logging.INFO):
        assert downs(tiny_config(checkpointed)) == {down_projection.saved_first_forward}
    assert f"{LAYERS} down projections save their input first" in caplog.text
    assert downs(tiny_config(checkpointed, "performance.skip_down_proj_recompute=false")) == {fused_lora.fused_forward}
    assert downs(tiny_config()) == {fused_lora.fused_forward}
    assert not tiny_config("performance=off").performance.skip_down_proj_recompute
