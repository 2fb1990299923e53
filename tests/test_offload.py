"""performance.offload_checkpoints: the checkpoints' saved inputs leave for host memory and come back in time.

On the CPU there is no device memory to free, so these tests move CPU tensors (CheckpointInputs(devices=("cpu",)))
to exercise what happens to them: which tensors go, in which order they come back, and that training computes the
same. The GPU test (tests/test_gpu.py) runs the copy streams themselves."""

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from conftest import tiny_lora_model
from qlora.stages import offload as offload_module
from qlora.stages.offload import CheckpointInputs, OffloadCheckpoints, offloads_checkpoints

def _model(config):
    return tiny_lora_model(config)


def _step(model, seed: int = 1):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)  # the same dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_inputs_come_back_in_order_and_train_the_same(tiny_config, monkeypatch):
    """Every layer's input but the last leaves at once; the backward pass gets each back, the one before it already
    on its way (copied while the layer is differentiated); then every copy is released. The loss and the gradients
    are those of the run that kept its inputs, bit for bit."""
    config = tiny_config("lora.dropout=0.1")
    model, offload = _model(config), CheckpointInputs(min_bytes=0, devices=("cpu",))
    OffloadCheckpoints(offload).on_train_begin(None, None, None, model=model)
    events = []
    prefetch, fetch = offload_module._Saved.prefetch, offload_module._Saved.fetch
    monkeypatch.setattr(offload_module._Saved, "prefetch",
                        lambda self: (self.back is None and events.append(("copy back", self.index)),
                                      prefetch(self))[-1])
    monkeypatch.setattr(offload_module._Saved, "fetch", lambda self: (events.append(("use", self.index)),
                                                                      fetch(self))[-1])
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids).loss
    assert [type(saved).__name__ for saved in offload.saved] == ["_Saved", "_Saved", "_Saved", "_Kept"]
    assert all(saved.host is not None for saved in offload.saved[:3])  # in host memory, not referencing the input
    loss.backward()
    assert events == [("copy back", 2), ("use", 2), ("copy back", 1), ("use", 1), ("copy back", 0), ("use", 0)]
    assert offload.saved == [None] * 4
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    reference_loss, reference = _step(_model(config))
    assert loss.item() == reference_loss
    assert all(torch.equal(grads[name], grad) for name, grad in reference.items())


def test_each_forward_pass_starts_afresh_and_only_checkpoint_inputs_go(tiny_config):
    model, offload = _model(tiny_config()), CheckpointInputs(min_bytes=0, devices=("cpu",))
    packed = []
    pack = offload.pack
    offload.pack = lambda tensor, keep=False: packed.append(tensor.shape) or pack(tensor, keep)
    OffloadCheckpoints(offload).on_train_begin(None, None, None, model=model)
    OffloadCheckpoints(offload).on_train_begin(None, None, None, model=model)  # a second train() wraps once
    _step(model)
    _step(model)
    # the hooks see only what the checkpoints save themselves: each layer's input, nothing inside the layers
    assert packed == [torch.Size([2, 24, 128])] * 8
    assert len(offload.saved) == 4


def test_small_tensors_and_other_devices_stay_where_they_are():
    offload = CheckpointInputs()  # CUDA tensors of at least 1 MiB
    small, on_cpu = torch.zeros(8), torch.zeros(1 << 20)
    assert offload.pack(small) is small and offload.pack(on_cpu) is on_cpu
    assert offload.saved == []
    parameter = torch.nn.Parameter(torch.zeros(1 << 20))
    assert CheckpointInputs(min_bytes=0, devices=("cpu",)).pack(parameter) is parameter


@pytest.mark.parametrize("overrides, on_gpu, sharded, expected", [
    (("+recipe=llama7b",), True, False, True),
    (("+recipe=llama7b",), False, False, False),  # nothing to free on the CPU
    (("+recipe=llama7b",), True, True, False),  # FSDP: not measured
    (("+recipe=llama7b", "training.gradient_checkpointing=false"), True, False, False),  # no checkpoints
    (("+recipe=llama7b", "performance=off"), True, False, False),
])
def test_the_switch_applies_under_gradient_checkpointing_on_a_gpu(tiny_config, overrides, on_gpu, sharded, expected):
    assert offloads_checkpoints(tiny_config(*overrides), on_gpu=on_gpu, sharded=sharded) == expected


def test_the_trainer_wraps_the_checkpoints_where_the_switch_applies(tiny_config, tmp_path, monkeypatch):
    from qlora.data import prepare_sft_data
    from qlora.stages import trainer as trainer_stage
    from qlora.stages.model import load_tokenizer

    config = tiny_config("training.gradient_checkpointing=true")
    tokenizer = load_tokenizer(config.model)
    data = prepare_sft_data(config.data, tokenizer, config.training.seed)
    for applies in (False, True):  # False: this machine, no GPU; True: as offloads_checkpoints says on a GPU
        if applies:
            monkeypatch.setattr(trainer_stage, "offloads_checkpoints", lambda *args, **kwargs: True)
        trainer = trainer_stage.build_trainer(config, _model(config), tokenizer, data.train, tmp_path)
        assert any(isinstance(c, OffloadCheckpoints) for c in trainer.callback_handler.callbacks) == applies


def test_the_wrapped_checkpoint_is_torchs_with_the_hooks_around_it(tiny_config):
    model, offload = _model(tiny_config()), CheckpointInputs(min_bytes=0, devices=("cpu",))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    original = layers[0]._gradient_checkpointing_func
    OffloadCheckpoints(offload).on_train_begin(None, None, None, model=model)
    assert all(layer._gradient_checkpointing_func.qlora_offload_wraps is original for layer in layers)
