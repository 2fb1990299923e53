"""On a CUDA GPU (python -m pytest -m gpu): the tiny model with the 7B recipes' GPU settings."""

import json

import bitsandbytes as bnb
import pytest
import torch

from qlora.pipeline import run_training
from qlora.stages.model import load_quantized_model

pytestmark = pytest.mark.gpu

# What llama7b and the other GPU recipes use: bf16 compute, fused AdamW, gradient checkpointing, compiled decoder
# layers (the tiny recipe turns compilation off for the CPU).
GPU_SETTINGS = ("quantization.compute_dtype=bfloat16", "model.dtype=bfloat16", "training.optim=adamw_torch_fused",
                "training.gradient_checkpointing=true", "performance.torch_compile=true")


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


def test_training_allocates_in_expandable_segments(tiny_config, tmp_path):
    """performance.expandable_segments, once CUDA runs (earlier tests started it): the memory training allocates
    lies in segments the allocator grows in place."""
    run_training(tiny_config(*GPU_SETTINGS, "training.max_steps=2", f"training.output_dir={tmp_path}"))
    torch.cuda.empty_cache()  # the segments left are those allocated since
    x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    segments = torch.cuda.memory._snapshot()["segments"]
    assert [s["is_expandable"] for s in segments if s["address"] <= x.data_ptr() < s["address"] + s["total_size"]] \
        == [True]


def test_generate_evaluate_and_merge_on_the_gpu(trained_run, tmp_path):
    from qlora.config import DataConfig, EvaluateConfig, GenerateConfig, MergeConfig
    from qlora.evaluate import evaluate
    from qlora.generate import generate
    from qlora.merge import merge
    from qlora.runs import load_adapted_model

    config, run_dir = trained_run
    model, _, _ = load_adapted_model(str(run_dir), None, None, trust_remote_code=False)
    assert model.device.type == "cuda"
    rows = [json.loads(line) for line in open(config.data.heldout_path)][:8]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    answers = generate(GenerateConfig(run=str(run_dir), input_file=str(tmp_path / "prompts.jsonl"), max_new_tokens=4))
    assert sum(a.strip() == row["output"] for a, row in zip(answers, rows)) >= 6
    report = evaluate(EvaluateConfig(run=str(run_dir), data=DataConfig(path=config.data.heldout_path),
                                     max_new_tokens=4, output_file=str(tmp_path / "eval.json")))
    assert report["exact_match"] >= 0.9
    result = merge(MergeConfig(run=str(run_dir), from_dequantized=True, output_dir=str(tmp_path / "merged")))
    assert 0.0 < result.dequantization_error < 0.2


def _loss_and_gradients_on_cuda(config, attach):
    """The tiny model on CUDA with the adapters `attach` puts on it (LoRA B random, so that every LoRA term shows),
    one bf16 autocast forward and backward pass under gradient checkpointing: the loss and the LoRA gradients."""
    from qlora.stages.model import frozen_weights_dtype, prepare_for_kbit_training

    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    torch.manual_seed(0)
    model = load_quantized_model(config.model, config.quantization, torch.device("cuda", 0))
    dtype = frozen_weights_dtype(config.performance, config.quantization)
    model = attach(prepare_for_kbit_training(model, True, dtype))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.train()
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_up_to_bf16(result, reference_result):
    (loss, grads), (reference_loss, reference) = result, reference_result
    assert loss == pytest.approx(reference_loss, rel=1e-2)
    for name, grad in reference.items():
        assert torch.linalg.norm(grad) > 0, name
        assert torch.linalg.norm(grads[name] - grad) <= 0.05 * torch.linalg.norm(grad), name


def test_fused_lora_computes_peft_function_on_cuda(tiny_config):
    """bf16 under autocast on CUDA, with dropout and gradient checkpointing: bitsandbytes' CUDA kernels and
    cuBLAS in the fused function give peft's loss and gradients up to bf16 rounding."""
    from qlora.stages.adapters import attach_lora

    config = tiny_config(*GPU_SETTINGS, "lora.dropout=0.1")

    def run(fused):
        return _loss_and_gradients_on_cuda(config, lambda model: attach_lora(model, config.lora, fused=fused))

    _assert_same_up_to_bf16(run(fused=True), run(fused=False))


def test_compiled_layers_compute_the_eager_gradients_on_cuda(tiny_config):
    """performance.torch_compile with the fused LoRA function, under gradient checkpointing and autocast: the
    compiled decoder layers give the eager layers' loss and LoRA gradients. (With torch 2.11 an in-place op on the
    fused function's output made every compiled LoRA gradient zero, on CUDA only: the adapters never trained.)"""
    from qlora.stages.adapters import attach_training_adapters

    def run(compiled):
        config = tiny_config(*GPU_SETTINGS, "lora.dropout=0", f"performance.torch_compile={compiled}")
        return _loss_and_gradients_on_cuda(config, lambda model: attach_training_adapters(model, config))

    _assert_same_up_to_bf16(run(compiled=True), run(compiled=False))


def test_offloaded_checkpoints_compute_the_same_on_cuda(tiny_config):
    """performance.offload_checkpoints with compiled layers and the fused LoRA function: the layer inputs go to
    pinned host memory on a copy stream and come back for the backward pass, which computes the loss and the LoRA
    gradients of the same run with the inputs left on the GPU."""
    from qlora.stages.adapters import attach_training_adapters
    from qlora.stages.offload import CheckpointInputs, OffloadCheckpoints

    config = tiny_config(*GPU_SETTINGS, "lora.dropout=0.1")
    offload = CheckpointInputs(min_bytes=0)  # the tiny model's inputs are far below the size worth a copy

    def run(offloaded):
        def attach(model):
            model = attach_training_adapters(model, config)
            if offloaded:
                OffloadCheckpoints(offload).on_train_begin(None, None, None, model=model)
            return model

        return _loss_and_gradients_on_cuda(config, attach)

    result = run(offloaded=True)
    assert len(offload.saved) == 4 and all(saved is None for saved in offload.saved)  # all back, then released
    _assert_same_up_to_bf16(result, run(offloaded=False))


