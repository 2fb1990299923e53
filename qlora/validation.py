"""Validation of a composed config: what types cannot express (ranges, choices, combinations, paths),
checked before any weights are loaded. Each error names the key, the value and the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from qlora.config import (
    DATA_FORMATS,
    DTYPES,
    METHOD_FORMATS,
    NONFINITE_ACTIONS,
    ON_ERROR,
    QUANT_METHODS,
    REPORT_DESTINATIONS,
    TRAINING_METHODS,
    TRUNCATION,
    DatasetSource,
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    TrainConfig,
    TrainingConfig,
    adapter_folder,
    methods_for,
    report_destinations,
)
from qlora.errors import QLoRAError


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

    _choice("training.method", config.training.method, TRAINING_METHODS)
    _validate_data(config.data, config.training.method)
    if config.training.method != "sft":
        validate_preference(config)
    if config.model.adapter is not None:
        _validate_adapter(config.model.adapter, lora)
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
    if not 0.0 <= t.max_skipped_fraction <= 1.0:
        raise QLoRAError(f"training.max_skipped_fraction={t.max_skipped_fraction} is out of range: use a share of "
                         f"the steps in [0, 1], e.g. 0.1.")
    _validate_output_dir(t.output_dir)
    _validate_report_to(t)
    if t.resume not in (None, "auto") and not Path(t.resume).expanduser().is_dir():
        raise QLoRAError(
            f"training.resume={t.resume} is not a folder: use training.resume=auto (the newest checkpoint in "
            f"training.output_dir) or the path of a checkpoint folder, e.g. {t.output_dir}/checkpoints/checkpoint-500."
        )
    _at_least("performance.mlp_chunk_tokens", config.performance.mlp_chunk_tokens, 0)
    validate_launch(config)


def _validate_output_dir(output_dir: str) -> None:
    path = Path(output_dir).expanduser()
    nearest = next(p for p in (path, *path.parents) if p.exists())  # a relative path ends at ".", which exists
    if not nearest.is_dir():
        raise QLoRAError(
            f"training.output_dir={output_dir}: {nearest} is a file, so the run folder cannot be created there. "
            f"Choose a folder, e.g. training.output_dir=outputs/run1."
        )


def validate_launch(config: TrainConfig) -> None:
    """Combinations that only fail under `accelerate launch` with several processes, FSDP or DeepSpeed
    (accelerate tells the processes through the environment)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and config.training.batch_size == "auto":
        raise QLoRAError(
            f"training.batch_size=auto with {processes} processes: each process would search its own batch size "
            f"and they would drift apart. Set a number, e.g. training.batch_size=4 (the largest that fits one GPU)."
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise QLoRAError(
            "DeepSpeed is not supported by qlora: its adapter saving and checkpoints read each process's own "
            "weights and optimizer state, which DeepSpeed partitions. Launch with --config_file "
            "configs/accelerate/fsdp_qlora.yaml to shard a model over GPUs, or configs/accelerate/ddp.yaml when "
            "the model fits one GPU."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    q, model = config.quantization, config.model
    if q.method == "int8":
        raise QLoRAError(
            "quantization.method=int8 cannot be sharded by FSDP (its 8-bit weights are integers): use "
            "quantization=nf4 with quantization.quant_storage=bfloat16, or launch with configs/accelerate/ddp.yaml."
        )
    storage_differs = q.quant_storage != q.compute_dtype or model.dtype not in ("auto", q.quant_storage)
    if q.method in ("nf4", "fp4") and storage_differs:
        raise QLoRAError(
            f"quantization.quant_storage={q.quant_storage} with quantization.compute_dtype={q.compute_dtype} and "
            f"model.dtype={model.dtype} under FSDP: FSDP shards a layer's weights as one tensor of one dtype, so "
            f"the 4-bit weights must be stored in the dtype of the others. Set quantization.quant_storage="
            f"{q.compute_dtype}{'' if model.dtype == 'auto' else f' and model.dtype={q.compute_dtype}'}."
        )
    if config.eval.during_training and config.eval.exact_match_samples:
        raise QLoRAError(
            "eval.during_training=true under FSDP: the held-out answers are generated by the main process alone, "
            "which cannot run a sharded model. Set eval.during_training=false."
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


def validate_preference(config: TrainConfig) -> None:
    """What a preference method (dpo, orpo, kto) cannot do that SFT can, refused with the way out."""
    method, data = config.training.method, config.data
    if not config.training.beta > 0:
        raise QLoRAError(f"training.beta={config.training.beta} must be positive, e.g. training.beta=0.1.")
    for key, value, why in (
        ("data.packing", data.packing, "TRL's preference trainers batch each pair's sequences side by side"),
        ("data.train_on_prompt", data.train_on_prompt, "a preference method compares answers, never the prompt"),
        ("eval.during_training", config.eval.during_training and config.eval.exact_match_samples > 0,
         "it answers held-out prompts, an SFT check; give pairs as data.val_path instead: their reward margin and "
         "preference accuracy go to metrics.jsonl every training.eval_steps"),
    ):
        if value:
            raise QLoRAError(f"{key}=true does not apply to training.method={method}: {why}. Set {key}=false.")
    if method == "kto" and isinstance(config.training.batch_size, int) and config.training.batch_size < 2:
        raise QLoRAError(
            f"training.batch_size={config.training.batch_size} with training.method=kto: KTO estimates its KL term "
            f"from the other completions of a batch, so it needs at least 2. Set training.batch_size=2 or more."
        )
    if method == "orpo" and config.performance.activation_offloading:
        raise QLoRAError("performance.activation_offloading=true is not available with training.method=orpo (TRL's "
                         "experimental ORPOTrainer has none). Set performance.activation_offloading=false.")


def _validate_adapter(path: str, lora: LoraConfig) -> None:
    """model.adapter holds an adapter whose shape the lora group agrees with (the summary and the plan use it)."""
    folder = adapter_folder(path)
    if folder is None:
        raise QLoRAError(
            f"model.adapter={path} holds no LoRA adapter (adapter_config.json, in the folder or its adapter/): give "
            f"a training run folder, e.g. model.adapter=outputs/<sft-run>, or an adapter folder."
        )
    saved = json.loads((folder / "adapter_config.json").read_text())
    shape = (("lora.r", "r", lora.r, None), ("lora.alpha", "lora_alpha", lora.alpha, None),
             ("lora.use_dora", "use_dora", lora.use_dora, False),
             ("lora.use_rslora", "use_rslora", lora.use_rslora, False))
    differing = [(key, saved.get(name, default), ours) for key, name, ours, default in shape
                 if saved.get(name, default) != ours]
    if differing:
        raise QLoRAError(
            f"model.adapter={path} was trained with "
            + ", ".join(f"{key}={theirs}" for key, theirs, _ in differing) + " but the lora group says "
            + ", ".join(f"{key}={ours}" for key, _, ours in differing) + ": the continued adapter keeps its shape. "
            "Set " + " ".join(f"{key}={theirs}" for key, theirs, _ in differing) + "."
        )


def _validate_data(data: DataConfig, method: str) -> None:
    if data.path is None and not data.datasets:
        raise QLoRAError(
            "no training data: set data.path=my.jsonl (one dataset), or data.datasets=[{path: a.jsonl},"
            "{path: b.jsonl, format: sharegpt}] (several)."
        )
    if not data.datasets:
        _validate_source("data", DatasetSource(data.path, data.format, data.split, data.columns), method)
    for index, source in enumerate(data.datasets):
        _validate_source(f"data.datasets[{index}]", source, method)
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


# the package each training.report_to destination needs, and how to install it
_REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "mlflow": ("mlflow", "mlflow-skinny")}


def _validate_report_to(training: TrainingConfig) -> None:
    value = training.report_to
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise QLoRAError(f"training.report_to={value} is not valid: use a name or a list of names, "
                         f"e.g. training.report_to=[tensorboard,wandb], or training.report_to=none.")
    for name in report_destinations(training):
        _choice("training.report_to", name, REPORT_DESTINATIONS + ("none",))
        module, package = _REPORT_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise QLoRAError(
                f"training.report_to includes {name}, but {module} is not installed: `pip install {package}`, "
                f"or leave {name} out of training.report_to (metrics.jsonl is always written)."
            )


def _validate_source(key: str, source: DatasetSource, method: str) -> None:
    _choice(f"{key}.format", source.format, DATA_FORMATS)
    if source.format != "auto" and source.format not in METHOD_FORMATS[method]:
        raise QLoRAError(
            f"{key}.format={source.format} does not fit training.method={method}: {method} trains on "
            f"{', '.join(METHOD_FORMATS[method])} data. Train {source.format} data with "
            f"training.method={'|'.join(methods_for(source.format))}, or give data in one of those formats."
        )
    _validate_local_file(f"{key}.path", source.path)


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
