"""What a user sees of a short llama7b run on one GPU: start-up summary, progress lines, TensorBoard, report.md.

    python scripts/benchmarks/make_random_checkpoint.py llama2-7b /tmp/llama2-7b
    python scripts/benchmarks/report_smoke.py --model /tmp/llama2-7b        # on the GPU machine
    python scripts/benchmarks/report_smoke.py --tiny                        # the same checks on the CPU

Runs `python -m qlora.train` as a user types it (12 steps, a 32-row validation set, eval every 6 steps),
then checks the run folder and copies what a reader needs (stdout, stderr, report.md, report.png,
startup_summary.json, metrics.jsonl, a listing of tensorboard/) into $OUT (default ./report-smoke).
Exits non-zero when a check fails; the failed checks are in $OUT/checks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/llama2-7b", help="a checkpoint folder (make_random_checkpoint.py)")
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe on the CPU instead (correctness only)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "report-smoke"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="report-smoke-")) / "run"  # the adapter stays out of $OUT
    recipe = [] if args.tiny else ["+recipe=llama7b", f"model.name_or_path={args.model}"]
    command = [sys.executable, "-m", "qlora.train", *recipe, f"training.max_steps={args.steps}",
               "training.logging_steps=1", "data.val_size=32", f"training.eval_steps={args.steps // 2}",
               "eval.exact_match_samples=4", f"training.output_dir={run_dir}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    (out / "stdout.txt").write_text(result.stdout)
    (out / "stderr.txt").write_text(result.stderr)
    for name in ("report.md", "report.png", "startup_summary.json", "metrics.jsonl", "summary.json"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, out / name)
    events = sorted(p.name for p in (run_dir / "tensorboard").glob("events.out.tfevents.*"))
    startup = json.loads((run_dir / "startup_summary.json").read_text()) if (run_dir / "startup_summary.json").is_file() else {}
    checks = {
        "exit code 0": result.returncode == 0,
        "start-up summary printed": "effective batch" in result.stdout and "resume with" in result.stdout,
        "one progress line per step": sum(f"step {s}/{args.steps}  loss" in result.stdout for s in range(1, args.steps + 1)) == args.steps,
        "no transformers log dicts": "{'loss'" not in result.stdout + result.stderr,
        "tensorboard event file": bool(events),
        "memory after first step recorded": (startup.get("memory_after_first_step_gib") or 0) > 0,
        "report with eval loss and plot": (run_dir / "report.md").is_file()
        and "best eval loss" in (run_dir / "report.md").read_text() and (run_dir / "report.png").is_file(),
    }
    failed = [name for name, ok in checks.items() if not ok]
    (out / "checks.json").write_text(json.dumps({"command": command, "seconds": round(seconds, 1), "checks": checks,
                                                 "tensorboard_files": events}, indent=2) + "\n")
    print(json.dumps({"seconds": round(seconds, 1), "failed": failed}))
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
