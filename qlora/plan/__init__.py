"""The memory planner: what a QLoRA run will need, from the config alone, before any weight is read.

The model is built on the meta device from its config.json (the local folder or the hub cache first,
else the copy shipped in qlora/assets/architectures/), which gives every parameter's shape; the
formulas below turn shapes, batch and sequence length into bytes. Each term is kept separate and named
so that a change in what training stores (bf16 frozen weights, fused losses, offloading) changes one term.

The terms model the code as it trains today:
- bitsandbytes 4-bit: two weights per byte, one absmax per 64 weights (fp32, or uint8 with double quant
  plus one fp32 per 256 blocks); `lm_head` stays unquantized.
- peft's prepare_model_for_kbit_training casts every unquantized weight (embeddings, norms, lm_head,
  biases; with quantization=none every weight) to float32, so the residual stream is float32 too; with
  performance.frozen_weights_float32=false (the default) they are cast back to the compute dtype, and the
  residual stream is in the compute dtype.
- performance.offload_checkpoints (under gradient checkpointing) keeps the per-layer checkpoints in host memory but
  two; performance.activation_offloading=true keeps all of them there.
- performance.mlp_chunk_tokens: the MLP's tokens x intermediate-size tensors exist for one chunk at a time.
- TRL casts the adapters of a quantized model to bf16 (qlora keeps them in float32 with float32 compute).
- gradient checkpointing (non-reentrant, one checkpoint per decoder layer) keeps each layer's float32
  input and recomputes one layer at a time in the backward pass.
- TRL's fused LM head computes the loss in tiles of 4096 tokens x 32768 vocabulary entries, never the
  full logits.
- performance.reuse_recomputed_weights (fused LoRA under gradient checkpointing): the recomputed layer keeps its
  dequantized weights until its backward pass.
- performance.embeddings_on_host: an untied input embedding table is in host memory while training (on a GPU, one
  process); its bytes leave the training weights, not the loaded footprint.
- training.method=dpo|orpo: each pair's chosen and rejected sequences run side by side, twice the sequences of
  a micro-batch. dpo|kto: after the policy's forward pass, while its saved activations wait for the backward pass,
  the reference (the same model, adapter switched off) runs a forward pass without gradients or checkpointing; with
  model.adapter, TRL keeps a frozen float32 copy of the continued adapter as the reference's. ORPO (TRL's
  experimental trainer) computes the full logits and their log-softmax instead of the fused head's tiles.
  These terms follow the trainers' code; they are not yet measured on a GPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from qlora.config import ASSETS_DIR, REFERENCE_METHODS, ModelConfig, TrainConfig
from qlora.errors import QLoRAError
from qlora.hub import prepare_hub_access
from qlora.stages.fused_lora import fused_lora, keeps_recomputed_tensors
from qlora.stages.host_embeddings import keeps_embeddings_on_host
from qlora.stages.offload import offloads_checkpoints

log = logging.getLogger(__name__)

ARCHITECTURES_DIR = ASSETS_DIR / "architectures"
GiB = 2**30
# Per decoder layer and token, the bytes autograd keeps without gradient checkpointing, as multiples of the
# hidden size, the intermediate size and the key/value width, for LoRA on every linear layer. Measured with
# torch.autograd.graph.saved_tensors_hooks on the real stages (nf4, LoRA, SDPA), by compute dtype.
SAVED_PER_TOKEN = {2: (27.8, 14.9, 4.5), 4: (30.3, 17.5, 9.0)}  # compute bytes -> (hidden, intermediate, kv)
DROPOUT_PER_INPUT = {2: 1.9, 4: 5.15}  # LoRA dropout's mask and output, per element of each adapted layer's input
# performance.fused_lora: the fused LoRA function keeps the layer's input (as LoRA without dropout does) and only
# a mask per adapted layer, eight elements to a byte
FUSED_DROPOUT_PER_INPUT = 0.125
# The GPU default (bf16 compute, frozen weights and residual stream in bf16, compiled decoder layers, fused LoRA,
# offloaded checkpoints, the MLP in chunks): beyond the checkpoints kept on the GPU and the dropout masks, the
# training peak grows by this many bytes per token and per unit of hidden size, and per token of one MLP chunk and
# unit of intermediate size: the recomputed layer, its backward pass and the loss head's hidden states. Fitted to
# torch.cuda.max_memory_allocated on an H200, LoRA dropout 0: Llama-2-7B 2 x 2048 (5.11 GiB) and Llama-3-8B
# 1 x 65,536 (14.29 GiB), rounded up; with dropout 0.05 Llama-2-7B 2 x 2048 plans 5.29 GiB against 5.27 measured
# (scripts/benchmarks/results/2026-11-29-h200-session.md, call 3). The earlier fit (41.8, 6.1), made at 1k-8k
# tokens with Liger's eager kernels and every checkpoint on the GPU, planned 27% above the measured peak at 65,536.
GPU_WORKING_SET_PER_TOKEN = (29.0, 2.0)
# performance.offload_checkpoints: the last layer's input stays on the GPU, and one comes back ahead of its layer
OFFLOAD_KEPT_CHECKPOINTS = 2
LOSS_TILE_TOKENS, LOSS_TILE_VOCAB = 4096, 32768  # TRL's fused LM head tiles (trl/kernels/chunked_logprob.py)
CUBLAS_WORKSPACE = 32 * 2**20
BNB_BLOCK, BNB_BLOCK2 = 64, 256
LONGEST_SEQUENCE_SEARCHED = 2**22  # 4-bit block size, and blocks per double-quant block


@dataclass
class Architecture:
    config: PretrainedConfig
    source: str  # where config.json came from: the local folder, the hub cache, or the shipped copy


@dataclass
class ParameterCounts:
    quantized: int  # linear weights bitsandbytes quantizes
    quantized_tensors: int
    quantized_rows: int  # output features of the quantized layers (int8 keeps a scale per row)
    largest_quantized: int  # elements of the largest quantized weight (dequantized for each matmul)
    unquantized: int  # embeddings, norms, lm_head, biases
    host_embeddings: int  # the input embedding table where it can be in host memory while training (untied, frozen)
    lora: int  # trainable: adapters (+ DoRA magnitudes, modules_to_save copies)
    largest_tensor: int  # elements of the largest weight of all: what loading holds in full precision at once


@dataclass
class MemoryPlan:
    """Bytes, for one GPU. `training_peak` is what torch.cuda.max_memory_allocated should show."""

    architecture_source: str
    params: ParameterCounts
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    # the loaded model (before k-bit preparation)
    quantized_weights: int
    quant_statistics: int  # absmax (double-quantized or not); get_memory_footprint does not count them
    unquantized_weights: int  # in the load dtype
    largest_tensor_bytes: int
    largest_shard_bytes: Optional[int]  # known when the checkpoint is a local folder
    # training
    weights: int  # after k-bit preparation (unquantized weights in float32), while training
    host_embeddings: int  # the input embedding table in host memory while training (performance.embeddings_on_host)
    lora_and_optimizer: int  # adapters, their gradients and optimizer states in torch's allocator
    paged_optimizer: int  # paged optimizer states: CUDA unified memory, outside torch's allocator
    activations: int  # with the configured gradient checkpointing
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    logits_loss: int
    workspace: int
    sequences_per_example: int = 1  # 2 for DPO and ORPO: a pair's chosen and rejected sequences
    # DPO, KTO: the activations the policy's forward pass keeps plus the reference's forward pass (0: no reference)
    reference_pass: int = 0
    reference_adapter: int = 0  # DPO, KTO with model.adapter: the frozen copy of the continued adapter

    @property
    def footprint(self) -> int:
        return self.quantized_weights + self.quant_statistics + self.unquantized_weights

    @property
    def load_peak(self) -> int:
        """transformers 5 loads one tensor at a time and quantizes it on the device."""
        return self.footprint + self.largest_tensor_bytes + CUBLAS_WORKSPACE

    @property
    def load_bound(self) -> Optional[int]:
        """The QLoRA bound: the quantized model plus one shard of full-precision weights (+ a workspace)."""
        if self.largest_shard_bytes is None:
            return None
        return self.footprint + self.largest_shard_bytes + CUBLAS_WORKSPACE

    @property
    def training_peak(self) -> int:
        return (self.weights + self.lora_and_optimizer + self.reference_adapter + self.workspace
                + max(self.activations + self.logits_loss, self.reference_pass))


def plan_memory(config: TrainConfig, batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                architecture: Optional[Architecture] = None) -> MemoryPlan:
    """The plan for the configured batch and sequence length (data.max_length), or the ones given."""
    architecture = architecture or load_architecture(config.model)
    if batch_size is None:
        batch_size = config.training.batch_size if isinstance(config.training.batch_size, int) else 1
    seq_len = seq_len or config.data.max_length
    arch = architecture.config.get_text_config()
    params = count_parameters(architecture.config, config)
    method, compute = config.quantization.method, _bytes(config.quantization.compute_dtype)
    load = _bytes(str(load_dtype(config.model, architecture.config)).removeprefix("torch."))
    quantized, statistics = quantized_bytes(params, method, config.quantization.double_quant)
    training_method = config.training.method
    sequences = 2 if training_method in ("dpo", "orpo") else 1  # a pair's chosen and rejected sequences, side by side
    tokens = batch_size * seq_len * sequences
    hidden, intermediate, layers = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    head_dim = getattr(arch, "head_dim", None) or hidden // arch.num_attention_heads
    kv = (getattr(arch, "num_key_value_heads", None) or arch.num_attention_heads) * head_dim
    h_coef, i_coef, kv_coef = SAVED_PER_TOKEN[compute]
    # the residual stream (embeddings' output, norms' inputs, checkpoints) is in the frozen weights' dtype
    residual = 4 if config.performance.frozen_weights_float32 else compute
    # the MLP's tokens x intermediate tensors exist for one chunk at a time (performance.mlp_chunk_tokens)
    chunk = config.performance.mlp_chunk_tokens
    mlp_tokens = min(tokens, chunk) if chunk else tokens
    # one decoder layer's saved tensors; dropout adds its mask and output for every adapter's input
    layer = int(tokens * (h_coef * hidden + kv_coef * kv) + mlp_tokens * i_coef * intermediate)
    dropout_masks = 0
    if config.lora.dropout > 0:
        per_input = FUSED_DROPOUT_PER_INPUT if fused_lora(config) else DROPOUT_PER_INPUT[compute]
        dropout_masks = int(per_input * (tokens * 6 * hidden + mlp_tokens * intermediate))
    layer += dropout_masks
    embedding_and_norm = tokens * hidden * residual * 2  # the embedding output and the final norm's input
    # the backward pass of one layer holds the gradients of its largest activations at once
    backward = residual * (mlp_tokens * 3 * intermediate + tokens * 2 * hidden)
    # one checkpoint (the layer's input) per layer; offloaded, the last layer's stays and one comes back ahead of
    # the backward pass (performance.offload_checkpoints); none with TRL's offloading of every activation
    kept_checkpoints = 0 if config.performance.activation_offloading else \
        min(layers, OFFLOAD_KEPT_CHECKPOINTS) if offloads_checkpoints(config, on_gpu=True) else layers
    checkpoints = tokens * hidden * residual * kept_checkpoints
    with_checkpointing = checkpoints + layer + backward + embedding_and_norm
    without_checkpointing = layer * layers + backward + embedding_and_norm
    head_hidden = tokens * hidden * residual * 2  # the hidden states the loss head keeps, and their gradient
    calibrated = residual == compute == 2
    if calibrated:  # the measured GPU default replaces the CPU-measured terms of the recomputed layer
        h_gpu, i_gpu = GPU_WORKING_SET_PER_TOKEN
        with_checkpointing = checkpoints + dropout_masks + int(tokens * h_gpu * hidden
                                                               + mlp_tokens * i_gpu * intermediate)
        head_hidden = 0  # part of the fitted working set
    # one tile of logits, and (with a float32 head cast under autocast) one tile of the head's weights
    loss_tile = min(tokens, LOSS_TILE_TOKENS) * min(arch.vocab_size, LOSS_TILE_VOCAB) * compute
    logits_loss = head_hidden + loss_tile + (0 if calibrated else min(arch.vocab_size, LOSS_TILE_VOCAB) * hidden
                                             * compute)
    if training_method == "orpo":  # the full logits and their gradient, their float32 log-softmax, the NLL's on half
        logits_loss = head_hidden + tokens * arch.vocab_size * (2 * compute + 6)
    reference_pass = 0
    if training_method in REFERENCE_METHODS:
        kept = (checkpoints if config.training.gradient_checkpointing else layer * layers) + embedding_and_norm
        # no gradients, no checkpointing: a layer's input and output, one MLP chunk's three intermediate tensors,
        # and the fused head's tile
        transient = tokens * hidden * residual * 2 + mlp_tokens * intermediate * compute * 3 + loss_tile
        reference_pass = kept + head_hidden + transient
    dequantized = 2 * params.largest_quantized * compute if method != "none" else 0  # a weight, transiently
    if keeps_recomputed_tensors(config):  # the recomputed layer keeps every dequantized weight until its backward
        dequantized = params.quantized // layers * compute
    lora_bytes = 4 if method == "none" or compute == 4 else 2
    on_host = params.host_embeddings * residual if keeps_embeddings_on_host(config, on_gpu=True) else 0
    optimizer, paged = optimizer_bytes(config.training.optim, params.lora, lora_bytes)
    return MemoryPlan(
        architecture_source=architecture.source,
        params=params,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=config.training.gradient_checkpointing,
        quantized_weights=quantized,
        quant_statistics=statistics,
        unquantized_weights=params.unquantized * load,
        largest_tensor_bytes=params.largest_tensor * load,
        largest_shard_bytes=largest_shard_bytes(config.model),
        # k-bit preparation: every weight that is not 4/8-bit becomes float32 (or goes back to the compute dtype)
        weights=quantized + statistics + params.unquantized * residual - on_host,
        host_embeddings=on_host,
        lora_and_optimizer=params.lora * lora_bytes * 2 + optimizer,  # weights, gradients, states
        paged_optimizer=paged,
        activations=with_checkpointing if config.training.gradient_checkpointing else without_checkpointing,
        activations_with_checkpointing=with_checkpointing,
        activations_without_checkpointing=without_checkpointing,
        logits_loss=logits_loss,
        # 4-bit weights dequantized for the matmuls; cuBLAS's workspace
        workspace=dequantized + CUBLAS_WORKSPACE,
        sequences_per_example=sequences,
        reference_pass=reference_pass,
        reference_adapter=params.lora * 4 if training_method in REFERENCE_METHODS and config.model.adapter else 0,
    )


def quantized_bytes(params: ParameterCounts, method: str, double_quant: bool) -> tuple[int, int]:
    """Bytes of the quantized linear weights and of their quantization statistics."""
    n, tensors = params.quantized, params.quantized_tensors
    if method in ("nf4", "fp4"):
        blocks = n // BNB_BLOCK
        if double_quant:  # uint8 absmax per block; per 256 blocks an fp32 absmax; a 256-entry fp32 code per tensor
            return n // 2, blocks + blocks // BNB_BLOCK2 * 4 + tensors * (256 * 4 + 4)
        return n // 2, blocks * 4
    if method == "int8":
        return n, params.quantized_rows * 4  # one float32 scale per output row
    return 0, 0  # quantization=none: every weight counts as unquantized


def optimizer_bytes(optim: str, lora_params: int, lora_bytes: int) -> tuple[int, int]:
    """(states in torch's allocator, paged states outside it) for the trainable parameters."""
    if optim.startswith("sgd"):
        return 0, 0
    if "8bit" in optim:
        states = lora_params * 2  # two uint8 states per parameter (blockwise statistics are negligible)
    elif "bnb" in optim or "32bit" in optim:
        states = lora_params * 8  # two float32 states
    else:
        states = lora_params * lora_bytes * 2  # torch's optimizers: two states in the parameters' dtype
    return (0, states) if optim.startswith("paged") else (states, 0)


def count_parameters(model_config: PretrainedConfig, config: TrainConfig) -> ParameterCounts:
    """Build the model on the meta device (no memory, no weights read) and count parameters by kind."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    output = model.get_output_embeddings()
    linear = {name: module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not output}
    quantized_layers = list(linear.values()) if config.quantization.method != "none" else []
    quantized = [m.weight.numel() for m in quantized_layers]
    total = sum(p.numel() for p in model.parameters())
    targets = config.lora.target_modules
    adapted = [m for name, m in linear.items()
               if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets]
    lora = sum(config.lora.r * (m.in_features + m.out_features) for m in adapted)
    if config.lora.use_dora:
        lora += sum(m.out_features for m in adapted)  # one magnitude per output feature
    trained = set(config.lora.modules_to_save or [])
    for name in trained:
        lora += sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2] == name)
    embedding = model.get_input_embeddings()
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    host_embeddings = embedding.weight.numel() if (
        type(embedding) is torch.nn.Embedding and names.get(embedding) not in trained
        and (output is None or output.weight is not embedding.weight)) else 0
    return ParameterCounts(
        quantized=sum(quantized),
        quantized_tensors=len(quantized),
        quantized_rows=sum(m.out_features for m in quantized_layers),
        largest_quantized=max(quantized, default=0),
        unquantized=total - sum(quantized),
        host_embeddings=host_embeddings,
        lora=lora,
        largest_tensor=max(p.numel() for p in model.parameters()),
    )


def load_architecture(model: ModelConfig) -> Architecture:
    """config.json from the local folder or the hub cache (AutoConfig), else qlora's shipped copy."""
    prepare_hub_access(model.name_or_path)
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
        local = Path(model.name_or_path).expanduser().is_dir()
        return Architecture(config, f"{model.name_or_path}/config.json" if local else "the Hugging Face hub (cache)")
    except OSError as error:
        shipped = ARCHITECTURES_DIR / (model.name_or_path.replace("/", "--") + ".json")
        if not shipped.is_file():
            raise QLoRAError(
                f"could not read the config.json of model.name_or_path={model.name_or_path} "
                f"({' '.join(str(error).split())}), and qlora "
                f"ships no copy of it (it has {', '.join(sorted(p.stem for p in ARCHITECTURES_DIR.glob('*.json')))}). "
                f"Download the model's config.json into a folder and set model.name_or_path to that folder."
            ) from error
        values = json.loads(shipped.read_text())
        return Architecture(AutoConfig.for_model(**values), f"qlora's shipped copy ({shipped.name}; offline)")


def load_dtype(model: ModelConfig, model_config: PretrainedConfig) -> torch.dtype:
    """The dtype unquantized weights load in: model.dtype, or config.json's with model.dtype=auto."""
    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    dtype = getattr(model_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def largest_shard_bytes(model: ModelConfig) -> Optional[int]:
    """Size of the largest safetensors file of a local checkpoint (None for a hub id)."""
    folder = Path(model.name_or_path).expanduser()
    shards = [path.stat().st_size for path in folder.glob("*.safetensors")] if folder.is_dir() else []
    return max(shards) if shards else None


def largest_batch(config: TrainConfig, memory: int, architecture: Optional[Architecture] = None) -> int:
    """The largest batch size whose planned training peak fits `memory` bytes at data.max_length (0: none)."""
    architecture = architecture or load_architecture(config.model)
    return _largest(lambda b: plan_memory(config, b, None, architecture).training_peak <= memory, 4096)


def longest_sequence(config: TrainConfig, memory: int, architecture: Optional[Architecture] = None,
                     batch_size: int = 1) -> int:
    """The longest sequence (a multiple of 64, up to 2**22 tokens) whose planned peak fits `memory` bytes at
    `batch_size` (0: none). Memory alone: the model's own context (max_position_embeddings) may be shorter."""
    architecture = architecture or load_architecture(config.model)
    fits = _largest(lambda n: plan_memory(config, batch_size, 64 * n, architecture).training_peak <= memory,
                    LONGEST_SEQUENCE_SEARCHED // 64)
    return 64 * fits


def _largest(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for a monotone fits; 0 when even 1 does not fit."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()

