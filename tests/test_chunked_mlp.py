"""performance.mlp_chunk_tokens: the MLP in sequence chunks computes the same function with less memory."""

import logging

import pytest
import torch

from conftest import tiny_lora_model
from qlora.stages import fused_lora
from qlora.stages.chunked_mlp import _chunk_forward, _compiled_chunk_forward, _run_in_chunks, chunk_mlps
from qlora.stages.model import load_quantized_model

CPU = torch.device("cpu")
TOKENS = 2 * 24  # the batch of _step; in chunks of 10: 5 chunks


def _model(config, chunk_tokens: int = 0, checkpointing: bool = True, compiled: bool = False):
    model = tiny_lora_model(config, keep_for_backward=checkpointing, checkpointing=checkpointing)
    if chunk_tokens:
        assert chunk_mlps(model, chunk_tokens, compiled=compiled) == 4
    return model


def _step(model):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_gate_calls(model) -> list[int]:
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    calls, forward = [], gate.forward
    gate.forward = lambda x, *args, **kwargs: (calls.append(x.shape[:-1].numel()), forward(x, *args, **kwargs))[1]
    return calls


@pytest.mark.parametrize("checkpointing", [True, False])
def test_chunks_compute_the_whole_mlp_and_run_it_twice_not_three_times(tiny_config, checkpointing):
    """Without dropout the chunked MLPs give the whole MLPs' loss and gradients. Each chunk runs forward once in
    the forward pass and once in the backward pass; under gradient checkpointing the layer's recomputation stops
    before the MLP (it saved its input first), so the MLP does not run a third time."""
    config = tiny_config("lora.dropout=0")
    model = _model(config, chunk_tokens=10, checkpointing=checkpointing)
    calls = _count_gate_calls(model)
    loss, grads = _step(model)
    assert calls == [10, 10, 10, 10, 8] * 2
    reference_loss, reference = _step(_model(config, checkpointing=checkpointing))
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in reference.items():  # float32 sums over chunks in another order
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("compiled", [False, True])
def test_dropout_masks_are_the_same_in_the_backward_pass(tiny_config, compiled):
    """With dropout the backward pass draws the forward pass's masks again: the gradients are those autograd
    computes for the same chunks with the same random state. Compiled, the chunks' forward pass runs without
    gradients and their backward pass with them, two compiled graphs that must draw the same masks."""
    config = tiny_config("lora.dropout=0.3")
    model = _model(config, chunk_tokens=10, checkpointing=False, compiled=compiled)
    mlp = model.base_model.model.model.layers[1].mlp
    x = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(3))
    trained = [p for p in mlp.parameters() if p.requires_grad]

    def gradients(run):
        inputs = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = run(inputs)
        out.pow(2).sum().backward()
        found = [inputs.grad] + [p.grad.clone() for p in trained]
        mlp.zero_grad()
        return out.detach(), found

    out, grads = gradients(lambda inputs: _run_in_chunks(mlp, inputs))
    whole = _compiled_chunk_forward() if compiled else type(mlp).forward
    reference_out, reference = gradients(
        lambda inputs: torch.cat([whole(mlp, chunk) for chunk in inputs.reshape(-1, 128).split(10)]).view(2, 24, -1))
    assert torch.allclose(out, reference_out, atol=1e-6)
    for grad, expected in zip(grads, reference):
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_compiled_chunks_compute_the_whole_mlp_with_one_compilation_for_all_layers(tiny_config):
    """With compiled decoder layers the chunks run compiled: the eager whole MLPs' loss and gradients, from code
    compiled once for every layer's MLP (its cache holds entries per grad mode and chunk shape, not per layer, nor
    per step for the weights each pass dequantizes anew)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    from qlora.stages.model import compile_decoder_layers

    torch._dynamo.reset()
    config = tiny_config("lora.dropout=0")
    model = _model(config, chunk_tokens=10, compiled=True)
    compile_decoder_layers(model)
    loss, grads = _step(model)
    compiled_entries = len(_debug_get_cache_entry_list(_chunk_forward.__code__))
    assert 0 < compiled_entries < len(model.base_model.model.model.layers)
    model.zero_grad()
    assert _step(model)[0] == loss
    assert len(_debug_get_cache_entry_list(_chunk_forward.__code__)) == compiled_entries
    reference_loss, reference = _step(_model(config))
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for name, grad in reference.items():
        assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-5), name


def test_short_inputs_and_inference_run_the_mlp_whole(tiny_config):
    model = _model(tiny_config(), chunk_tokens=TOKENS)
    calls = _count_gate_calls(model)
    _step(model)
    assert calls == [TOKENS, TOKENS]  # forward and recomputation, as without chunks
    calls.clear()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 500, (4, 24)))
    assert calls == [4 * 24]


@pytest.mark.parametrize("compiled", [False, True])
def test_each_weight_is_dequantized_once_per_pass_for_all_chunks(tiny_config, monkeypatch, compiled):
    """Eager or compiled, the chunks compute with the weights dequantized on entry to the pass: no chunk
    dequantizes or runs the 4-bit matmul itself (compiled: none is in the traced graph)."""
    dequantized, matmuls = [], []
    dequantize, base_matmul = fused_lora._dequantize_with_bitsandbytes, fused_lora._base_matmul
    monkeypatch.setattr(fused_lora, "_dequantize_with_bitsandbytes",
                        lambda weight, *args: dequantized.append(weight) or dequantize(weight, *args))
    monkeypatch.setattr(fused_lora, "_base_matmul",
                        lambda x, weight, *args: matmuls.append(weight) or base_matmul(x, weight, *args))
    torch._dynamo.reset()
    model = _model(tiny_config("lora.dropout=0"), chunk_tokens=10, compiled=compiled)
    mlp_weights = {id(m.base_layer.weight) for layer in model.base_model.model.model.layers
                   for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)}
    _step(model)
    mlp_dequantized = [id(w) for w in dequantized if id(w) in mlp_weights]
    assert len(mlp_dequantized) == 2 * len(mlp_weights)  # the forward pass and the backward pass, not per chunk
    assert not [w for w in matmuls if id(w) in mlp_weights]


def test_the_switch_reaches_the_layers_and_off_leaves_them(tiny_config, caplog):
    from qlora.stages.adapters import attach_training_adapters

    with caplog.at_level(logging.INFO):
        chunked = attach_training_adapters(load_quantized_model(tiny_config().model, tiny_config().quantization, CPU),
                                           tiny_config("performance.mlp_chunk_tokens=64"))
    assert "4 MLPs run in chunks of 64 tokens" in caplog.text
    assert {m.qlora_chunk_tokens for m in chunked.modules() if hasattr(m, "qlora_chunk_tokens")} == {64}
    config = tiny_config("performance=off")
    assert config.performance.mlp_chunk_tokens == 0
    whole = attach_training_adapters(load_quantized_model(config.model, config.quantization, CPU), config)
    assert not any(hasattr(m, "qlora_chunk_tokens") for m in whole.modules())


def test_a_negative_chunk_size_is_refused(tiny_config):
    from qlora.errors import QLoRAError

    with pytest.raises(QLoRAError, match="performance.mlp_chunk_tokens=-1 is out of range"):
        tiny_config("performance.mlp_chunk_tokens=-1")
