"""One training process per run folder, released by the OS when the holder dies."""

import subprocess
import sys
from pathlib import Path

from conftest import run_cli
from qlora.pipeline import run_training
from qlora.stages.run_lock import LOCK_NAME

# another process that has the run folder, as a live run does, until it is killed
HOLDER = """
import sys, time
from pathlib import Path
from qlora.stages.run_lock import RunDirLock
lock = RunDirLock(Path(sys.argv[1]))
lock.acquire()
print("holding", flush=True)
time.sleep(600)
"""
SHORT = ("training.max_steps=1", "training.batch_size=4", "eval.exact_match_samples=0")


def test_a_second_process_is_refused_naming_the_holder_until_the_holder_dies(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # the live run's files
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        refused = run_cli(*SHORT, "training.output_dir=run", "training.resume=auto", cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(f"qlora: error: training.output_dir=run is in use by another qlora process "
                                         f"(PID {holder.pid})")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "metrics.jsonl"]  # nothing moved or written
    finally:
        holder.kill()
        holder.wait()
    summary = run_training(tiny_config(*SHORT, "training.resume=auto"))  # the OS released the killed holder's lock
    assert (Path(summary.adapter_dir) / "adapter_model.safetensors").is_file()
    assert (run_dir / "before-resume-0/metrics.jsonl").is_file()
