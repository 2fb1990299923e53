"""The configuration schema: one dataclass per group, every default in exactly one place.

Hydra composes `configs/` and `recipes/` on top of these dataclasses (registered with its ConfigStore),
so a misspelt key or a value of the wrong type is refused while composing. `qlora.validation` then
checks what types cannot express (ranges, choices, combinations) before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from qlora.errors import QLoRAError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

QUANT_METHODS = ("nf4", "fp4", "int8", "none")
DTYPES = ("bfloat16", "float16", "float32")
# supervised fine-tuning, or preference tuning with TRL's DPO, ORPO or KTO trainer
TRAINING_METHODS = ("sft", "dpo", "orpo", "kto")
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
REFERENCE_METHODS = ("dpo", "kto")  # compare the trained model with a reference: the base, adapter off
SFT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
PREFERENCE_FORMATS = ("preference", "implicit_preference", "unpaired_preference")
DATA_FORMATS = ("auto", *SFT_FORMATS, *PREFERENCE_FORMATS)
# the formats each method trains on; KTO also takes pairs (TRL unpairs them into a desirable and an undesirable row)
METHOD_FORMATS = {"sft": SFT_FORMATS, "dpo": PREFERENCE_FORMATS[:2], "orpo": PREFERENCE_FORMATS[:2],
                  "kto": PREFERENCE_FORMATS}

TRUNCATION = ("truncate", "drop")
ON_ERROR = ("raise", "skip")
NONFINITE_ACTIONS = ("stop", "skip")
# training.report_to: transformers' integrations qlora sets up and tests (metrics.jsonl is always written)
REPORT_DESTINATIONS = ("tensorboard", "wandb", "mlflow")
# training.batch_size=auto: on a GPU the memory planner's largest batch that fits with this share of the memory
# kept free; on the CPU (no device memory to plan against) AUTO_BATCH_SIZE_START. Out of memory shrinks it by 10%.
AUTO_BATCH_MEMORY_MARGIN = 0.10
AUTO_BATCH_SIZE_START = 64


def methods_for(data_format: str) -> list[str]:
    """The training methods that train on data of `data_format`."""
    return [method for method, formats in METHOD_FORMATS.items() if data_format in formats]


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    # dtype of the weights that stay unquantized (embeddings, norms, lm_head); "auto" reads config.json
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    revision: Optional[str] = None
    # an adapter to continue training instead of a new one: a run folder (its adapter/) or an adapter folder,
    # e.g. an SFT run before DPO; its LoRA settings replace the lora group's
    adapter: Optional[str] = None


@dataclass
class QuantizationConfig:
    method: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    # uint8 for one GPU; a float dtype lets FSDP shard the 4-bit weights
    quant_storage: str = "uint8"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[list[str]] = None


@dataclass
class ColumnNames:
    """The dataset's column for each field a format reads, when it is named differently
    (data.columns.instruction=question); None keeps the field's own name."""

    instruction: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    system: Optional[str] = None
    prompt: Optional[str] = None
    completion: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    label: Optional[str] = None
    messages: Optional[str] = None
    conversations: Optional[str] = None
    text: Optional[str] = None


@dataclass
class DatasetSource:
    """One dataset of `data.datasets`: where it is, its format, and how its columns are named."""

    path: str = MISSING
    format: str = "auto"
    split: str = "train"  # for Hub datasets
    columns: ColumnNames = field(default_factory=ColumnNames)


@dataclass
class DataConfig:
    # one dataset (path/format/split/columns), or several (datasets, which then replace path)
    path: Optional[str] = None
    format: str = "auto"
    split: str = "train"
    columns: ColumnNames = field(default_factory=ColumnNames)
    datasets: list[DatasetSource] = field(default_factory=list)
    # validation: a separate file, or a share (< 1) or count (>= 1) of the training rows; 0 means none
    val_path: Optional[str] = None
    val_size: float = 0.0
    # a shipped template name (chatml, llama-3, llama-2, mistral, alpaca) or a Jinja string; None uses the
    # tokenizer's own
    chat_template: Optional[str] = None
    # false: loss only on assistant turns / completions; true: on every token
    train_on_prompt: bool = False
    max_length: int = 2048
    truncation: str = "truncate"  # what to do with examples longer than max_length: truncate or drop
    on_error: str = "raise"  # malformed rows: raise (naming file, row and reason) or skip (and count)
    packing: bool = False
    num_proc: Optional[int] = None  # processes for preprocessing; None preprocesses in this process
    # held-out rows for the exact-match check printed before and after training
    heldout_path: Optional[str] = None


