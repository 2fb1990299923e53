"""Build training.method's TRL trainer (SFTTrainer, DPOTrainer, ORPOTrainer, KTOTrainer) from the training group,
and log metrics to metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import datasets
import torch
from transformers import (PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, ProgressCallback, Trainer,
                          TrainerCallback, TrainingArguments)
from trl import DPOConfig, KTOConfig, SFTConfig

from qlora.config import PerformanceConfig, TrainConfig, report_destinations
from qlora.errors import QLoRAError
from qlora.stages.checkpoints import atomic_trainer_class
from qlora.stages.host_embeddings import EmbeddingsOnHost, keeps_embeddings_on_host
from qlora.stages.lm_head import LMHeadGradientInForward
from qlora.stages.memory import planned_batch_size
from qlora.stages.offload import OffloadCheckpoints, offloads_checkpoints
from qlora.stages.processes import uses_fsdp
from qlora.stages.progress import TokenRate, TrainingProgress

log = logging.getLogger("qlora")


def build_training_args(config: TrainConfig, checkpoints_dir: Path, has_validation: bool = False) -> TrainingArguments:
    """The config of training.method's TRL trainer: SFTConfig, or DPOConfig, ORPOConfig, KTOConfig."""
    if config.training.method == "sft":
        return build_sft_config(config, checkpoints_dir, has_validation)
    return build_preference_config(config, checkpoints_dir, has_validation)


def build_sft_config(config: TrainConfig, checkpoints_dir: Path, has_validation: bool = False) -> SFTConfig:
    return SFTConfig(
        **_shared_arguments(config, checkpoints_dir, has_validation),
        max_length=config.data.max_length,
        # qlora.data already tokenized, masked and truncated the examples; TRL packs them with the BFD
        # strategy, padding-free with position ids so that packed examples never attend to each other
        packing=config.data.packing,
        activation_offloading=config.performance.activation_offloading,
    )


def build_preference_config(config: TrainConfig, checkpoints_dir: Path, has_validation: bool = False
                            ) -> TrainingArguments:
    """DPOConfig, ORPOConfig or KTOConfig: the same training group, and the method's beta. The reference of DPO and
    KTO is the trained model itself, its adapter switched off (use_base_as_reference), never a second model."""
    method = config.training.method
    arguments = dict(_shared_arguments(config, checkpoints_dir, has_validation), beta=config.training.beta,
                     max_length=config.data.max_length)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig  # TRL 1.16 keeps ORPO among its experimental trainers

        return ORPOConfig(**arguments)
    arguments["activation_offloading"] = config.performance.activation_offloading
    if method == "kto":
        # KTOTrainer estimates its KL term from each completion paired with its neighbour's prompt in a batch read in
        # order; qlora.data shuffled the rows once, with training.seed, instead
        return KTOConfig(**arguments, train_sampling_strategy="sequential")
    return DPOConfig(**arguments)


def _shared_arguments(config: TrainConfig, checkpoints_dir: Path, has_validation: bool) -> dict:
    """TrainingArguments from the training group, the same for every method."""
    t = config.training
    batch_size = planned_batch_size(config)
    compute_dtype = config.quantization.compute_dtype
    return dict(
        output_dir=str(checkpoints_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=batch_size,
        auto_find_batch_size=t.batch_size == "auto",  # a real step confirms it; accelerate shrinks it 10% per OOM
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        # mixed precision follows the dtype the 4-bit matmuls compute in
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # every LoRA weight takes part in every step: DDP need not search the graph for unused ones
        ddp_find_unused_parameters=False,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # transformers tests every step's loss for NaN/inf on the host to keep it out of the logged mean: a sync
        # that holds the host after each backward pass, the GPU then idle until the host has caught up (~30 ms per
        # Llama-2-7B step, profiled). A run that stops at a NaN/inf step (NonFiniteGuard) does without; one that
        # skips such steps keeps it, or one NaN would make every later logged loss NaN.
        logging_nan_inf_filter=t.on_nonfinite == "skip",
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=batch_size,
        report_to=report_destinations(t) or "none",
        run_name=f"{checkpoints_dir.parent.parent.name}/{checkpoints_dir.parent.name}",  # e.g. tiny/<date_time>
        use_liger_kernel=uses_liger_kernel(config.performance),
        liger_kernel_config=LIGER_LAYER_KERNELS,
        # transformers makes its own accelerate state; on a machine without a GPU it must ask for the CPU,
        # or processes started by `accelerate launch` would each train alone instead of joining over gloo
        use_cpu=not torch.cuda.is_available(),
    )


# Liger's layer kernels. Its fused linear cross-entropy is left to TRL, whose own fused LM head already
# computes the loss in chunks without materialising the logits (and refuses Liger's).
LIGER_LAYER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                       "fused_linear_cross_entropy": False}


def uses_liger_kernel(performance: PerformanceConfig) -> bool:
    """Liger's kernels are Triton kernels for CUDA; elsewhere the model's own layers run."""
    return performance.liger_kernel and torch.cuda.is_available()


def check_performance_support(performance: PerformanceConfig, device: torch.device) -> None:
    """Refuse, before loading anything, a switch this machine cannot honour, or two that exclude each other."""
    if performance.torch_compile and performance.liger_kernel:
        raise QLoRAError(
            "performance.torch_compile=true and performance.liger_kernel=true exclude each other: Inductor "
            "generates its own fused kernels for the compiled layers and cannot compile Liger's. Turn one off, "
            "e.g. performance.liger_kernel=false."
        )
    if performance.liger_kernel and device.type == "cuda" and importlib.util.find_spec("liger_kernel") is None:
        raise QLoRAError(
            "performance.liger_kernel=true needs the liger-kernel package, which is not installed. Install it "
            "with `pip install liger-kernel`, or turn the kernels off: performance.liger_kernel=false."
        )
    if performance.liger_kernel and device.type != "cuda":
        log.info("performance.liger_kernel: Liger's Triton kernels need CUDA; on %s the model's own layers run",
                 device.type)


