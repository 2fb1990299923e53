"""Atomic checkpoints and exact resume on the tiny recipe (CPU)."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, run_with_fault
from qlora.compose import compose_config
from qlora.errors import QLoRAError
from qlora.pipeline import run_training
from qlora.stages.checkpoints import CONFIG_NAME, find_resume_checkpoint, finished_at, newest_checkpoint
from qlora.stages.run_lock import LOCK_NAME

SHORT_RUN = ("training.max_steps=5", "training.save_steps=2", "training.batch_size=4", "training.logging_steps=1",
             "eval.exact_match_samples=0")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_sigkill_during_a_save_then_resume_matches_the_uninterrupted_run(tiny_config, tmp_path):
    reference = Path(run_training(tiny_config(*SHORT_RUN)).run_dir)

    killed = run_with_fault("sigkill-in-save", 4, *SHORT_RUN, "training.output_dir=killed", cwd=tmp_path)
    run_dir = tmp_path / "killed"
    assert killed.returncode == -9, killed.stderr[-2000:]
    # the save of step 4 never completed: its files sit in .partial/, and step 2 is the newest checkpoint
    assert (run_dir / "checkpoints/.partial/checkpoint-4/adapter_model.safetensors").is_file()
    assert not (run_dir / "checkpoints/checkpoint-4").exists()
    assert newest_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints/checkpoint-2"

    resumed = run_with_fault("none", 0, *SHORT_RUN, "training.output_dir=killed", "training.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    # bit-exact on the CPU: same per-step losses after step 2 and the same final adapter weights
    assert losses(run_dir) == losses(reference)
    expected = load_file(reference / "adapter/adapter_model.safetensors")
    actual = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    assert all((expected[name] == actual[name]).all() for name in expected)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4", "checkpoint-5"]  # save_total_limit=2, and the stale .partial is gone
    assert not (run_dir / "checkpoints/.partial").exists()
    # the interrupted attempt's outputs are kept, not overwritten
    assert (run_dir / "before-resume-2/config.yaml").is_file()
    assert [step for step, _ in losses(run_dir / "before-resume-2")] == [1, 2, 3, 4]
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4, 5]


def test_checkpoint_holds_state_and_resolved_config_in_safe_formats(tiny_config):
    config = tiny_config("training.max_steps=2", "training.save_steps=2", "eval.exact_match_samples=0", "lora.r=4")
    run_dir = Path(run_training(config).run_dir)
    checkpoint = run_dir / "checkpoints/checkpoint-2"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert "r: 4" in (checkpoint / CONFIG_NAME).read_text()
    assert not list(checkpoint.glob("*.bin")) or [p.name for p in checkpoint.glob("*.bin")] == ["training_args.bin"]
    assert not list((run_dir / "adapter").glob("*.bin"))  # weights only as safetensors


def test_resume_refuses_a_changed_model_lora_or_data(tiny_config, tmp_path):
    run_training(tiny_config("training.max_steps=2", "training.save_steps=2", "eval.exact_match_samples=0"))
    data = tmp_path / "other.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    changed = tiny_config("training.resume=auto", "lora.r=4", "training.batch_size=8", f"data.path={data}",
                          "training.max_steps=10", "training.lr=1e-4")
    with pytest.raises(QLoRAError) as error:
        find_resume_checkpoint(changed)
    message = str(error.value)
    for key in ("lora.r", "training.batch_size", "data.path"):
        assert key in message
    for key in ("training.max_steps", "training.lr"):  # changing how long or how fast is allowed
        assert key not in message
    assert find_resume_checkpoint(tiny_config("training.resume=auto", "training.max_steps=10")).name == "checkpoint-2"


def test_resume_path_must_be_a_complete_checkpoint(tiny_config, tmp_path):
    partial = tmp_path / "checkpoint-3"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(QLoRAError, match="not a complete, readable qlora checkpoint.*trainer_state.json"):
        find_resume_checkpoint(tiny_config(f"training.resume={partial}"))
    with pytest.raises(QLoRAError, match="training.resume=.*is not a folder"):
        tiny_config(f"training.resume={tmp_path / 'nope'}")


def test_resume_auto_without_checkpoint_starts_at_step_zero(tiny_config):
    assert find_resume_checkpoint(tiny_config("training.resume=auto")) is None


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# what a full disk, a killed copy or a stray edit can leave of a checkpoint that was complete when saved
CORRUPTIONS = {
    "truncated adapter": lambda checkpoint: truncate(checkpoint / "adapter_model.safetensors"),
    "truncated optimizer": lambda checkpoint: truncate(checkpoint / "optimizer.pt"),
    "truncated RNG state": lambda checkpoint: truncate(checkpoint / "rng_state.pth"),
    "invalid trainer state": lambda checkpoint: (checkpoint / "trainer_state.json").write_text('{"global_step": 4'),
    "deleted trainer state": lambda checkpoint: (checkpoint / "trainer_state.json").unlink(),
}
FOUR_STEPS = ("training.max_steps=4", "training.save_steps=2", "training.batch_size=4", "training.logging_steps=1",
              "eval.exact_match_samples=0")


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, trained once for the tests that copy it."""
    run_dir = tmp_path_factory.mktemp("four-steps") / "run"
    run_training(compose_config([f"training.output_dir={run_dir}", *FOUR_STEPS]))
    return run_dir