@dataclass
class EvalConfig:
    # number of held-out prompts answered greedily before and after training (0 turns the check off)
    exact_match_samples: int = 32
    max_new_tokens: int = 16
    # also answer the held-out prompts every training.eval_steps and log the scores to metrics.jsonl
    during_training: bool = False


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/${now:%Y-%m-%d_%H-%M-%S}"
    # sft, or a preference method: dpo, orpo or kto (TRL's trainer of that name; data in a preference format)
    method: str = "sft"
    # the preference methods' beta: DPO's and KTO's KL weight against the reference, ORPO's odds-ratio weight
    beta: float = 0.1
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    # per device; "auto": the memory planner's largest batch that fits the GPU (AUTO_BATCH_SIZE_START on the CPU),
    # shrunk by 10% on out-of-memory until a step fits
    batch_size: Any = 4
    grad_accum: int = 4
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    # torch's fused AdamW: one launch group for all the LoRA tensors. bitsandbytes' paged 8-bit AdamW (the QLoRA
    # paper's) launches per tensor from Python: 4.7% slower on an H100, 0.1 GiB less (training.optim=paged_adamw_8bit)
    optim: str = "adamw_torch_fused"
    gradient_checkpointing: bool = True
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 100  # validation loss every this many steps, when there is a validation set
    save_steps: int = 500  # 0 saves only the final adapter
    save_total_limit: int = 2
    # refuse to write into a folder that already holds a run unless asked to
    overwrite_output_dir: bool = False
    # null: start from step 0; auto: the newest complete checkpoint in output_dir (or step 0 if none);
    # a path: that checkpoint folder
    resume: Optional[str] = None
    # a step whose loss or gradients are NaN/inf: stop with an error, or skip the optimizer update
    on_nonfinite: str = "stop"
    # with on_nonfinite=skip: the run fails once more than this share of its steps were skipped (it is not learning)
    max_skipped_fraction: float = 0.1
    # where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow (one name or a list); none for nowhere
    report_to: Any = field(default_factory=lambda: ["tensorboard"])


