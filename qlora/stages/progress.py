"""What the terminal shows while training: one progress bar from the main process (qlora.output quiets the
libraries' own)."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Optional, TextIO

from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger("qlora")


class TokenRate:
    """Tokens per second between logging steps, from TRL's cumulative `num_tokens` (all processes).

    One instance serves every callback that shows the rate (the bar, metrics.jsonl): the first to ask at a
    step measures it, the others get the same number. The first logging step of a run (or of a resumed run)
    has no interval behind it, so no rate.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._time, self._tokens, self._step, self._rate = time.perf_counter(), None, None, None

    def at(self, step: int, tokens: Optional[float]) -> Optional[float]:
        if step != self._step:
            now = time.perf_counter()
            measured = tokens is not None and self._tokens is not None and now > self._time
            self._rate = (tokens - self._tokens) / (now - self._time) if measured else None
            self._time, self._tokens, self._step = now, tokens, step
        return self._rate


# what the line shows of a preference method's metrics (KTO logs no reward accuracy): label, key, format
PREFERENCE_SHOWN = (("margin", "rewards/margins", ".3f"), ("acc", "rewards/accuracies", ".2f"))


class TrainingProgress(TrainerCallback):
    """One bar with loss, lr, tokens/s and ETA (and a preference method's reward margin and accuracy); transformers'
    own bar and log printer are removed.

    Only the main process draws. When the output is not a terminal (a scheduler's log file), a bar's
    carriage returns would be noise, so each logging step is logged as one plain line instead (also
    into train.log).
    """

    def __init__(self, stream: Optional[TextIO] = None, rate: Optional[TokenRate] = None):
        self.stream = stream or sys.stderr
        self.rate = rate or TokenRate()
        self.bar: Optional[tqdm] = None
        self._start = time.perf_counter()
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._start = time.perf_counter()
        self.rate.start()
        self._start_step = state.global_step  # a resumed run starts part-way
        if self.stream.isatty():
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, file=self.stream)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            preference = "".join(f", {label} {logs[f'eval_{key}']:{spec}}" for label, key, spec in PREFERENCE_SHOWN
                                 if f"eval_{key}" in logs)
            self._write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}{preference}")
        if "loss" not in logs:
            return
        now, tokens_per_s = time.perf_counter(), self.rate.at(state.global_step, logs.get("num_tokens"))
        shown = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0.0):.2e}"}
        for name, key, spec in PREFERENCE_SHOWN:  # a preference method: is the chosen answer pulling ahead?
            if key in logs:
                shown[name] = format(logs[key], spec)
        if tokens_per_s is not None:
            shown["tok/s"] = f"{tokens_per_s:,.0f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=True)
            return
        done = state.global_step - self._start_step
        remaining = (now - self._start) / done * (state.max_steps - state.global_step) if done else 0.0
        fields = "  ".join(f"{name} {value}" for name, value in shown.items())
        self._write(f"step {state.global_step}/{state.max_steps}  {fields}  "
                    f"ETA {timedelta(seconds=round(remaining))}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            log.info(line)