def test_embeddings_on_host_free_the_table_and_train_the_same_on_cuda(tiny_config, tmp_path):
    """performance.embeddings_on_host: while training the input embedding table is in host memory (its bytes leave
    the GPU) and its rows come to the GPU; the losses are the run's without the switch, the held-out check during
    training generates on the GPU, and the table is back on the GPU when training ends."""
    from qlora.stages.host_embeddings import move_back, move_to_host, movable_embedding

    model = load_quantized_model(tiny_config(*GPU_SETTINGS).model, tiny_config(*GPU_SETTINGS).quantization,
                                 torch.device("cuda", 0))
    embedding = movable_embedding(model.requires_grad_(False))
    ids = torch.randint(3, 500, (2, 24), device="cuda")
    expected = embedding(ids)
    before = torch.cuda.memory_allocated()
    move_to_host(embedding)
    table = embedding.weight
    assert table.device.type == "cpu" and before - torch.cuda.memory_allocated() >= table.numel() * table.element_size()
    rows = embedding(ids)
    assert rows.device.type == "cuda" and torch.equal(rows, expected)
    move_back(embedding)
    assert embedding.weight.device.type == "cuda"

    settings = (*GPU_SETTINGS, "training.max_steps=6", "training.logging_steps=1", "training.eval_steps=3",
                "eval.during_training=true", "eval.exact_match_samples=4")
    runs = [run_training(tiny_config(*settings, f"performance.embeddings_on_host={on}",
                                     f"training.output_dir={tmp_path / on}")) for on in ("true", "false")]
    losses = [[row["loss"] for row in map(json.loads, open(f"{run.run_dir}/metrics.jsonl")) if "loss" in row]
              for run in runs]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_chunked_mlp_computes_the_same_on_cuda(tiny_config):
    """performance.mlp_chunk_tokens with compiled layers, under gradient checkpointing and autocast: the MLPs in
    chunks of 64 of the 256 tokens give the loss and LoRA gradients of the whole MLPs."""
    from qlora.stages.adapters import attach_training_adapters

    def run(chunk):
        config = tiny_config(*GPU_SETTINGS, "lora.dropout=0", f"performance.mlp_chunk_tokens={chunk}")
        return _loss_and_gradients_on_cuda(config, lambda model: attach_training_adapters(model, config))

    _assert_same_up_to_bf16(run(64), run(0))


def test_compiled_chunks_draw_the_same_dropout_masks_in_the_backward_pass_on_cuda(tiny_config):
    """Compiled chunks with dropout on CUDA (Inductor's own random numbers): the chunked MLP's backward pass
    recomputes each chunk with the forward pass's masks, so its gradients are autograd's for the same compiled
    chunks run with gradients from the same random state."""
    from qlora.stages.adapters import attach_training_adapters
    from qlora.stages.chunked_mlp import _compiled_chunk_forward, _run_in_chunks

    config = tiny_config(*GPU_SETTINGS, "lora.dropout=0.3", "performance.mlp_chunk_tokens=64")
    model = attach_training_adapters(load_quantized_model(config.model, config.quantization, torch.device("cuda", 0)),
                                     config).train()
    mlp = model.base_model.model.model.layers[1].mlp
    trained = [param for param in mlp.parameters() if param.requires_grad]
    for param in trained:
        param.data.normal_(0, 0.05)
    x = torch.randn(2, 128, 128, device="cuda", dtype=torch.bfloat16)

    def gradients(run):
        inputs = x.clone().requires_grad_()
        torch.manual_seed(5)
        run(inputs).float().pow(2).sum().backward()
        found = [inputs.grad] + [param.grad.clone() for param in trained]
        mlp.zero_grad()
        return found

    compiled = _compiled_chunk_forward()
    reference = gradients(lambda inputs: torch.cat([compiled(mlp, chunk) for chunk in inputs.view(-1, 128).split(64)]))
    for grad, expected in zip(gradients(lambda inputs: _run_in_chunks(mlp, inputs)), reference):
        assert torch.linalg.norm(grad.float() - expected.float()) <= 1e-2 * torch.linalg.norm(expected.float())


def test_lm_head_gradient_in_forward_is_trls_on_cuda():
    """performance.lm_head_gradient_in_forward with TRL's Triton kernels, bf16: TRL's log-probabilities and the
    gradient of the hidden states, for 3,000 tokens in tiles of 419 over a vocabulary of 5,000."""
    from trl.kernels import ChunkedLogProbFunction

    from qlora.stages.lm_head import LogProbsWithGradient

    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=generator).bfloat16()
    weight = (torch.randn(5000, 256, device="cuda", generator=generator) / 16).bfloat16()
    targets = torch.randint(0, 5000, (3000,), device="cuda", generator=generator)
    upstream = torch.randn(3000, device="cuda", generator=generator)

    def run(function):
        inputs = hidden.clone().requires_grad_()
        logprobs, entropy, *_ = function.apply(inputs, weight, None, targets, 1.0, 512, None, 1.0,
                                               ("log_probs", "entropy", "is_top1"))
        (logprobs * upstream).sum().backward()
        return logprobs.detach().float(), entropy.detach().float(), inputs.grad.float()

    for found, expected in zip(run(LogProbsWithGradient), run(ChunkedLogProbFunction)):
        assert torch.linalg.norm(found - expected) <= 1e-2 * torch.linalg.norm(expected)