@dataclass
class PerformanceConfig:
    """Speed and memory switches; each one off gives the plain Hugging Face recipe's behaviour for that part
    (`performance=off` turns them all off). Measured in scripts/benchmark.py (docs/performance.md)."""

    # Liger's Triton kernels for RMSNorm, SwiGLU and RoPE: fewer, fused kernels per layer. CUDA only:
    # skipped on other devices. Off by default: torch_compile fuses the same work and more, faster (measured)
    liger_kernel: bool = False
    # peft's k-bit preparation upcasts every non-quantized weight (embeddings, norms, lm_head) to float32;
    # false casts the frozen ones back to quantization.compute_dtype: half their memory, no per-step casts
    frozen_weights_float32: bool = False
    # each LoRA layer over a 4-bit base as one autograd function (qlora/stages/fused_lora.py): the scaled LoRA
    # product beside the base output, added by one add that Inductor may fuse into the next kernel (peft: a
    # clone, a scale and an add), dropout saving its mask
    fused_lora: bool = True
    # under gradient checkpointing, the fused LoRA layers' recomputed forward keeps each dequantized 4-bit weight
    # for the backward pass that follows at once (qlora/stages/fused_lora.py): no second dequantization there, for
    # one decoder layer's weights in the compute dtype (~0.4 GB for a 7B). Eager layers only: in compiled ones
    # Inductor decides what is saved, and the switch changes neither memory nor speed (measured)
    reuse_recomputed_weights: bool = True
    # under gradient checkpointing on a GPU, the layer inputs the checkpoints keep (layers x tokens x hidden size)
    # go to pinned host memory, copied on a stream of their own while the GPU computes, and come back one layer
    # ahead of the backward pass (qlora/stages/offload.py)
    offload_checkpoints: bool = True
    # while training on a GPU (one process), the frozen input embedding table stays in host memory and only the
    # rows of a step's tokens are copied to the GPU (qlora/stages/host_embeddings.py): vocabulary x hidden size less
    embeddings_on_host: bool = True
    # a micro-batch of more tokens than this runs each decoder layer's MLP in chunks of this many tokens, so that
    # no tokens x intermediate-size tensor exists at once (qlora/stages/chunked_mlp.py); 0 runs it whole
    mlp_chunk_tokens: int = 4096
    # TRL's fused LM head computes the gradient of each token's log-probability in its forward pass, from the
    # logits it has there, instead of projecting onto the vocabulary again in the backward pass
    # (qlora/stages/lm_head.py): two vocabulary projections per step instead of three, in tiles of the same size
    lm_head_gradient_in_forward: bool = True
    # CUDA's caching allocator grows its segments in place (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,
    # unless set): freed memory serves a large request wherever it lies, which long sequences need near the
    # GPU's limit (qlora/stages/allocator.py)
    expandable_segments: bool = True
    # keep every activation saved for backward in CPU memory (TRL's activation offloading): longer sequences
    # still than offload_checkpoints alone, at a speed cost
    activation_offloading: bool = False
    # compile each decoder layer with torch.compile (regional compilation: one compilation serves every layer):
    # Inductor fuses the norms, RoPE, SwiGLU, dropout and adds around the matmuls and launches them from one call
    # per layer, which the host-bound eager step needs most. Excludes liger_kernel; generation runs uncompiled;
    # not under FSDP (unmeasured there). Costs a compilation at the first step (~20 s for a 7B on an H100).
    torch_compile: bool = True
    # with torch_compile and fused_lora: the compiled layers dequantize the 4-bit weights in torch ops, which
    # Inductor fuses into one kernel per weight launched from its own code, instead of calling bitsandbytes' two
    # kernels through Python; the same values (bit-identical on the CPU)
    compiled_dequantize: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)


@dataclass
class PlanOptions:
    # GPU memory to fit, e.g. 80GiB, 24GB, 16000MiB; None: this machine's first GPU, or no fit on the CPU
    gpu_memory: Optional[str] = None


@dataclass
class PlanConfig(TrainConfig):
    """`python -m qlora.plan`: the memory a training config will need, planned before loading."""

    plan: PlanOptions = field(default_factory=PlanOptions)


