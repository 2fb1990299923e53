"""The configuration schema: one dataclass per group, every default in exactly one place.

Hydra composes `configs/` and `recipes/` on top of these dataclasses (registered with its ConfigStore),
so a misspelt key or a value of the wrong type is refused while composing. `validate` then checks what
types cannot express (ranges, choices, combinations) before any weights are loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from qlora.errors import QLoRAError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

QUANT_METHODS = ("nf4", "fp4", "int8", "none")
DTYPES = ("bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text")
TRUNCATION = ("truncate", "drop")
ON_ERROR = ("raise", "skip")
NONFINITE_ACTIONS = ("stop", "skip")
AUTO_BATCH_SIZE_START = 64  # training.batch_size=auto: the first size tried (transformers' auto_find_batch_size)


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    # dtype of the weights that stay unquantized (embeddings, norms, lm_head); "auto" reads config.json
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    revision: Optional[str] = None


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
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    # per device; "auto" starts at AUTO_BATCH_SIZE_START and shrinks by 10% on out-of-memory until a step fits
    batch_size: Any = 4
    grad_accum: int = 4
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_8bit"
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


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def register_configs() -> None:
    """Register the schema, the `asset` resolver and the recipes with Hydra (idempotent)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda relative: str(ASSETS_DIR / relative))
    store = ConfigStore.instance()
    store.store(name="schema", node=TrainConfig)
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


