"""performance.embeddings_on_host: the input embedding table in host memory while training.

On the CPU the table's device and the host are the same, so these tests check the lookup that runs with the table
on the host (rows gathered there, then copied to the table's own device), which tables move, and when they move
back. The GPU test (tests/test_gpu.py) checks the memory and the copies to the GPU."""

import json

import pytest
import torch

from conftest import tiny_lora_model
from qlora.stages.host_embeddings import (
    EmbeddingsOnHost,
    keeps_embeddings_on_host,
    movable_embedding,
    move_back,
    move_to_host,
    on_device,
)


def _step(model):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_looked_up_on_the_host_the_model_trains_the_same(tiny_config, monkeypatch):
    config = tiny_config()
    model = tiny_lora_model(config)
    embedding = movable_embedding(model)
    assert embedding is model.get_input_embeddings()
    lookups = []
    select = torch.index_select
    monkeypatch.setattr(torch, "index_select",
                        lambda *args, **kwargs: lookups.append(args[0]) or select(*args, **kwargs))
    move_to_host(embedding)
    loss, grads = _step(model)
    assert lookups == [embedding.weight]  # the rows were gathered from the table, not by the plain embedding
    reference_loss, reference = _step(tiny_lora_model(config))
    assert loss == reference_loss
    assert grads.keys() == reference.keys()
    assert all(torch.equal(grads[name], grad) for name, grad in reference.items())


def test_generation_gets_the_table_back_on_its_device_and_training_its_host_copy(tiny_config):
    model = tiny_lora_model(tiny_config())
    embedding = model.get_input_embeddings()
    host = torch.device("cpu")
    move_to_host(embedding, host)
    with on_device(model):
        assert embedding.qlora_host is None  # looked up as a plain embedding
    assert embedding.qlora_host == host
    move_back(embedding)
    assert embedding.qlora_host is None
    with on_device(model):  # nothing to move
        assert embedding.qlora_host is None


def test_tied_or_trained_tables_stay_where_they_are(tiny_config):
    model = tiny_lora_model(tiny_config())
    embedding = model.get_input_embeddings()
    embedding.weight.requires_grad_(True)
    assert movable_embedding(model) is None
    embedding.weight.requires_grad_(False)
    model.get_output_embeddings().weight = embedding.weight
    assert movable_embedding(model) is None


@pytest.mark.parametrize("overrides, on_gpu, processes, expected", [
    (("+recipe=llama7b",), True, 1, True),
    (("+recipe=llama7b",), False, 1, False),  # nothing to free on the CPU
    (("+recipe=llama7b",), True, 2, False),  # several processes: not measured
    (("+recipe=llama7b", "performance.embeddings_on_host=false"), True, 1, False),
    (("+recipe=llama7b", "performance=off"), True, 1, False),
])
def test_the_switch_applies_on_a_gpu_in_one_process(tiny_config, overrides, on_gpu, processes, expected):
    assert keeps_embeddings_on_host(tiny_config(*overrides), on_gpu=on_gpu, processes=processes) == expected


def test_a_run_keeps_the_table_on_the_host_while_it_trains_and_answers_the_held_out_prompts(
        tiny_config, tmp_path, monkeypatch):
    """The held-out check during training generates with the table on the device; the run's losses are those of a
    run without the switch, and the table is back on its device when training ends."""
    from qlora.pipeline import run_training
    from qlora.stages import heldout, host_embeddings
    from qlora.stages import trainer as trainer_stage

    overrides = ("training.max_steps=4", "training.logging_steps=1", "training.eval_steps=2",
                 "eval.during_training=true", "eval.exact_match_samples=2")
    plain = run_training(tiny_config(*overrides, f"training.output_dir={tmp_path / 'plain'}"))
    where = []
    begin = EmbeddingsOnHost.on_train_begin
    monkeypatch.setattr(trainer_stage, "keeps_embeddings_on_host", lambda *args, **kwargs: True)

    def begin_recorded(self, *args, **kwargs):
        control = begin(self, *args, **kwargs)
        where.append(("train begin", self.embedding.qlora_host))
        return control

    monkeypatch.setattr(EmbeddingsOnHost, "on_train_begin", begin_recorded)
    generate = host_embeddings.on_device

    def on_device_recorded(model):
        where.append(("generation", getattr(model.get_input_embeddings(), "qlora_host", None)))
        return generate(model)

    monkeypatch.setattr(heldout, "on_device", on_device_recorded)
    moved = run_training(tiny_config(*overrides, f"training.output_dir={tmp_path / 'moved'}"))
    host = torch.device("cpu")
    assert where[0][0] == "generation" and where[1] == ("train begin", host)  # the check before training, then
    assert ("generation", host) in where[2:]  # a check during training found the table on the host
    assert where[-1] == ("generation", None)  # the check after training: back on its device
    losses = [[row["loss"] for row in map(json.loads, open(f"{run.run_dir}/metrics.jsonl")) if "loss" in row]
              for run in (plain, moved)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
