"""The training run: the ordered stages over one config, each timed and logged.

    run folder -> tokenizer -> data -> quantized model -> k-bit preparation -> LoRA adapters
    -> held-out check -> SFTTrainer.train -> save adapter -> held-out check -> summary
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import torch
from transformers import set_seed

from qlora.config import TrainConfig
from qlora.data import load_sft_dataset, prepare_sft_data
from qlora.errors import TrainingInterrupted
from qlora.stages.adapters import attach_training_adapters
from qlora.stages.artifacts import prepare_run_dir, save_trained_adapter
from qlora.stages.checkpoints import checkpoint_step, find_resume_checkpoint, newest_checkpoint
from qlora.stages.faults import check_free_space, out_of_memory_error, step_callbacks
from qlora.stages.heldout import ExactMatch, HeldoutEvaluation, exact_match
from qlora.stages.memory import expected_training_peak
from qlora.stages.model import (
    fit_embeddings_to_tokenizer,
    frozen_weights_dtype,
    load_quantized_model,
    load_tokenizer,
    prepare_for_kbit_training,
)
from qlora.stages.processes import describe_global_batch, on_main_process, process_state, share_run_dir, uses_fsdp
from qlora.stages.progress import quiet_library_noise
from qlora.stages.report import write_report
from qlora.stages.startup import FirstStepMemory, show_summary, startup_summary, write_summary
from qlora.stages.trainer import build_trainer, check_performance_support, peak_memory_gib

log = logging.getLogger("qlora")


@dataclass
class RunSummary:
    run_dir: str
    adapter_dir: str
    train_loss_first: Optional[float] = None
    train_loss_last: Optional[float] = None
    exact_match_before: Optional[float] = None
    exact_match_after: Optional[float] = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def run_training(config: TrainConfig) -> RunSummary:
    state = process_state()
    quiet_library_noise(state.is_main_process)
    share_run_dir(config, state)  # before anything reads training.output_dir
    if not state.is_main_process:
        logging.getLogger("qlora").setLevel(logging.WARNING)  # the run's log is the main process's
    run_dir = Path(config.training.output_dir).expanduser()
    resume_from = find_resume_checkpoint(config)  # refuses a checkpoint that does not fit, before any write
    resuming = config.training.resume is not None
    resume_step = checkpoint_step(resume_from) if resume_from else (0 if resuming else None)
    on_main_process(state, lambda: prepare_run_dir(config, resume_step))
    if state.is_main_process:
        _log_to_file(run_dir / "train.log")
    log.info("global batch: %s", describe_global_batch(config, state.num_processes))
    seconds: dict[str, float] = {}
    set_seed(config.training.seed)  # LoRA's initial weights come from this seed

    check_performance_support(config.performance, state.device)
    with stage("tokenizer", seconds):
        tokenizer = load_tokenizer(config.model)
    with stage("data", seconds):
        data = prepare_sft_data(config.data, tokenizer, config.training.seed)
        heldout = _heldout_examples(config)
        if state.is_main_process:
            (run_dir / "data_stats.json").write_text(json.dumps(asdict(data.stats), indent=2) + "\n")
    with stage("quantized model", seconds):
        model = load_quantized_model(config.model, config.quantization, state.device, sharded=uses_fsdp())
        fit_embeddings_to_tokenizer(model, tokenizer)
    with stage("k-bit preparation", seconds):
        model = prepare_for_kbit_training(model, config.training.gradient_checkpointing,
                                          frozen_weights_dtype(config.performance, config.quantization),
                                          sharded=uses_fsdp())
    with stage("LoRA adapters", seconds):
        model = attach_training_adapters(model, config, sharded=uses_fsdp())
        trainable, total = model.get_nb_trainable_parameters()
        log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    on_main_process(state, lambda: check_free_space(run_dir, trainable, config.training.save_total_limit))

    before = after = None
    if heldout is not None:
        with stage("held-out check (before)", seconds):
            before = exact_match(model, tokenizer, heldout, config.eval.max_new_tokens)
        _log_exact_match("before training", before)
    stop, guard = step_callbacks(config, run_dir)
    with stage("trainer", seconds):
        callbacks = [stop, guard]
        if heldout is not None and config.eval.during_training:
            callbacks.append(HeldoutEvaluation(heldout, tokenizer, config.eval.max_new_tokens,
                                               config.training.eval_steps, run_dir / "metrics.jsonl"))
        trainer = build_trainer(config, model, tokenizer, data.train, run_dir, data.validation, callbacks, resuming)
    overview = startup_summary(config, trainable, total, data.stats, len(data.validation) if data.validation else None,
                               len(trainer.train_dataset), state.num_processes, run_dir, resume_command(run_dir))
    planned_peak = expected_training_peak(config, trainer.args.per_device_train_batch_size)
    if planned_peak is not None:
        overview.expected_memory = f"{planned_peak:.2f} GiB training peak per GPU (python -m qlora.plan breaks it down)"
    trainer.add_callback(FirstStepMemory(overview, run_dir, planned_peak))
    if state.is_main_process:
        write_summary(overview, run_dir)
        show_summary(overview)
    with stage("train", seconds):
        if resume_from is not None:
            log.info("resuming from %s", resume_from)
        with stop.handling_signals():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.received is not None:
        raise _interrupted(stop.received, trainer.state.global_step, run_dir)
    with stage("save adapter", seconds):
        adapter_dir = save_trained_adapter(trainer, tokenizer, run_dir)
    if heldout is not None:
        with stage("held-out check (after)", seconds):
            after = exact_match(trainer.model, tokenizer, heldout, config.eval.max_new_tokens)
        _log_exact_match("after training", after)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = RunSummary(
        run_dir=str(run_dir),
        adapter_dir=str(adapter_dir),
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        exact_match_before=before.accuracy if before else None,
        exact_match_after=after.accuracy if after else None,
        stage_seconds=seconds,
    )
    if state.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        log.info("training loss %.4f -> %.4f; adapter saved to %s", summary.train_loss_first or float("nan"),
                 summary.train_loss_last or float("nan"), adapter_dir)
        write_report(run_dir)
        log.info("report: %s", run_dir / "report.md")  # the same form as the adapter's path above
    return summary


@contextmanager
def stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a stage and log its wall time and peak memory so far; out of memory names the stage."""
    start = time.perf_counter()
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise out_of_memory_error(name) from error
    seconds[name] = round(time.perf_counter() - start, 3)
    log.info("stage %-24s %7.1f s   peak memory %.2f GiB", name, seconds[name], peak_memory_gib())


