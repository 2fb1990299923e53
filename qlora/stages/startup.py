"""The start-up summary: what is about to be trained, on what, for how long, where it goes, how to resume.

Printed before the first step (a rich table on a terminal, plain log lines otherwise), written to
startup_summary.json and repeated at the top of report.md.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, TextIO

import torch
from transformers import TrainerCallback

from qlora.config import QuantizationConfig, TrainConfig, report_destinations
from qlora.data.tokenization import DataStats
from qlora.stages.model import describe_quantization
from qlora.stages.trainer import peak_memory_gib

log = logging.getLogger("qlora")


@dataclass
class StartupSummary:
    model: str
    quantization: str
    lora: str
    trainable_parameters: int
    total_parameters: int
    data: str
    effective_batch: str
    steps: int
    loggers: str
    output_dir: str
    resume_command: str
    # issue 7's memory planner fills this before loading: plan_memory(config) -> MemoryPlan
    expected_memory: Optional[str] = None
    # measured: the peak after the first optimizer step (GPU memory allocated by torch, or peak RSS)
    memory_after_first_step_gib: Optional[float] = None

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs, in reading order; shared by the terminal and report.md."""
        first_step = ("not measured yet" if self.memory_after_first_step_gib is None
                      else f"{self.memory_after_first_step_gib:.2f} GiB")
        return [
            ("model", self.model),
            ("quantization", self.quantization),
            ("LoRA", f"{self.lora}; {self.trainable_parameters:,} trainable of {self.total_parameters:,} "
                     f"parameters ({100 * self.trainable_share:.2f}%)"),
            ("data", self.data),
            ("effective batch", self.effective_batch),
            ("steps", str(self.steps)),
            ("expected memory", self.expected_memory or "no estimate (see memory after first step)"),
            ("memory after first step", first_step),
            ("metrics to", self.loggers),
            ("output folder", self.output_dir),
            ("resume with", self.resume_command),
        ]


def startup_summary(
    config: TrainConfig,
    trainable_parameters: int,
    total_parameters: int,
    stats: DataStats,
    validation_examples: Optional[int],
    training_rows: int,
    world_size: int,
    run_dir: Path,
    resume_command: str,
    quantization: Optional[QuantizationConfig] = None,
) -> StartupSummary:
    """The summary of a run about to start; `training_rows` are the rows the trainer batches (after packing);
    `quantization` is the one the loaded model uses (a pre-quantized checkpoint's own), if not the config's."""
    t, lora, data = config.training, config.lora, config.data
    per_device = "auto (the largest that fits)" if t.batch_size == "auto" else str(t.batch_size)
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    p = stats.length_percentiles
    validation = f"; {validation_examples} validation examples" if validation_examples else ""
    return StartupSummary(
        model=f"{config.model.name_or_path} (dtype {config.model.dtype})",
        quantization=_describe_used_quantization(config.quantization, quantization or config.quantization),
        lora=f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, on {targets}",
        trainable_parameters=trainable_parameters,
        total_parameters=total_parameters,
        data=(f"{stats.examples} examples, {stats.tokens:,} tokens ({100 * stats.trained_share:.1f}% trained), "
              f"length p50 {p.get('p50')} max {p.get('max')}{', packed' if data.packing else ''}{validation}"),
        effective_batch=(f"{_effective_batch(t.batch_size, t.grad_accum, world_size)} = {per_device} per device "
                         f"x {t.grad_accum} accumulation x {world_size} process(es)"),
        steps=training_steps(config, training_rows, world_size),
        loggers=", ".join(["metrics.jsonl", *report_destinations(t)]),
        output_dir=str(run_dir),
        resume_command=resume_command,
    )


def _describe_used_quantization(requested: QuantizationConfig, used: QuantizationConfig) -> str:
    return describe_quantization(used) + ("" if used == requested else " (the pre-quantized checkpoint's own)")


def training_steps(config: TrainConfig, training_rows: int, world_size: int) -> int:
    """Optimizer steps of the run, computed as transformers' Trainer does (set_initial_training_values)."""
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    batch = 64 if t.batch_size == "auto" else t.batch_size  # auto: an upper bound until the batch is found
    batches = math.ceil(training_rows / (batch * world_size))
    return math.ceil(t.epochs * max(math.ceil(batches / t.grad_accum), 1))


def _effective_batch(batch_size: object, grad_accum: int, world_size: int) -> str:
    return "auto" if batch_size == "auto" else str(int(batch_size) * grad_accum * world_size)  # type: ignore[arg-type]


def show_summary(summary: StartupSummary, stream: Optional[TextIO] = None) -> None:
    """A table on a terminal; otherwise log lines (stdout and train.log), readable in a scheduler's log."""
    stream = stream or sys.stdout
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="qlora run", show_header=False, title_justify="left")
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(overflow="fold")
        for label, value in summary.rows():
            table.add_row(label, value)
        Console(file=stream).print(table)
        return
    for label, value in summary.rows():
        log.info("%-24s %s", label, value)


def write_summary(summary: StartupSummary, run_dir: Path) -> None:
    (run_dir / "startup_summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")


def read_summary(run_dir: Path) -> Optional[StartupSummary]:
    path = run_dir / "startup_summary.json"
    return StartupSummary(**json.loads(path.read_text())) if path.is_file() else None


class FirstStepMemory(TrainerCallback):
    """After the first optimizer step, log the peak memory next to the plan and record it in
    startup_summary.json."""

    def __init__(self, summary: StartupSummary, run_dir: Path, planned_gib: Optional[float] = None):
        self.summary, self.run_dir, self.planned_gib = summary, run_dir, planned_gib
        self._first_step: Optional[int] = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._first_step is not None or not state.is_world_process_zero:
            return
        self._first_step = state.global_step
        self.summary.memory_after_first_step_gib = round(peak_memory_gib(), 3)
        if self.planned_gib is None:
            log.info("memory after first step: %.2f GiB", self.summary.memory_after_first_step_gib)
        else:
            where = "" if torch.cuda.is_available() else " on a GPU; here the process's peak resident memory"
            log.info("memory after first step: %.2f GiB (planned %.2f GiB%s)", self.summary.memory_after_first_step_gib,
                     self.planned_gib, where)
        write_summary(self.summary, self.run_dir)
