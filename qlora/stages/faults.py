"""Faults during training turned into clear errors: signals, NaN/inf steps, out of memory."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import ExportableState

from qlora.config import TrainConfig
from qlora.errors import QLoRAError
from qlora.stages.checkpoints import newest_checkpoint
from qlora.stages.processes import largest_on_any_process, max_over_processes

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalReceived(BaseException):
    """SIGTERM or SIGINT where nothing is lost by stopping at once (start-up), raised where the program is.

    A BaseException, as KeyboardInterrupt is, so that no library's `except Exception` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.stage: Optional[str] = None  # the pipeline's stage it stopped, named as it passes through


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT for the whole run; a second signal exits at once.

    In the training loop: finish the current step, save a checkpoint and stop. Preemptible machines and
    schedulers send SIGTERM and wait a little before SIGKILL; Ctrl-C sends SIGINT. Stopping at a step end keeps
    optimizer and data position consistent for an exact resume. While the run's end is written (adapter,
    summary, report: seconds): let it finish. Anywhere else (start-up, where nothing is lost): stop at once,
    raising SignalReceived.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._finishing: Optional[str] = None  # what a signal lets finish, as the warning says; None: stop at once

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def finishing_first(self, work: str) -> Iterator[None]:
        """Inside, a signal lets `work` finish: it is only recorded in `received`, for the caller to act on."""
        self._finishing = work
        try:
            yield
        finally:
            self._finishing = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            print(f"qlora: {signal.Signals(signum).name} again: exiting now without saving; the last complete "
                  f"checkpoint is kept.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if self._finishing is None:
            raise SignalReceived(signum)
        log.warning("%s received: %s (send it again to exit at once)", signal.Signals(signum).name, self._finishing)

    def on_step_end(self, args, state, control, **kwargs):
        # A scheduler may signal one process only: all stop at the same step, so that none waits alone
        # in the next step's collectives (one number all-reduced per step; nothing on one process).
        signum = largest_on_any_process(self.received or 0, args.device)
        if signum:
            self.received = signum
            control.should_save = True  # also with training.save_steps=0
            control.should_training_stop = True


class NonFiniteGuard(TrainerCallback, ExportableState):
    """Check the gradients before each optimizer update; NaN/inf stops the run or skips the update.

    Runs at on_pre_optimizer_step, the one per-step hook that sees the gradients before they change the
    weights; a NaN/inf loss shows up here as NaN gradients. Callbacks see loss and grad norm only at
    logging steps, and transformers' logging_nan_inf_filter would hide a NaN loss there anyway.

    With torch's fused optimizers (qlora's default adamw_torch_fused) the verdict never waits for the GPU: it
    goes to the optimizer as its `found_inf` input (GradScaler's), which leaves weights and moments untouched
    on a non-finite step, and the host reads it one step later, when it is long computed. Reading it at once
    would hold the host until the GPU finished the backward pass, every step, with nothing queued behind it
    (the GPU then idled ~20 ms per Llama-2-7B step, profiled). Other optimizers need the verdict before
    their update: for them the host waits.

    The skipped steps are saved with each checkpoint (transformers keeps an ExportableState callback's state in
    trainer_state.json), so that a resumed run counts them all.
    """

    def __init__(self, action: str, checkpoints_dir: Path | str, lr: float, max_skipped_fraction: float):
        self.action = action
        self.checkpoints_dir = Path(checkpoints_dir)
        self.lr = lr
        self.max_skipped_fraction = max_skipped_fraction
        self.skipped_steps: list[int] = []
        self._run_steps = 0  # known when training begins
        self._trainable: Optional[list[torch.nn.Parameter]] = None  # found once: a walk over all modules takes ms
        self._unread: Optional[tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = None  # step, verdict, copied

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped_steps = saved_skipped_steps(state)  # a resumed run continues its checkpoint's count
        # at a save transformers updates only the callback states the trainer state holds: one resumed from a
        # checkpoint saved without this callback's would fail (KeyError)
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self._run_steps = state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._read_verdict()  # the checkpoint about to be saved counts this step's skip too

    def state(self) -> dict:
        return {"args": {"action": self.action, "checkpoints_dir": str(self.checkpoints_dir), "lr": self.lr,
                         "max_skipped_fraction": self.max_skipped_fraction},
                "attributes": {"skipped_steps": self.skipped_steps}}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._read_verdict()
        step = state.global_step + 1
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad for p in self._trainable if p.grad is not None]
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps torch's optimizer
        skips_on_device = getattr(optimizer, "_step_supports_amp_scaling", False)  # torch's fused optimizers
        if not grads:
            if skips_on_device:
                optimizer.found_inf = None
            return
        # the largest |gradient| is NaN/inf exactly when one of them is (the 2-norm could overflow on finite ones):
        # torch computes it with a few multi-tensor kernels, where a check per gradient launches two from Python
        largest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
        # under FSDP each process holds a shard of the gradients: the verdict must be the same everywhere
        nonfinite = max_over_processes(torch.isfinite(largest).logical_not().float())
        if not skips_on_device:
            if bool(nonfinite):
                self._act(step, optimizer)
            return
        optimizer.found_inf = nonfinite
        verdict = nonfinite.to("cpu", non_blocking=True)  # from a GPU into pinned memory, valid once `copied` is
        copied = torch.cuda.Event() if nonfinite.is_cuda else None  # reached; on the CPU the tensor itself
        if copied is not None:
            copied.record()
        self._unread = (step, verdict, copied)

    def on_train_end(self, args, state, control, **kwargs):
        self._read_verdict()  # the last step's

    def _read_verdict(self) -> None:
        if self._unread is None:
            return
        step, verdict, copied = self._unread
        self._unread = None
        if copied is not None:
            copied.synchronize()
        if bool(verdict):
            self._act(step, optimizer=None)  # the fused optimizer already skipped the update

    def _act(self, step: int, optimizer) -> None:
        if self.action == "skip":
            # torch's and bitsandbytes' optimizers leave a parameter without a gradient untouched
            # (no momentum, no weight decay); the learning-rate schedule still advances.
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            self.skipped_steps.append(step)
            log.warning("step %d: NaN/inf loss or gradients; skipped this update (training.on_nonfinite=skip)", step)
            if len(self.skipped_steps) > self.max_skipped_fraction * self._run_steps:
                raise self._too_many_skipped(step)
            return
        raise QLoRAError(
            f"training stopped at step {step}: the loss or the gradients are NaN/inf, so the weights were not "
            f"updated. Last good checkpoint: {self._last_good()}. {self._likely_causes()} Resume with "
            f"training.resume=auto after the fix, or set training.on_nonfinite=skip to skip such steps."
        )

    def _too_many_skipped(self, step: int) -> QLoRAError:
        return QLoRAError(
            f"training stopped at step {step}: {len(self.skipped_steps)} steps had NaN/inf loss or gradients and "
            f"were skipped, more than training.max_skipped_fraction={self.max_skipped_fraction} of the run's "
            f"{self._run_steps} steps allows: it is not learning. Skipped steps left the weights as they were; "
            f"last checkpoint: {self._last_good()}. {self._likely_causes()} Resume with training.resume=auto after "
            f"the fix, or raise training.max_skipped_fraction."
        )

    def _last_good(self) -> str:
        return str(newest_checkpoint(self.checkpoints_dir) or "none (training.save_steps=0 or none saved yet)")

    def _likely_causes(self) -> str:
        return (f"Likely causes: float16 overflow (use quantization.compute_dtype=bfloat16 where the GPU supports "
                f"it), a learning rate too high (training.lr={self.lr}; try a tenth), or a broken data row.")


def saved_skipped_steps(state: TrainerState) -> list[int]:
    """The steps a run skipped for NaN/inf up to the state's step (as its NonFiniteGuard saved them)."""
    saved = state.stateful_callbacks.get(NonFiniteGuard.__name__, {})
    return list(saved.get("attributes", {}).get("skipped_steps", []))


def step_callbacks(config: TrainConfig, run_dir: Path) -> tuple[StopOnSignal, NonFiniteGuard]:
    """Every run's per-step callbacks (the pipeline's and the benchmark's): stop at a signal, check the gradients
    before each update."""
    guard = NonFiniteGuard(config.training.on_nonfinite, run_dir / "checkpoints", config.training.lr,
                           config.training.max_skipped_fraction)
    return StopOnSignal(), guard


def out_of_memory_error(stage_name: str) -> QLoRAError:
    """The QLoRAError for torch.OutOfMemoryError in a stage: where, how much, and what to change."""
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        in_use = (f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated by torch, "
                  f"{torch.cuda.memory_reserved(device) / 2**30:.2f} GiB reserved, of "
                  f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.2f} GiB on GPU {device}")
    else:
        in_use = "no CUDA device statistics available"
    return QLoRAError(
        f"out of GPU memory in stage '{stage_name}' ({in_use}). To fit: lower training.batch_size and raise "
        f"training.grad_accum to keep the effective batch, lower data.max_length, set "
        f"training.gradient_checkpointing=true, or use a smaller quantization (quantization=nf4)."
    )
