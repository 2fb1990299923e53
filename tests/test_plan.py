"""The memory planner: parameter counts and footprint against the real loaded model, every recipe on the
CPU, the command line, and the largest batch that fits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from qlora.config import recipes_dir
from qlora.compose import compose_config
from qlora.plan import GiB, largest_batch, load_architecture, longest_sequence, plan_memory
from qlora.stages.model import load_quantized_model

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def test_counts_and_footprint_match_the_loaded_tiny_model(tiny_config):
    config = tiny_config()
    plan = plan_memory(config)
    model = load_quantized_model(config.model, config.quantization, torch.device("cpu"))
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert plan.params.quantized_tensors == len(quantized) == 28
    assert plan.params.quantized == sum(m.in_features * m.out_features for m in quantized)
    # get_memory_footprint counts parameters and buffers (rotary frequencies): packed 4-bit weights and the
    # unquantized ones, not the quantization statistics
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.quantized_weights + plan.unquantized_weights + buffers == model.get_memory_footprint()
    statistics = sum(m.weight.quant_state.absmax.numel() for m in quantized)
    assert plan.quant_statistics >= statistics  # the uint8 absmax (double quant) and its fp32 second level


def test_lora_count_matches_peft(tiny_config):
    from qlora.stages.adapters import attach_lora

    for overrides in ((), ("lora=attention",), ("lora.use_dora=true",)):
        config = tiny_config(*overrides)
        model = attach_lora(load_quantized_model(config.model, config.quantization, torch.device("cpu")), config.lora)
        assert plan_memory(config).params.lora == model.get_nb_trainable_parameters()[0], overrides


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_is_planned_offline(recipe):
    config = compose_config([f"+recipe={recipe}"])
    plan = plan_memory(config)
    assert plan.training_peak > plan.footprint > 0
    assert plan.activations_with_checkpointing < plan.activations_without_checkpointing
    if not recipe.startswith("tiny"):  # the tiny recipes plan the shipped tiny model
        assert "shipped copy" in plan.architecture_source  # no network here
        assert 3.3 * GiB < plan.footprint < 5.6 * GiB  # 7-8B parameters in 4 bits, embeddings in bf16


def test_published_parameter_counts():
    config = compose_config(["+recipe=llama7b"])
    params = plan_memory(config).params
    assert params.quantized + params.unquantized == 6_738_415_616  # Llama-2-7B
    assert params.lora == 39_976_960  # r=16 on the 7 linear layers of 32 blocks


def test_peak_grows_with_batch_and_the_largest_batch_fits():
    config = compose_config(["+recipe=llama7b"])
    architecture = load_architecture(config.model)
    peaks = [plan_memory(config, b, 2048, architecture).training_peak for b in (1, 2, 4)]
    assert peaks[0] < peaks[1] < peaks[2]
    batch = largest_batch(config, 24 * GiB, architecture)
    assert plan_memory(config, batch, None, architecture).training_peak <= 24 * GiB
    assert plan_memory(config, batch + 1, None, architecture).training_peak > 24 * GiB
    assert longest_sequence(config, 1 * GiB, architecture) == 0  # the weights alone do not fit
    longest = longest_sequence(config, 24 * GiB, architecture)  # at batch size 1, as the plan command prints it
    assert plan_memory(config, 1, longest, architecture).training_peak <= 24 * GiB
    assert plan_memory(config, 1, longest + 64, architecture).training_peak > 24 * GiB
    assert longest > 4096  # memory alone decides, not Llama-2's own context (RoPE scaling extends it)


def test_plan_command_with_gpu_memory_flag(tmp_path):
    result = run_cli("+recipe=llama7b", "--gpu-memory", "24GiB", cwd=tmp_path, command="qlora.plan")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config.json from qlora's shipped copy" in result.stdout
    for text in ("quantized linear (nf4)", "LoRA (trainable, r=16)", "quantization statistics", "load peak",
                 "training peak at batch 4 x 2048 tokens", "without gradient checkpointing", "logits and loss",
                 "fits plan.gpu_memory=24GiB", "largest batch size at data.max_length=2048",
                 "longest sequence at batch size 1:", "beyond the model's own context of 4,096",
                 "unquantized ones in bfloat16 after k-bit preparation"):  # performance.frozen_weights_float32=false
        assert text in result.stdout, text
    same = run_cli("+recipe=llama7b", "plan.gpu_memory=24GiB", cwd=tmp_path, command="qlora.plan")
    assert same.stdout == result.stdout
    assert list(tmp_path.iterdir()) == []  # planning writes nothing


def test_plan_command_refuses_a_bad_memory_size(tmp_path):
    result = run_cli("--gpu-memory=lots", cwd=tmp_path, command="qlora.plan")
    assert result.returncode == 2 and "plan.gpu_memory=lots is not a memory size" in result.stderr
    assert "Traceback" not in result.stderr


# bitsandbytes quantizes on the CPU through float32 and int64 temporaries of the tensor at hand (abs, bucketize,
# clamp, mul): about 16 bytes per element, measured here; on a GPU its kernel needs none.
CPU_QUANTIZE_BYTES_PER_ELEMENT = 20


def save_random_llama(folder, layers: int) -> int:
    """A random bf16 Llama of `layers` layers in 16 MB shards, with the tiny tokenizer; returns its weights' bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora.config import ASSETS_DIR

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    config = LlamaConfig(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=12, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="16MB")
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_loading_holds_the_quantized_model_and_one_shard_not_the_full_model(tmp_path):

    # glibc otherwise serves large blocks from its heap once one was freed, and keeps them after they are freed
    # again: resident memory would then count blocks nothing holds (as max_memory_allocated on a GPU does not)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    measured = {}
    for layers in (4, 12):
        full_precision = save_random_llama(tmp_path / str(layers), layers)
        measure = [sys.executable, str(Path(__file__).parent / "load_peak.py"), str(tmp_path / str(layers))]
        done = subprocess.run(measure, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        measured[layers] = {**json.loads(done.stdout.splitlines()[-1]), "full_precision": full_precision}
    for m in measured.values():
        bound = m["footprint"] + m["largest_shard"] + CPU_QUANTIZE_BYTES_PER_ELEMENT * m["largest_quantized"]
        assert m["peak"] <= bound, m
    deep, shallow = measured[12], measured[4]
    assert deep["peak"] < 0.6 * deep["full_precision"]
    # three times the layers: the quantized model grows, what loading holds beyond it does not
    assert deep["peak"] - deep["footprint"] < shallow["peak"] - shallow["footprint"] + 8 * 2**20, measured


def _saved_bytes(tiny_config, *overrides: str, keep_for_backward: bool = False) -> tuple[int, int]:
    """Bytes autograd keeps for one training forward pass of the tiny model (each storage once), and the number
    of adapted layers' input elements (the unit of the planner's dropout term). No gradient checkpointing: every
    layer keeps what, under checkpointing, the recomputed layer keeps."""
    from qlora.stages.adapters import attach_lora
    from qlora.stages.model import frozen_weights_dtype, prepare_for_kbit_training

    config = tiny_config(*overrides)
    model = load_quantized_model(config.model, config.quantization, torch.device("cpu"))
    dtype = frozen_weights_dtype(config.performance, config.quantization)
    model = prepare_for_kbit_training(model, False, dtype)
    model = attach_lora(model, config.lora, fused=config.performance.fused_lora, keep_for_backward=keep_for_backward)
    model.train()
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    arch = model.config
    adapted_inputs = arch.num_hidden_layers * (6 * arch.hidden_size + arch.intermediate_size)
    return sum(storages.values()), ids.numel() * adapted_inputs


def test_fused_lora_dropout_keeps_only_its_mask(tiny_config):
    from qlora.plan import FUSED_DROPOUT_PER_INPUT

    without, elements = _saved_bytes(tiny_config, "lora.dropout=0")
    with_dropout, _ = _saved_bytes(tiny_config, "lora.dropout=0.1")
    assert with_dropout - without == FUSED_DROPOUT_PER_INPUT * elements
    peft_without, _ = _saved_bytes(tiny_config, "lora.dropout=0", "performance.fused_lora=false")
    peft_with, _ = _saved_bytes(tiny_config, "lora.dropout=0.1", "performance.fused_lora=false")
    assert peft_with - peft_without > 3 * (with_dropout - without)  # peft keeps each dropout's output too


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reused_recomputed_weights_cost_what_the_planner_adds(tiny_config, dropout):
    """performance.reuse_recomputed_weights: per layer, what the fused layers keep beyond their inputs (every
    dequantized weight, and nothing for dropout: its output is made again from the input and the mask) is the
    planner's extra working set, measured with saved_tensors_hooks."""
    overrides = (f"lora.dropout={dropout}", "training.batch_size=4", "data.max_length=64",
                 "training.gradient_checkpointing=true")
    without, _ = _saved_bytes(tiny_config, *overrides)
    kept, _ = _saved_bytes(tiny_config, *overrides, keep_for_backward=True)
    on, off = (plan_memory(tiny_config(*overrides, f"performance.reuse_recomputed_weights={switch}"))
               for switch in ("true", "false"))
    transient = 2 * on.params.largest_quantized * 4  # the dequantized weight the planner drops for float32 compute
    layers = load_architecture(tiny_config().model).config.num_hidden_layers
    assert (kept - without) / layers == on.training_peak - off.training_peak + transient


def test_offloaded_checkpoints_and_mlp_chunks_are_planned():
    """performance.offload_checkpoints keeps two layer inputs on the GPU instead of one per layer;
    performance.mlp_chunk_tokens bounds the MLP's share of the working set by the chunk, and changes nothing for
    micro-batches of at most one chunk."""
    config = compose_config(["+recipe=llama3_8b"])
    architecture = load_architecture(config.model)
    arch = architecture.config
    tokens = 65536

    def peak(*overrides, tokens=tokens):
        return plan_memory(compose_config(["+recipe=llama3_8b", *overrides]), 1, tokens, architecture).training_peak

    offloaded = peak()
    assert peak("performance.offload_checkpoints=false") - offloaded == \
        (arch.num_hidden_layers - 2) * tokens * arch.hidden_size * 2
    assert peak("performance.activation_offloading=true") < offloaded  # TRL's: not even two stay
    whole = peak("performance.mlp_chunk_tokens=0")
    assert whole > offloaded and peak("performance.mlp_chunk_tokens=8192") > offloaded
    assert peak("performance.mlp_chunk_tokens=0", tokens=4096) == peak(tokens=4096)  # one chunk: as whole


def test_dpo_plans_both_sides_of_each_pair_and_the_reference_pass(tmp_path):
    def plan(*overrides, batch=2):
        return plan_memory(compose_config(["+recipe=llama7b", "data.max_length=1024", *overrides]), batch_size=batch)

    sft, dpo, orpo = plan(batch=4), plan("training.method=dpo"), plan("training.method=orpo")
    kto = plan("training.method=kto", batch=4)
    # 2 pairs are 4 sequences: the policy's activations are those of an SFT batch of 4
    assert dpo.sequences_per_example == 2 and dpo.activations == sft.activations == kto.activations
    # the reference's forward pass (adapter off, no gradients) comes on top of what the policy's pass keeps; it
    # is smaller than the backward pass's working set here, so the peak is the policy's
    assert 0 < dpo.reference_pass < dpo.activations + dpo.logits_loss and sft.reference_pass == orpo.reference_pass == 0
    assert dpo.training_peak == sft.training_peak
    # without checkpointing the policy keeps every layer's activations while the reference runs
    unchecked = plan("training.method=dpo", "training.gradient_checkpointing=false")
    assert unchecked.reference_pass > dpo.reference_pass
    assert orpo.logits_loss > 4 * dpo.logits_loss  # ORPO's trainer computes the full logits
    # continuing an adapter keeps a frozen copy of it as the reference's
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    continued = plan("training.method=dpo", f"model.adapter={adapter}")
    assert continued.reference_adapter == continued.params.lora * 4
    assert continued.training_peak == dpo.training_peak + continued.reference_adapter


def test_plan_command_shows_the_pairs_and_the_reference(tmp_path):
    done = run_cli("+recipe=llama7b_dpo", cwd=tmp_path, command="qlora.plan")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training peak at batch 2 pairs (2 x 2 sequences) x 1024 tokens" in done.stdout
    assert "or in the reference's pass (adapter off), with the policy's kept activations" in done.stdout