def compose_config(overrides: list[str]) -> TrainConfig:
    """Compose and validate a config exactly as `python -m qlora.train OVERRIDES` does."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(configs_dir()), version_base="1.3"):
        cfg = compose("train", overrides=with_default_recipe(overrides))
    config = typed_config(cfg)
    validate(config)
    return config


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


def validate(config: TrainConfig) -> None:
    """Check ranges, choices and combinations; raise QLoRAError naming the key, value and fix."""
    validate_model(config.model)
    validate_quantization(config.quantization)

    lora = config.lora
    _at_least("lora.r", lora.r, 1)
    _at_least("lora.alpha", lora.alpha, 1)
    if not 0.0 <= lora.dropout < 1.0:
        raise QLoRAError(f"lora.dropout={lora.dropout} is out of range: use a value in [0, 1), e.g. 0.05.")
    targets = lora.target_modules
    if not (targets == "all-linear" or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise QLoRAError(
            f"lora.target_modules={targets!r} is not valid: use all-linear or a list of module names, "
            f"e.g. lora.target_modules=[q_proj,v_proj]."
        )

    _validate_data(config.data)
    _at_least("eval.exact_match_samples", config.eval.exact_match_samples, 0)
    _at_least("eval.max_new_tokens", config.eval.max_new_tokens, 1)

    t = config.training
    if t.max_steps <= 0 and t.epochs <= 0:
        raise QLoRAError(
            f"nothing to train: training.max_steps={t.max_steps} and training.epochs={t.epochs}. "
            f"Set training.max_steps to a positive number of steps or training.epochs above 0."
        )
    if t.batch_size != "auto" and not (isinstance(t.batch_size, int) and not isinstance(t.batch_size, bool)
                                       and t.batch_size >= 1):
        raise QLoRAError(
            f"training.batch_size={t.batch_size} is not valid: use a whole number of at least 1, or "
            f"training.batch_size=auto to find the largest batch that fits in memory."
        )
    _at_least("training.grad_accum", t.grad_accum, 1)
    if not t.lr > 0:
        raise QLoRAError(f"training.lr={t.lr} must be positive, e.g. training.lr=2e-4.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise QLoRAError(f"training.warmup_ratio={t.warmup_ratio} is out of range: use a value in [0, 1).")
    _at_least("training.weight_decay", t.weight_decay, 0)
    _at_least("training.max_grad_norm", t.max_grad_norm, 0)
    _choice("training.scheduler", t.scheduler, _scheduler_names())
    _choice("training.optim", t.optim, _optimizer_names())
    _at_least("training.logging_steps", t.logging_steps, 1)
    _at_least("training.eval_steps", t.eval_steps, 1)
    _at_least("training.save_steps", t.save_steps, 0)
    _at_least("training.save_total_limit", t.save_total_limit, 1)
    _choice("training.on_nonfinite", t.on_nonfinite, NONFINITE_ACTIONS)
    if t.resume not in (None, "auto") and not Path(t.resume).expanduser().is_dir():
        raise QLoRAError(
            f"training.resume={t.resume} is not a folder: use training.resume=auto (the newest checkpoint in "
            f"training.output_dir) or the path of a checkpoint folder, e.g. {t.output_dir}/checkpoints/checkpoint-500."
        )


def validate_model(model: ModelConfig) -> None:
    _choice("model.dtype", model.dtype, ("auto",) + DTYPES)
    _validate_model_path(model.name_or_path)


def validate_quantization(q: QuantizationConfig) -> None:
    _choice("quantization.method", q.method, QUANT_METHODS)
    _choice("quantization.compute_dtype", q.compute_dtype, DTYPES)
    _choice("quantization.quant_storage", q.quant_storage, ("uint8",) + DTYPES)
    if q.double_quant and q.method not in ("nf4", "fp4"):
        raise QLoRAError(
            f"quantization.double_quant=true only applies to 4-bit quantization, but "
            f"quantization.method={q.method}. Pick the quantization group instead "
            f"(quantization={q.method}), or add quantization.double_quant=false."
        )


def _validate_data(data: DataConfig) -> None:
    if data.path is None and not data.datasets:
        raise QLoRAError(
            "no training data: set data.path=my.jsonl (one dataset), or data.datasets=[{path: a.jsonl},"
            "{path: b.jsonl, format: sharegpt}] (several)."
        )
    if not data.datasets:
        _validate_source("data", DatasetSource(data.path, data.format, data.split, data.columns))
    for index, source in enumerate(data.datasets):
        _validate_source(f"data.datasets[{index}]", source)
    _at_least("data.max_length", data.max_length, 8)
    _choice("data.truncation", data.truncation, TRUNCATION)
    _choice("data.on_error", data.on_error, ON_ERROR)
    _at_least("data.val_size", data.val_size, 0)
    if data.val_size and data.val_path is not None:
        raise QLoRAError(
            f"data.val_size={data.val_size} and data.val_path={data.val_path} both ask for a validation set; "
            f"keep one of them (data.val_size=0 to use the file)."
        )
    if data.val_size > 1 and data.val_size != int(data.val_size):
        raise QLoRAError(
            f"data.val_size={data.val_size}: use a share below 1 (e.g. 0.05) or a whole number of rows (e.g. 200)."
        )
    if data.num_proc is not None:
        _at_least("data.num_proc", data.num_proc, 1)
    for key in ("val_path", "heldout_path"):
        if getattr(data, key) is not None:
            _validate_local_file(f"data.{key}", getattr(data, key))


def _validate_source(key: str, source: DatasetSource) -> None:
    _choice(f"{key}.format", source.format, DATA_FORMATS)
    _validate_local_file(f"{key}.path", source.path)


def as_plain_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain containers, for writing to the run folder."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise QLoRAError(f"{key}={value} is not supported. Allowed values: {', '.join(allowed)}.")


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise QLoRAError(f"{key}={value} is out of range: it must be at least {minimum}.")


# A hub id is "name" or "org/name"; anything else (./x, /x, ~/x, a/b/c, x.jsonl) is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _looks_local(path: str) -> bool:
    return not _HUB_ID.match(path) or Path(path).expanduser().exists()


def _validate_model_path(path: str) -> None:
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise QLoRAError(
            f"model.name_or_path={path} does not exist: give a local model folder (with config.json) "
            f"or a Hub id such as meta-llama/Llama-2-7b-hf."
        )


def _validate_local_file(key: str, path: str) -> None:
    is_file_path = path.endswith(_DATA_SUFFIXES) or _looks_local(path)
    if is_file_path and not Path(path).expanduser().exists():
        raise QLoRAError(
            f"{key}={path} does not exist. Give an existing .jsonl/.json/.parquet/.csv file or a folder of "
            f"them (relative paths are read from the folder you run in) or a Hub dataset id."
        )


def _scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


def _optimizer_names() -> tuple[str, ...]:
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


def _dataclass_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. 'lora.r' (for docs and tests)."""
    keys = []
    for f in fields(node):
        value = getattr(node, f.name)
        keys += _dataclass_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [prefix + f.name]
    return keys


def schema_keys() -> list[str]:
    return _dataclass_keys(TrainConfig())