def _interrupted(signum: int, step: int, run_dir: Path) -> TrainingInterrupted:
    checkpoint = newest_checkpoint(run_dir / "checkpoints")
    return TrainingInterrupted(
        f"training stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {checkpoint}. "
        f"Resume with: {resume_command(run_dir)}",
        signum,
    )


def resume_command(run_dir: Path) -> str:
    """The command that continues this run from its newest checkpoint: this command line, pinned to its folder."""
    kept = [arg for arg in sys.argv[1:] if not arg.startswith(("training.resume=", "training.output_dir="))]
    # under accelerate launch the same launcher and options run it again (accelerate does not pass them on)
    launcher = "accelerate launch [the same options] -m qlora.train" if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else "python -m qlora.train"
    return " ".join([launcher, *kept, f"training.output_dir={run_dir}", "training.resume=auto"])


def _heldout_examples(config: TrainConfig) -> datasets.Dataset | None:
    samples = config.eval.exact_match_samples
    if config.data.heldout_path is None or samples == 0:
        return None
    if uses_fsdp():
        # generate() runs the model's layers without FSDP's gathering of their weights; the saved adapter answers
        # in one process instead (qlora.evaluate)
        log.info("held-out check skipped under FSDP: the sharded model cannot generate. Score the saved adapter with "
                 "python -m qlora.evaluate run=%s data.path=%s", config.training.output_dir, config.data.heldout_path)
        return None
    heldout = load_sft_dataset(config.data.heldout_path, config.data.format)
    return heldout.select(range(min(samples, len(heldout))))


def _log_exact_match(when: str, result: ExactMatch) -> None:
    log.info("held-out exact match %s: %d/%d (%.0f%%)", when, result.correct, result.total, 100 * result.accuracy)
    for _, expected, answer in result.samples:
        log.info("    expected %r, model said %r", expected, answer.strip())


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
