"""The training run: the ordered stages over one config, each timed and logged.

    run folder (locked; a resumed run at its last step ends here) -> tokenizer -> data -> quantized model
    -> k-bit preparation -> LoRA adapters -> held-out check -> the method's trainer (SFT, DPO, ORPO, KTO).train
    -> save adapter -> held-out check -> summary
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
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerState, set_seed

from qlora.config import TrainConfig
from qlora.data import SFTData, prepare_training_data
from qlora.data.preference import PreferenceData
from qlora.errors import TrainingInterrupted
from qlora.output import quiet_other_processes
from qlora.stages.adapters import attach_training_adapters
from qlora.stages.allocator import expand_segments
from qlora.stages.artifacts import (
    adapter_tensor_names,
    prepare_run_dir,
    save_adapter_from_checkpoint,
    save_trained_adapter,
)
from qlora.stages.checkpoints import (
    checkpoint_step,
    find_resume_checkpoint,
    finished_at,
    newest_checkpoint,
    remove_if_empty,
)
from qlora.stages.disk_space import check_free_space
from qlora.stages.faults import (
    NonFiniteGuard,
    SignalReceived,
    StopOnSignal,
    out_of_memory_error,
    saved_skipped_steps,
    step_callbacks,
)
from qlora.stages.heldout import (
    ExactMatch,
    HeldoutEvaluation,
    PreferenceAccuracy,
    exact_match,
    heldout_examples,
    heldout_pairs,
    preference_accuracy,
)
from qlora.stages.memory import expected_training_peak
from qlora.stages.model import (
    fit_embeddings_to_tokenizer,
    frozen_weights_dtype,
    load_quantized_model,
    load_tokenizer,
    loaded_quantization,
    prepare_for_kbit_training,
    warn_about_remote_code,
)
from qlora.stages.processes import describe_global_batch, on_main_process, process_state, share_run_dir, uses_fsdp
from qlora.stages.report import write_report
from qlora.stages.run_lock import RunDirLock
from qlora.stages.startup import FirstStepMemory, show_summary, startup_summary, write_summary
from qlora.stages.trainer import build_trainer, check_performance_support, peak_memory_gib, restoring_on_error

log = logging.getLogger("qlora")


@dataclass
class RunSummary:
    run_dir: str
    adapter_dir: str
    train_loss_first: Optional[float] = None
    train_loss_last: Optional[float] = None
    exact_match_before: Optional[float] = None
    exact_match_after: Optional[float] = None
    steps: Optional[int] = None  # optimizer steps reached
    skipped_steps: int = 0  # of those, steps whose update was skipped for NaN/inf (training.on_nonfinite=skip)
    # the preference methods' held-out check: share of pairs whose chosen answer is the more likely, and the mean
    # log-probability margin chosen - rejected
    preference_accuracy_before: Optional[float] = None
    preference_accuracy_after: Optional[float] = None
    preference_margin_before: Optional[float] = None
    preference_margin_after: Optional[float] = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def run_training(config: TrainConfig) -> RunSummary:
    expand_segments(config.performance.expandable_segments)  # best before anything starts CUDA
    state = process_state()
    share_run_dir(config, state)  # before anything reads training.output_dir
    if not state.is_main_process:  # the run's log is the main process's
        quiet_other_processes()
        logging.getLogger("qlora").setLevel(logging.WARNING)
    run_dir = Path(config.training.output_dir).expanduser()
    stop, guard = step_callbacks(config, run_dir)
    lock = RunDirLock(run_dir)
    with stop.handling_signals():  # from the start: a signal in start-up stops at once, with a message
        try:
            on_main_process(state, lock.acquire)  # before anything in the folder is read, moved or written
            return _train(config, state, run_dir, stop, guard)
        except SignalReceived as received:
            raise _stopped_outside_training(received, run_dir) from None
        finally:
            lock.release()


def _train(config: TrainConfig, state: PartialState, run_dir: Path, stop: StopOnSignal,
           guard: NonFiniteGuard) -> RunSummary:
    # refuses a checkpoint that does not fit, and sets aside one that does not load, before any other write
    resume_from = on_main_process(state, lambda: find_resume_checkpoint(config))
    last_step = finished_at(resume_from, config) if resume_from is not None else None
    if last_step is not None:
        return on_main_process(state, lambda: _finished_run(resume_from, last_step, run_dir))
    resuming = config.training.resume is not None
    resume_step = checkpoint_step(resume_from) if resume_from else (0 if resuming else None)
    on_main_process(state, lambda: prepare_run_dir(config, resume_step))
    if state.is_main_process:
        _log_to_file(run_dir / "train.log")
    log.info("global batch: %s", describe_global_batch(config, state.num_processes))
    seconds: dict[str, float] = {}
    set_seed(config.training.seed)  # LoRA's initial weights come from this seed

    check_performance_support(config.performance, state.device)
    warn_about_remote_code(config.model)  # before the tokenizer, the first to load with it
    with stage("tokenizer", seconds):
        tokenizer = load_tokenizer(config.model)
    with stage("data", seconds):
        data = prepare_training_data(config.data, tokenizer, config.training.seed, config.training.method)
        heldout = _heldout_examples(config, data)
        if state.is_main_process:
            (run_dir / "data_stats.json").write_text(json.dumps(asdict(data.stats), indent=2) + "\n")
    with stage("quantized model", seconds):
        model = load_quantized_model(config.model, config.quantization, state.device, sharded=uses_fsdp())
        quantization = loaded_quantization(model, config.quantization)  # a pre-quantized checkpoint's own
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

    before = None
    if heldout is not None:
        with stage("held-out check (before)", seconds):
            before = _check_heldout(config, model, tokenizer, heldout, "before training")
    with stage("trainer", seconds):
        callbacks = [stop, guard]
        if heldout is not None and config.eval.during_training:
            callbacks.append(HeldoutEvaluation(heldout, tokenizer, config.eval.max_new_tokens,
                                               config.training.eval_steps, run_dir / "metrics.jsonl"))
        trainer = build_trainer(config, model, tokenizer, data.train, run_dir, data.validation, callbacks, resuming)
    overview = startup_summary(config, trainable, total, data.stats, len(data.validation) if data.validation else None,
                               len(trainer.train_dataset), state.num_processes, run_dir, resume_command(run_dir),
                               quantization)
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
        with stop.finishing_first("saving a checkpoint at the end of this step, then stopping"), \
                restoring_on_error(trainer):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.received is not None:
        raise _interrupted(stop.received, trainer.state.global_step, run_dir)
    if state.is_main_process:
        remove_if_empty(run_dir / "checkpoints")
    # the adapter, the held-out check, the summary and the report take seconds: a signal lets them finish
    with stop.finishing_first("finishing the run first (adapter, held-out check, summary, report)"):
        summary = _end_of_run(config, state, trainer, tokenizer, heldout, before, guard, seconds)
    if stop.received is not None:
        log.warning("%s arrived while the run was finishing; it finished first", signal.Signals(stop.received).name)
    return summary


def _end_of_run(config: TrainConfig, state: PartialState, trainer: Trainer, tokenizer: PreTrainedTokenizerBase,
                heldout: Optional[datasets.Dataset], before: ExactMatch | PreferenceAccuracy | None,
                guard: NonFiniteGuard, seconds: dict[str, float]) -> RunSummary:
    """Save the adapter, check it on the held-out examples, and write the summary and the report."""
    run_dir = Path(config.training.output_dir).expanduser()
    with stage("save adapter", seconds):
        adapter_dir = save_trained_adapter(trainer, tokenizer, run_dir)
    after = None
    if heldout is not None:
        with stage("held-out check (after)", seconds):
            after = _check_heldout(config, trainer.model, tokenizer, heldout, "after training")

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = RunSummary(
        run_dir=str(run_dir),
        adapter_dir=str(adapter_dir),
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        steps=trainer.state.global_step,
        skipped_steps=len(guard.skipped_steps),
        stage_seconds=seconds,
        **_heldout_scores(before, after),
    )
    if state.is_main_process:
        _write_summary_and_report(summary, run_dir)
    return summary


def _finished_run(checkpoint: Path, last_step: int, run_dir: Path) -> RunSummary:
    """A run resumed at its last step trains nothing; what a signal or a crash kept its end from writing (the
    adapter, the summary, the report) is written from its last checkpoint."""
    if not adapter_tensor_names(run_dir / "adapter"):
        save_adapter_from_checkpoint(checkpoint, run_dir)
        log.info("the run ended before its adapter was saved: saved it from %s", checkpoint)
    if (run_dir / "summary.json").is_file():
        saved = json.loads((run_dir / "summary.json").read_text())
        saved.update(run_dir=str(run_dir), adapter_dir=str(run_dir / "adapter"))  # where it is now, if moved
        summary = RunSummary(**{key: value for key, value in saved.items() if key in RunSummary.__dataclass_fields__})
    else:
        summary = _summary_of_checkpoint(checkpoint, run_dir)
        _write_summary_and_report(summary, run_dir)
    log.info("nothing to train: %s is at step %d, the run's last; the run is finished and its adapter is in %s",
             checkpoint, last_step, run_dir / "adapter")
    return summary


def _summary_of_checkpoint(checkpoint: Path, run_dir: Path) -> RunSummary:
    """The summary of a finished run, from its last checkpoint (no held-out check: no model is loaded)."""
    reached = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    losses = [entry["loss"] for entry in reached.log_history if "loss" in entry]
    return RunSummary(run_dir=str(run_dir), adapter_dir=str(run_dir / "adapter"),
                      train_loss_first=losses[0] if losses else None, train_loss_last=losses[-1] if losses else None,
                      steps=reached.global_step, skipped_steps=len(saved_skipped_steps(reached)))


def _write_summary_and_report(summary: RunSummary, run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    log.info("training loss %.4f -> %.4f; adapter saved to %s", summary.train_loss_first or float("nan"),
             summary.train_loss_last or float("nan"), summary.adapter_dir)
    if summary.skipped_steps:
        log.warning("%d of %d steps were skipped for NaN/inf loss or gradients", summary.skipped_steps, summary.steps)
    if (run_dir / "metrics.jsonl").is_file():  # not in a folder that only holds a checkpoint resumed from
        write_report(run_dir)
        log.info("report: %s", run_dir / "report.md")  # the same form as the adapter's path above


@contextmanager
def stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a stage and log its wall time and peak memory so far; out of memory or a signal names the stage."""
    start = time.perf_counter()
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise out_of_memory_error(name) from error
    except SignalReceived as received:
        received.stage = received.stage or name
        raise
    seconds[name] = round(time.perf_counter() - start, 3)
    log.info("stage %-24s %7.1f s   peak memory %.2f GiB", name, seconds[name], peak_memory_gib())


