"""report.md in a run folder: the start-up summary, the results, and a plot of loss and learning rate (and for a
preference method, of the reward margin and accuracy).

Everything is read back from the files the run wrote (metrics.jsonl, summary.json, startup_summary.json),
so `python -m qlora.report` can regenerate a report, or compare runs, long after training.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from qlora.errors import QLoRAError
from qlora.stages.startup import StartupSummary, read_summary

# The first line of every file qlora.report writes: what it may regenerate without losing a user's file.
GENERATED = "<!-- written by qlora.report; regenerate with python -m qlora.report -->"


@dataclass
class RunRecord:
    """What one run folder says about its training: the logged rows and the end-of-run summary."""

    run_dir: Path
    train_rows: list[dict] = field(default_factory=list)  # step, loss, lr, tokens_per_s, peak_memory_gib
    eval_rows: list[dict] = field(default_factory=list)  # step, eval_loss
    summary: dict = field(default_factory=dict)  # summary.json (absent while a run is still going)
    startup: Optional[StartupSummary] = None

    @property
    def name(self) -> str:
        return f"{self.run_dir.parent.name}/{self.run_dir.name}"

    def final_eval(self) -> Optional[dict]:
        return self.eval_rows[-1] if self.eval_rows else None

    def best_eval(self) -> Optional[dict]:
        return min(self.eval_rows, key=lambda row: row["eval_loss"]) if self.eval_rows else None

    def tokens_per_s(self) -> Optional[float]:
        # the median over logging intervals: the first interval also holds the start-up
        rates = [row["tokens_per_s"] for row in self.train_rows if row.get("tokens_per_s")]
        return statistics.median(rates) if rates else None

    def peak_memory_gib(self) -> Optional[float]:
        peaks = [row["peak_memory_gib"] for row in self.train_rows if row.get("peak_memory_gib") is not None]
        return max(peaks) if peaks else None

    def wall_seconds(self) -> Optional[float]:
        seconds = self.summary.get("stage_seconds")
        return sum(seconds.values()) if seconds else None


def read_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir).expanduser().resolve()
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise QLoRAError(f"{run_dir} is not a training run folder (it has no metrics.jsonl): give outputs/<run>.")
    record = RunRecord(run_dir=run_dir, startup=read_summary(run_dir))
    for line in metrics.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "loss" in row:
            record.train_rows.append(row)
        elif "eval_loss" in row:
            record.eval_rows.append(row)
    if (run_dir / "summary.json").is_file():
        record.summary = json.loads((run_dir / "summary.json").read_text())
    return record


def write_report(run_dir: Path) -> Path:
    """Write report.md and report.png into the run folder; returns the report's path."""
    record = read_run(run_dir)
    plot_runs([record], record.run_dir / "report.png")
    lines = [GENERATED, f"# Training report: {record.name}", ""]
    if record.startup is not None:
        lines += ["## Summary", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {_cell(value)} |" for label, value in record.startup.rows()]
        lines.append("")
    lines += ["## Results", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in _results(record)]
    lines += ["", f"![{_plotted(record)}](report.png)", ""]
    path = record.run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_comparison(run_dirs: list[Path], output: Path) -> Path:
    """Compare runs in one table and one plot: output (a .md file) and the .png beside it."""
    if output.exists() and not output.read_text().startswith(GENERATED):
        raise QLoRAError(f"{output} exists and was not written by qlora.report; refusing to overwrite it. "
                         f"Choose another file with --output.")
    records = [read_run(run_dir) for run_dir in run_dirs]
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_path = output.with_suffix(".png")
    plot_runs(records, plot_path)
    header = ["run", "steps", "first loss", "last loss", "final eval loss", "best eval loss", "tokens/s",
              "peak memory (GiB)", "wall time"]
    lines = [GENERATED, "# Comparison of runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        final, best = r.final_eval(), r.best_eval()
        cells = [r.name, r.train_rows[-1]["step"] if r.train_rows else "-",
                 _number(r.train_rows[0]["loss"] if r.train_rows else None),
                 _number(r.train_rows[-1]["loss"] if r.train_rows else None),
                 _number(final and final["eval_loss"]), _number(best and best["eval_loss"]),
                 _number(r.tokens_per_s(), ",.0f"), _number(r.peak_memory_gib(), ".2f"), _duration(r.wall_seconds())]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", f"![training and eval loss, learning rate]({plot_path.name})", ""]
    output.write_text("\n".join(lines))
    return output


def plot_runs(records: list[RunRecord], path: Path) -> None:
    loss_figure(records).savefig(path, dpi=100)


def loss_figure(records: list[RunRecord]) -> Figure:
    """Training loss (lines) and eval loss (markers) above, learning rate below, one colour per run; for preference
    runs also the reward margin and accuracy (training lines, eval markers). Titled with the run, and the loss on a
    log scale when it spans more than a decade (else its end would be a flat line)."""
    preference = any(_is_preference(record) for record in records)
    figure = Figure(figsize=(8, 10 if preference else 6), constrained_layout=True)
    figure.suptitle(records[0].name if len(records) == 1 else f"comparison of {len(records)} runs")
    axes = figure.subplots(4 if preference else 2, 1, sharex=True, height_ratios=[2, 1, 1, 1] if preference else [2, 1])
    loss_axes, lr_axes = axes[0], axes[-1]
    for index, record in enumerate(records):
        colour = f"C{index}"
        label = record.name if len(records) > 1 else "training"
        steps = [row["step"] for row in record.train_rows]
        loss_axes.plot(steps, [row["loss"] for row in record.train_rows], color=colour, label=f"{label} loss")
        if record.eval_rows:
            loss_axes.plot([row["step"] for row in record.eval_rows], [row["eval_loss"] for row in record.eval_rows],
                           "o--", color=colour, label=f"{label} eval loss" if len(records) > 1 else "eval loss")
        lr_axes.plot(steps, [row.get("lr") or 0.0 for row in record.train_rows], color=colour)
        if preference:
            for axis, metric in zip(axes[1:3], ("rewards/margins", "rewards/accuracies")):
                _plot_metric(axis, record, metric, colour, label, several=len(records) > 1)
    losses = [row["loss"] for r in records for row in r.train_rows] + \
        [row["eval_loss"] for r in records for row in r.eval_rows]
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
        loss_axes.set_yscale("log")
    if preference:
        axes[1].set_ylabel("reward margin")
        axes[2].set_ylabel("reward accuracy")
        for axis in axes[1:3]:
            axis.legend(fontsize="small")
            axis.grid(alpha=0.3)
    loss_axes.set_ylabel("loss")
    loss_axes.legend(fontsize="small")
    loss_axes.grid(alpha=0.3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    return figure


def _plot_metric(axis, record: RunRecord, metric: str, colour: str, label: str, several: bool) -> None:
    """A preference metric: logged training values as a line, those on the validation pairs as markers."""
    trained = [row for row in record.train_rows if metric in row]
    axis.plot([row["step"] for row in trained], [row[metric] for row in trained], color=colour, label=label)
    evaluated = [row for row in record.eval_rows if f"eval_{metric}" in row]
    if evaluated:
        axis.plot([row["step"] for row in evaluated], [row[f"eval_{metric}"] for row in evaluated], "o--",
                  color=colour, label=f"{label} validation pairs" if several else "validation pairs")


def _is_preference(record: RunRecord) -> bool:
    return any("rewards/margins" in row for row in record.train_rows)


def _plotted(record: RunRecord) -> str:
    return "training and eval loss, " + ("reward margin and accuracy, " if _is_preference(record) else "") + \
        "learning rate"


def _results(record: RunRecord) -> list[tuple[str, str]]:
    s, final, best = record.summary, record.final_eval(), record.best_eval()
    rows = [("training loss", f"{_number(s.get('train_loss_first'))} -> {_number(s.get('train_loss_last'))}"),
            ("final eval loss", f"{_number(final['eval_loss'])} (step {final['step']})" if final else "no validation set"),
            ("best eval loss", f"{_number(best['eval_loss'])} (step {best['step']})" if best else "no validation set")]
    if s.get("exact_match_after") is not None:
        rows.append(("held-out exact match", f"{_percent(s.get('exact_match_before'))} -> {_percent(s['exact_match_after'])}"))
    if s.get("skipped_steps") is not None:
        rows.append(("skipped steps (NaN/inf)", f"{s['skipped_steps']} of {s.get('steps', '-')}"))
    if s.get("preference_accuracy_after") is not None:
        rows.append(("held-out preference accuracy",
                     f"{_percent(s.get('preference_accuracy_before'))} -> {_percent(s['preference_accuracy_after'])} "
                     f"(log-probability margin chosen - rejected {_number(s.get('preference_margin_before'), '.3f')} "
                     f"-> {_number(s.get('preference_margin_after'), '.3f')})"))
    rated = [row for row in record.eval_rows if "eval_rewards/margins" in row]
    if rated:
        rows.append(("final reward margin, accuracy on the validation pairs",
                     f"{_number(rated[-1]['eval_rewards/margins'])}, {_percent(rated[-1]['eval_rewards/accuracies'])} "
                     f"(step {rated[-1]['step']})"))
    rows += [("throughput", f"{_number(record.tokens_per_s(), ',.0f')} tokens/s (median over logging steps)"),
             ("peak memory", f"{_number(record.peak_memory_gib(), '.2f')} GiB"),
             ("wall time", _duration(record.wall_seconds()))]
    if s.get("stage_seconds"):
        rows.append(("stages", ", ".join(f"{name} {sec:.1f} s" for name, sec in s["stage_seconds"].items())))
    return rows


def _number(value: Optional[float], spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "- (the run has not finished)"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def _cell(value: str) -> str:
    return value.replace("|", "\\|")