def build_trainer(
    config: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    run_dir: Path,
    eval_dataset: datasets.Dataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    resuming: bool = False,
) -> Trainer:
    """training.method's TRL trainer over the prepared model and data, with qlora's callbacks."""
    direct_loggers_to(run_dir, report_destinations(config.training))
    rate = TokenRate()  # one measurement per logging step, for metrics.jsonl and the progress line alike
    trainer = atomic_trainer_class(config.training.method)(
        model=model,
        args=build_training_args(config, run_dir / "checkpoints", has_validation=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[MetricsFile(run_dir / "metrics.jsonl", append=resuming, rate=rate), *callbacks],
        qlora_config=config,
    )
    if config.model.adapter is None:
        use_base_as_reference(trainer.model)
    if offloads_checkpoints(config, on_gpu=torch.cuda.is_available(), sharded=uses_fsdp()):
        trainer.add_callback(OffloadCheckpoints())
    if keeps_embeddings_on_host(config, on_gpu=torch.cuda.is_available(), processes=trainer.args.world_size):
        trainer.add_callback(EmbeddingsOnHost())
    if config.performance.lm_head_gradient_in_forward:
        trainer.add_callback(LMHeadGradientInForward())
    trainer.remove_callback(ProgressCallback)  # one bar, ours, with loss, lr, tokens/s and ETA
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress(rate=rate))
    # TRL casts the adapters of a quantized model to bf16 (the QLoRA paper's choice for bf16 compute).
    # With float32 compute (the CPU) keep them in float32: bf16 weights would drop small updates and
    # compute the adapters less precisely than the reloaded adapter does.
    if config.quantization.compute_dtype == "float32":
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


@contextmanager
def restoring_on_error(trainer: Trainer) -> Iterator[None]:
    """When training raises, on_train_end never runs: put back what callbacks changed for training (their
    `restore`: TRL's LM head function, the input embedding table's place), so that the process can go on."""
    try:
        yield
    except BaseException:
        for callback in trainer.callback_handler.callbacks:
            restore = getattr(callback, "restore", None)
            if restore is not None:
                restore()
        raise


def use_base_as_reference(model: PreTrainedModel) -> None:
    """Make the reference of DPO and KTO the 4-bit base with the adapter switched off.

    Given a PeftModel, TRL 1.16 copies its adapter into a frozen "ref" adapter and computes the reference with it,
    for an adapter trained before (with model.adapter that is what qlora keeps: the reference is base + that adapter).
    A new adapter adds nothing to the base (lora_B starts at zero), so the copy is dropped: TRL then computes the
    reference under disable_adapter(), with no second adapter in memory and no LoRA in the reference's forward pass.
    """
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


# What the user set before qlora ran; a later run in the same process must not inherit an earlier run's folder.
_USER_LOGGER_ENV = {name: os.environ.get(name) for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI")}


def direct_loggers_to(run_dir: Path, destinations: Sequence[str] = ()) -> None:
    """Make transformers' logger integrations write into the run folder (they read these at set-up).

    TensorBoard's event files go to <run>/tensorboard; wandb's files and a local MLflow store go into the
    run folder unless the user pointed them elsewhere (WANDB_DIR, MLFLOW_TRACKING_URI).
    """
    run_dir = run_dir.resolve()
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    os.environ["WANDB_DIR"] = _USER_LOGGER_ENV["WANDB_DIR"] or str(run_dir)
    os.environ["MLFLOW_TRACKING_URI"] = _USER_LOGGER_ENV["MLFLOW_TRACKING_URI"] or (run_dir / "mlruns").as_uri()
    if _USER_LOGGER_ENV["MLFLOW_TRACKING_URI"] is None:
        # MLflow 3 asks for a database backend; a folder in the run folder needs no server and no database
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("WANDB_PROJECT", "qlora")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "qlora")
    if "mlflow" in destinations:
        import mlflow

        # transformers sets the URI only when none is set yet in this process: a second run in the same
        # process (a notebook) would log into the first run's folder
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


# What the preference trainers log besides the loss: the implicit rewards of the chosen and rejected answers (DPO,
# KTO: beta x the log-probability ratio to the reference; ORPO: beta x the log-probability), their margin and how
# often the chosen one wins, the log-probabilities, and KTO's KL estimate, ORPO's NLL and log odds ratio.
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                      "logps/rejected", "kl", "nll_loss", "log_odds_ratio")


class MetricsFile(TrainerCallback):
    """Append each logged step to metrics.jsonl: loss, lr, grad norm, tokens/s (none at a run's first logging
    step), peak memory, and a preference method's metrics (PREFERENCE_METRICS; eval_ ones on the validation set)."""

    def __init__(self, path: Path, append: bool = False, rate: Optional[TokenRate] = None):
        self.path = path
        self.append = append  # a resumed run continues the rows of the steps it keeps
        self.rate = rate or TokenRate()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.append:
            self.path.write_text("")  # a fresh file, also under training.overwrite_output_dir=true
        self.rate.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            evaluated = {f"eval_{name}": logs[f"eval_{name}"] for name in PREFERENCE_METRICS if f"eval_{name}" in logs}
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "eval_loss": logs["eval_loss"], **evaluated}) + "\n")
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {
            "step": state.global_step,
            "epoch": logs.get("epoch"),
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_s": self.rate.at(state.global_step, logs.get("num_tokens")),
            "peak_memory_gib": peak_memory_gib(),
            **{name: logs[name] for name in PREFERENCE_METRICS if name in logs},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