@pytest.fixture
def run_dir(four_step_run, tmp_path) -> Path:
    """This test's copy of the 4-step run, where tiny_config's training.output_dir points."""
    shutil.copytree(four_step_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_newest_good_one(tiny_config, caplog,
                                                                                                run_dir, corrupt):
    caplog.set_level(logging.INFO)
    checkpoints = run_dir / "checkpoints"
    corrupt(checkpoints / "checkpoint-4")
    run_training(tiny_config(*FOUR_STEPS, "training.resume=auto"))
    assert f"{checkpoints / 'checkpoint-4'} cannot be resumed from" in caplog.text
    assert "set aside as corrupt-checkpoint-4" in caplog.text
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in caplog.text
    assert (checkpoints / "corrupt-checkpoint-4").is_dir()  # kept for a look, never chosen again
    assert json.loads((checkpoints / "checkpoint-4/trainer_state.json").read_text())["global_step"] == 4  # saved anew
    assert losses(run_dir) == losses(run_dir / "before-resume-2")  # steps 3 and 4 again, exactly


def test_with_no_good_checkpoint_resume_auto_is_refused_and_touches_nothing(tiny_config, run_dir):
    before = sorted(p.name for p in run_dir.iterdir())
    for step in (2, 4):
        truncate(run_dir / f"checkpoints/checkpoint-{step}/optimizer.pt")
    with pytest.raises(QLoRAError) as error:
        run_training(tiny_config(*FOUR_STEPS, "training.resume=auto"))
    message = str(error.value)
    assert message.startswith(f"training.resume=auto: no checkpoint in {run_dir / 'checkpoints'} can be resumed from "
                              f"(checkpoint-4: optimizer.pt is unreadable: RuntimeError: ")
    assert "; checkpoint-2: optimizer.pt is unreadable" in message and "\n" not in message
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no before-resume folder, nothing moved
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]


def test_resumes_that_fail_before_their_first_step_add_no_before_resume_folders(tiny_config, run_dir, monkeypatch):
    import qlora.pipeline

    def no_model(*args, **kwargs):
        raise QLoRAError("the model's disk is offline")

    longer = tiny_config(*FOUR_STEPS, "training.max_steps=6", "training.resume=auto")
    with monkeypatch.context() as failing:
        failing.setattr(qlora.pipeline, "load_quantized_model", no_model)
        for _ in range(3):  # a requeued job failing again and again
            with pytest.raises(QLoRAError, match="disk is offline"):
                run_training(longer)
    run_training(longer)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("before-resume")) == ["before-resume-4"]
    assert (run_dir / "before-resume-4/adapter").is_dir()  # the finished 4-step run's outputs, moved once
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4, 5, 6]


def files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def test_resuming_a_finished_run_trains_nothing_and_says_so(tiny_config, run_dir, caplog):
    caplog.set_level(logging.INFO)
    before = files(run_dir)
    summary = run_training(tiny_config(*FOUR_STEPS, "training.resume=auto"))
    assert (f"nothing to train: {run_dir / 'checkpoints/checkpoint-4'} is at step 4, the run's last; the run is "
            f"finished") in caplog.text
    assert files(run_dir) == before  # no step 5, no before-resume folder, the adapter untouched
    assert (summary.steps, summary.adapter_dir) == (4, str(run_dir / "adapter"))


def test_resuming_a_run_cut_short_after_its_last_checkpoint_only_finishes_its_end(tiny_config, run_dir,
                                                                                  four_step_run):
    for name in ("adapter", "summary.json", "report.md"):  # killed after the last checkpoint was saved
        shutil.rmtree(run_dir / name) if name == "adapter" else (run_dir / name).unlink()
    metrics = (run_dir / "metrics.jsonl").read_text()
    summary = run_training(tiny_config(*FOUR_STEPS, "training.resume=auto"))
    expected = load_file(four_step_run / "adapter/adapter_model.safetensors")
    restored = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert expected.keys() == restored.keys() and all((expected[k] == restored[k]).all() for k in expected)
    assert (run_dir / "adapter/tokenizer.json").is_file() and not (run_dir / "adapter/optimizer.pt").exists()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == summary.steps == 4 and saved["train_loss_last"] == losses(run_dir)[-1][1]
    assert (run_dir / "report.md").is_file() and (run_dir / "metrics.jsonl").read_text() == metrics
    assert not [p for p in run_dir.iterdir() if p.name.startswith("before-resume")]


@pytest.mark.parametrize("epochs, finished", [(1.0, True), (2.0, False)])
def test_a_run_counted_in_epochs_is_finished_at_its_checkpoints_planned_last_step(tiny_config, tmp_path, epochs,
                                                                                  finished):
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 7, "max_steps": 7}')
    (checkpoint / CONFIG_NAME).write_text("training: {max_steps: -1, epochs: 1.0}\n")
    config = tiny_config("training.max_steps=-1", f"training.epochs={epochs}")
    assert finished_at(checkpoint, config) == (7 if finished else None)  # more epochs: the trainer counts the steps


def test_resume_auto_exits_as_the_faq_says_when_finished_or_when_no_checkpoint_is_good(run_dir, tmp_path):
    resume = ("training.output_dir=run", "training.resume=auto", *FOUR_STEPS)
    finished = run_cli(*resume, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "nothing to train: " in finished.stdout and "the run is finished" in finished.stdout
    for step in (2, 4):
        truncate(run_dir / f"checkpoints/checkpoint-{step}/adapter_model.safetensors")
    refused = run_cli(*resume, cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("qlora: error: training.resume=auto: no checkpoint in ")


def test_a_checkpoint_saved_before_skipped_steps_were_kept_resumes_and_saves(tiny_config, run_dir):
    state_file = run_dir / "checkpoints/checkpoint-2/trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["NonFiniteGuard"]  # as an earlier qlora wrote it
    state_file.write_text(json.dumps(state))
    shutil.rmtree(run_dir / "checkpoints/checkpoint-4")
    summary = run_training(tiny_config(*FOUR_STEPS, "training.resume=auto"))
    assert (summary.steps, summary.skipped_steps) == (4, 0)
    assert (run_dir / "checkpoints/checkpoint-4/trainer_state.json").is_file()
