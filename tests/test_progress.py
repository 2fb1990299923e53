"""The progress display: one bar on a terminal, one plain line per logging step otherwise, main process only."""

import io
import json
import logging
import time

from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora.stages.progress import TokenRate, TrainingProgress
from qlora.stages.trainer import MetricsFile


class Terminal(io.StringIO):
    def isatty(self):
        return True


def drive(*callbacks, main_process=True):
    """Feed the callbacks what the trainer would: 4 steps, logging at 2 and 4 (TRL's cumulative num_tokens)."""
    args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
    state = TrainerState(max_steps=4, is_world_process_zero=main_process)
    for callback in callbacks:
        callback.on_train_begin(args, state, control)
    for step in range(1, 5):
        state.global_step = step
        time.sleep(0.01)
        for callback in callbacks:
            callback.on_step_end(args, state, control)
            if step % 2 == 0:
                logs = {"loss": 3.0 / step, "learning_rate": 1e-3 / step, "num_tokens": 500.0 * step}
                callback.on_log(args, state, control, logs=logs)
    for callback in callbacks:
        callback.on_log(args, state, control, logs={"eval_loss": 0.5})
        callback.on_train_end(args, state, control)


def test_a_terminal_gets_one_bar_with_loss_lr_tokens_per_second_and_eta():
    terminal = Terminal()
    drive(TrainingProgress(terminal))
    shown = terminal.getvalue()
    assert "4/4" in shown and "loss=0.7500" in shown and "lr=2.50e-04" in shown and "tok/s=" in shown
    assert "<00:00" in shown  # tqdm's remaining-time estimate
    assert "step 4: eval loss 0.5000" in shown


def test_a_log_file_gets_one_line_per_logging_step(caplog):
    log_file = io.StringIO()
    with caplog.at_level(logging.INFO, logger="qlora"):
        drive(TrainingProgress(log_file))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("step 2/4  loss 1.5000  lr 5.00e-04  ETA ")
    assert lines[1].startswith("step 4/4  loss 0.7500  lr 2.50e-04  tok/s ") and lines[1].endswith("ETA 0:00:00")
    assert lines[2] == "step 4: eval loss 0.5000"
    assert log_file.getvalue() == ""  # no bar, no carriage returns


def test_other_processes_show_nothing(caplog):
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="qlora"):
        drive(TrainingProgress(terminal), main_process=False)
    assert terminal.getvalue() == "" and not caplog.records


def test_the_progress_line_and_metrics_jsonl_show_one_measured_rate(tmp_path, caplog):
    rate = TokenRate()
    with caplog.at_level(logging.INFO, logger="qlora"):
        drive(MetricsFile(tmp_path / "metrics.jsonl", rate=rate), TrainingProgress(io.StringIO(), rate=rate))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert rows[0]["tokens_per_s"] is None  # no interval before the first logging step
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 4/4")][0]
    assert 1000 / 0.02 >= rows[1]["tokens_per_s"] > 0  # 1,000 tokens in at least 2 x 10 ms
    assert f"tok/s {rows[1]['tokens_per_s']:,.0f} " in shown

