"""report.md and its plot, regenerated and compared by `python -m qlora.report`, from a run folder's files."""

import json

import pytest
from matplotlib.image import imread

from qlora.errors import QLoRAError
from qlora.report import main
from qlora.stages.report import GENERATED, loss_figure, read_run, write_report
from qlora.stages.startup import StartupSummary, write_summary


def fake_run(folder, losses, eval_losses, tokens_per_s=1000.0):
    """A run folder as training leaves it: metrics.jsonl, summary.json and startup_summary.json."""
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": loss, "lr": 1e-3 * (len(losses) - i) / len(losses), "tokens_per_s": tokens_per_s,
             "peak_memory_gib": 1.0 + i} for i, loss in enumerate(losses)]
    rows += [{"step": 2 * (i + 1), "eval_loss": loss} for i, loss in enumerate(eval_losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"train_loss_first": losses[0], "train_loss_last": losses[-1], "exact_match_before": 0.0,
               "exact_match_after": 0.75, "stage_seconds": {"data": 5.0, "train": 120.0}}
    (folder / "summary.json").write_text(json.dumps(summary))
    write_summary(StartupSummary("tiny-llama", "nf4", "r=8", 100, 1000, "16 examples", "16", len(losses),
                                 "metrics.jsonl, tensorboard", str(folder), "python -m qlora.train ...",
                                 memory_after_first_step_gib=0.5), folder)
    return folder


def test_report_holds_summary_results_and_a_linked_plot(tmp_path):
    run = fake_run(tmp_path / "tiny" / "run1", [4.0, 3.0, 2.0, 1.5], [2.5, 1.8])
    report = write_report(run).read_text()
    assert report.startswith(GENERATED) and "# Training report: tiny/run1" in report
    assert "| LoRA | r=8; 100 trainable of 1,000 parameters (10.00%) |" in report
    assert "| memory after first step | 0.50 GiB |" in report
    assert "| training loss | 4.0000 -> 1.5000 |" in report
    assert "| final eval loss | 1.8000 (step 4) |" in report and "| best eval loss | 1.8000 (step 4) |" in report
    assert "| held-out exact match | 0% -> 75% |" in report
    assert "| throughput | 1,000 tokens/s" in report and "| peak memory | 4.00 GiB |" in report
    assert "| wall time | 0:02:05 |" in report
    assert "![training and eval loss, learning rate](report.png)" in report
    height, width, _ = imread(run / "report.png").shape
    assert (width, height) == (800, 600)


@pytest.mark.parametrize("losses, eval_losses, scale", [([6.8, 2.0, 0.4], [0.9], "log"),  # 6.8 / 0.4: 17x
                                                         ([4.0, 2.0, 1.5], [0.5], "linear")])  # 8x: within a decade
def test_the_plot_is_titled_with_the_run_and_a_loss_over_a_decade_is_on_a_log_scale(tmp_path, losses, eval_losses,
                                                                                     scale):
    figure = loss_figure([read_run(fake_run(tmp_path / "tiny" / "run1", losses, eval_losses))])
    loss_axes = figure.axes[0]
    assert figure.get_suptitle() == "tiny/run1"
    assert loss_axes.get_yscale() == scale


def test_best_eval_loss_is_the_lowest_not_the_last(tmp_path):
    record = read_run(fake_run(tmp_path / "run", [3.0, 2.0, 1.0, 0.5], [1.2, 0.9, 1.4]))
    assert record.best_eval() == {"step": 4, "eval_loss": 0.9} and record.final_eval()["eval_loss"] == 1.4


def test_report_command_compares_runs_in_one_table_and_plot(tmp_path, capsys):
    first = fake_run(tmp_path / "a", [4.0, 2.0], [1.5], tokens_per_s=500.0)
    second = fake_run(tmp_path / "b", [4.0, 3.0, 2.5, 2.0], [2.2, 1.9])
    output = tmp_path / "cmp" / "comparison.md"
    main([str(first), str(second), "--output", str(output)])
    assert (first / "report.md").is_file() and (second / "report.md").is_file()  # each regenerated
    table = output.read_text()
    assert "| run | steps | first loss | last loss | final eval loss | best eval loss | tokens/s |" in table
    assert f"| {tmp_path.name}/a | 2 | 4.0000 | 2.0000 | 1.5000 | 1.5000 | 500 | 2.00 | 0:02:05 |" in table
    assert f"| {tmp_path.name}/b | 4 | 4.0000 | 2.0000 | 1.9000 | 1.9000 | 1,000 | 4.00 | 0:02:05 |" in table
    assert "![training and eval loss, learning rate](comparison.png)" in table
    assert imread(output.with_suffix(".png")).shape[:2] == (600, 800)
    assert f"comparison: {output}" in capsys.readouterr().out
    main([str(first), str(second), "--output", str(output)])  # its own earlier comparison: regenerated


def test_report_command_never_overwrites_a_users_file(tmp_path, capsys):
    runs = [str(fake_run(tmp_path / name, [1.0], [])) for name in ("a", "b")]
    mine = tmp_path / "notes.md"
    mine.write_text("my notes\n")
    with pytest.raises(SystemExit) as exit_info:
        main([*runs, "--output", str(mine)])
    assert exit_info.value.code == 2 and mine.read_text() == "my notes\n"
    assert "was not written by qlora.report; refusing to overwrite it" in capsys.readouterr().err


def test_report_command_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"{tmp_path.resolve()} is not a training run folder (it has no metrics.jsonl)" in capsys.readouterr().err


def test_read_run_refuses_a_missing_folder(tmp_path):
    with pytest.raises(QLoRAError, match="missing is not a training run folder"):
        read_run(tmp_path / "missing")