@dataclass
class QuantizeConfig:
    """`python -m qlora.quantize`: save a base model quantized once, to fine-tune many times."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    output_dir: str = MISSING


@dataclass
class MergeConfig:
    """`python -m qlora.merge`: fold an adapter into its base model and save a plain checkpoint."""

    run: Optional[str] = None  # a training run folder: its adapter/ and config.yaml
    adapter: Optional[str] = None  # or an adapter folder directly
    base: Optional[str] = None  # the base model; default: the run's, or the adapter's base_model_name_or_path
    output_dir: Optional[str] = None  # default: <run>/merged
    dtype: str = "bfloat16"
    from_dequantized: bool = False  # merge into the dequantized 4-bit weights the adapter was trained on
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False  # run the base model's own code; a run's config.yaml never turns this on


@dataclass
class GenerateConfig:
    """`python -m qlora.generate`: answer prompts with the base model + a trained adapter."""

    run: Optional[str] = None  # a training run folder
    adapter: Optional[str] = None  # or an adapter folder directly
    base: Optional[str] = None  # the base model; default: the run's, or the adapter's
    prompt: Optional[str] = None  # one prompt, answered and printed
    chat: bool = False  # an interactive conversation on the terminal
    input_file: Optional[str] = None  # a jsonl of prompts (prompt, instruction/input or messages rows)
    output_file: Optional[str] = None  # where input_file's answers go (default: <input>.generated.jsonl)
    # how a prompt is wrapped: auto (as in training), raw, alpaca, or chat (the tokenizer's template)
    template: str = "auto"
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 decodes greedily
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    stream: bool = True
    batch_size: int = 8
    seed: int = 42
    trust_remote_code: bool = False  # run the base model's own code; a run's config.yaml never turns this on


@dataclass
class EvaluateConfig:
    """`python -m qlora.evaluate`: loss, perplexity and answer metrics of base + adapter on a dataset."""

    run: Optional[str] = None  # a training run folder
    adapter: Optional[str] = None  # or an adapter folder directly
    base: Optional[str] = None  # the base model; default: the run's, or the adapter's
    data: DataConfig = field(default_factory=DataConfig)  # data.path: the dataset to evaluate on
    batch_size: int = 8
    max_samples: Optional[int] = None  # evaluate only the first rows
    generation: bool = True  # also answer each prompt and score it against its reference
    max_new_tokens: int = 64
    regex: Optional[str] = None  # an answer is right when this pattern's match (group 1 if any) equals the reference
    output_file: Optional[str] = None  # default: eval.json in the run folder (or beside the adapter)
    trust_remote_code: bool = False  # run the base model's own code; a run's config.yaml never turns this on


# Each command's schema, by the name of its primary config (configs/<name>.yaml) and command (python -m qlora.<name>)
COMMAND_SCHEMAS: dict[str, type] = {"train": TrainConfig, "plan": PlanConfig, "quantize": QuantizeConfig,
                                    "merge": MergeConfig, "generate": GenerateConfig, "evaluate": EvaluateConfig}


def report_destinations(training: TrainingConfig) -> list[str]:
    """training.report_to as a list: one name, a list of names, or none/[] for no destination."""
    names = [training.report_to] if isinstance(training.report_to, str) else list(training.report_to or [])
    return [name for name in names if name != "none"]


def register_configs() -> None:
    """Register the schema, the `asset` resolver and the recipes with Hydra (idempotent)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda relative: str(ASSETS_DIR / relative))
    store = ConfigStore.instance()
    store.store(name="schema", node=TrainConfig)
    store.store(name="plan_schema", node=PlanConfig)
    store.store(name="quantize_schema", node=QuantizeConfig)
    store.store(name="merge_schema", node=MergeConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    for recipe in sorted(recipes_dir().glob("*.yaml")):
        store.store(group="recipe", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_")


DEFAULT_RECIPE = "tiny"


def with_default_recipe(overrides: list[str]) -> list[str]:
    """The overrides, plus +recipe=tiny when they pick no recipe: the embedded default run."""
    if any(arg.lstrip("+~").startswith("recipe=") for arg in overrides):
        return list(overrides)
    return [*overrides, f"+recipe={DEFAULT_RECIPE}"]


def recipe_names() -> list[str]:
    """The shipped recipes, selected with recipe=NAME: the files in recipes/."""
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def adapter_folder(path: str) -> Optional[Path]:
    """model.adapter's folder: a run folder's adapter/, or the adapter folder itself; None if neither holds one."""
    for folder in (Path(path).expanduser() / "adapter", Path(path).expanduser()):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def configs_dir() -> Path:
    return _shipped_dir("configs")


def recipes_dir() -> Path:
    return _shipped_dir("recipes")


def _shipped_dir(name: str) -> Path:
    # A wheel carries configs/ and recipes/ inside the package; a source checkout has them at its root.
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / name, package_dir.parent / name):
        if candidate.is_dir():
            return candidate
    raise QLoRAError(f"the package's {name}/ folder is missing; reinstall qlora")


def typed_config(cfg: Any) -> Any:
    """Turn Hydra's composed DictConfig into its typed dataclass, refusing unset required keys."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise QLoRAError(
            f"required config value(s) not set: {', '.join(missing)}. "
            f"Set them on the command line, e.g. {missing[0]}=..."
        )
    return OmegaConf.to_object(cfg)


def as_plain_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain containers, for writing to the run folder."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def _dataclass_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass instance, e.g. 'lora.r'."""
    keys = []
    for f in fields(node):
        value = getattr(node, f.name)
        keys += _dataclass_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [prefix + f.name]
    return keys


def schema_keys(schema: type = TrainConfig) -> list[str]:
    """Every dotted key of a command's schema (training's by default), e.g. 'lora.r'."""
    return _dataclass_keys(schema())
