"""The start-up summary: parameters, data, effective batch, steps, output folder and resume command."""

import io
import logging

from qlora.data.tokenization import DataStats
from qlora.stages.startup import show_summary, startup_summary, training_steps

STATS = DataStats(rows=512, examples=512, skipped_malformed=0, truncated=0, dropped_too_long=0,
                  dropped_no_trainable=0, tokens=31148, trained_tokens=1024,
                  length_percentiles={"p50": 61, "p90": 61, "p99": 61, "max": 61})


def test_summary_of_the_tiny_recipe(tiny_config, tmp_path):
    config = tiny_config("training.grad_accum=2")
    summary = startup_summary(config, 77_824, 1_009_536, STATS, 32, 512, 2, tmp_path, "python -m qlora.train X")
    rows = dict(summary.rows())
    assert rows["quantization"] == "nf4 + double quant, float32 compute"
    assert rows["LoRA"] == "r=8, alpha=16, dropout=0.0, on all-linear; 77,824 trainable of 1,009,536 parameters (7.71%)"
    assert rows["data"] == "512 examples, 31,148 tokens (3.3% trained), length p50 61 max 61; 32 validation examples"
    assert rows["effective batch"] == "64 = 16 per device x 2 accumulation x 2 process(es)"
    assert rows["steps"] == "120"  # the tiny recipe's training.max_steps
    assert rows["expected memory"] == "no estimate (see memory after first step)"
    assert rows["metrics to"] == "metrics.jsonl, tensorboard"
    assert rows["output folder"] == str(tmp_path) and rows["resume with"] == "python -m qlora.train X"


def test_steps_from_epochs_follow_transformers(tiny_config):
    # 512 rows / (16 x 2 processes) = 16 batches per process; / grad_accum 4 = 4 steps per epoch
    config = tiny_config("training.max_steps=-1", "training.epochs=1.5", "training.grad_accum=4")
    assert training_steps(config, 512, 2) == 6
    assert training_steps(tiny_config("training.max_steps=-1", "training.grad_accum=3"), 40, 1) == 1  # 3 batches


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_table_and_a_log_gets_lines(tiny_config, tmp_path, caplog):
    summary = startup_summary(tiny_config(), 10, 100, STATS, None, 512, 1, tmp_path, "python -m qlora.train")
    terminal = Terminal()
    show_summary(summary, terminal)
    assert "qlora run" in terminal.getvalue() and "effective batch" in terminal.getvalue()
    with caplog.at_level(logging.INFO, logger="qlora"):
        show_summary(summary, io.StringIO())
    assert [r.getMessage().split()[0] for r in caplog.records][:3] == ["model", "quantization", "LoRA"]
    assert any(r.getMessage().startswith("resume with") for r in caplog.records)