def _interrupted(signum: int, step: int, run_dir: Path) -> TrainingInterrupted:
    checkpoint = newest_checkpoint(run_dir / "checkpoints")
    return TrainingInterrupted(
        f"training stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {checkpoint}. "
        f"Resume with: {resume_command(run_dir)}",
        signum,
    )


def _stopped_outside_training(received: SignalReceived, run_dir: Path) -> TrainingInterrupted:
    checkpoint = newest_checkpoint(run_dir / "checkpoints")
    kept = f"the newest checkpoint is {checkpoint}" if checkpoint else "nothing was trained yet"
    return TrainingInterrupted(
        f"training stopped by {signal.Signals(received.signum).name} in stage '{received.stage or 'start-up'}'; "
        f"{kept}. Resume with: {resume_command(run_dir)}",
        received.signum,
    )


def resume_command(run_dir: Path) -> str:
    """The command that continues this run from its newest checkpoint: this command line, pinned to its folder."""
    kept = [arg for arg in sys.argv[1:] if not arg.startswith(("training.resume=", "training.output_dir="))]
    # under accelerate launch the same launcher and options run it again (accelerate does not pass them on)
    launcher = "accelerate launch [the same options] -m qlora.train" if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else "python -m qlora.train"
    return " ".join([launcher, *kept, f"training.output_dir={run_dir}", "training.resume=auto"])


def _heldout_examples(config: TrainConfig, data: SFTData | PreferenceData) -> datasets.Dataset | None:
    """The first eval.exact_match_samples rows of data.heldout_path: prompts with answers, or for a preference
    method pairs; None (saying why) where they cannot be checked."""
    path, samples = config.data.heldout_path, config.eval.exact_match_samples
    if uses_fsdp() and path is not None and samples:
        if isinstance(data, PreferenceData):  # its log-probabilities are not computed on a sharded model
            log.info("held-out check skipped under FSDP; validation pairs (data.val_path) give the reward margin and "
                     "accuracy every training.eval_steps instead")
            return None
        # generate() runs the model's layers without FSDP's gathering of their weights; the saved adapter answers
        # in one process instead (qlora.evaluate)
        log.info("held-out check skipped under FSDP: the sharded model cannot generate. Score the saved adapter with "
                 "python -m qlora.evaluate run=%s data.path=%s", config.training.output_dir, path)
        return None
    if isinstance(data, PreferenceData):
        return heldout_pairs(path, samples)
    return heldout_examples(path, samples, data.formats)


def _check_heldout(config: TrainConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   heldout: datasets.Dataset, when: str) -> ExactMatch | PreferenceAccuracy:
    """SFT: greedy answers scored by exact match; a preference method: how often the chosen answer is preferred."""
    if config.training.method != "sft":
        result = preference_accuracy(model, tokenizer, heldout)
        log.info("held-out preference accuracy %s: %d/%d (%.0f%%), mean log-probability margin chosen - rejected "
                 "%.3f", when, result.preferred, result.total, 100 * result.accuracy, result.mean_margin)
        return result
    result = exact_match(model, tokenizer, heldout, config.eval.max_new_tokens)
    log.info("held-out exact match %s: %d/%d (%.0f%%)", when, result.correct, result.total, 100 * result.accuracy)
    for _, expected, answer in result.samples:
        log.info("    expected %r, model said %r", expected, answer.strip())
    return result


def _heldout_scores(before: ExactMatch | PreferenceAccuracy | None,
                    after: ExactMatch | PreferenceAccuracy | None) -> dict[str, Optional[float]]:
    """The summary's fields of the held-out check that ran (none without a held-out set)."""
    if before is None or after is None:
        return {}
    if isinstance(before, ExactMatch):
        return {"exact_match_before": before.accuracy, "exact_match_after": after.accuracy}
    return {"preference_accuracy_before": before.accuracy, "preference_accuracy_after": after.accuracy,
            "preference_margin_before": before.mean_margin, "preference_margin_after": after.mean_margin}


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
