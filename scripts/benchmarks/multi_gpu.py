"""Several GPUs through accelerate (issue 6): DDP speed-up and loss agreement, FSDP-QLoRA memory, in one call.

    python scripts/benchmarks/multi_gpu.py            # 2 GPUs, random Llama-2-7B, ~6 minutes
    python scripts/benchmarks/multi_gpu.py --tiny     # the same runs on the CPU (2 gloo processes), to check

(a) 1 process, batch 2b; (b) 2 processes DDP (configs/accelerate/ddp.yaml), batch b each: the same data in
the same order. Reports tokens/s (median logged step after warm-up) of both and their ratio, and the first
20 losses side by side with their largest relative difference. (c) FSDP-QLoRA on 2 GPUs
(configs/accelerate/fsdp_qlora.yaml) for a few steps: peak memory per GPU against (a) and (b), then the saved
adapter is loaded in a single process (`python -m qlora.generate`). Everything goes to $OUT (markdown + json).
All runs use qlora's own CLI with the llama7b recipe (tiny: the tiny recipe's model) on generated rows of
random words, every row cut to data.max_length tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from make_random_checkpoint import random_checkpoint

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "qlora" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the shipped tiny model on the CPU (correctness only)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2, help="b: per-process batch of the 2-process run")
    parser.add_argument("--fsdp-steps", type=int, default=5)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "multi_gpu_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/qlora-multi-gpu")
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    if args.tiny:
        model, max_length, recipe = str(ASSETS / "tiny-llama"), 128, "tiny"
        env["CUDA_VISIBLE_DEVICES"] = ""  # 2 gloo processes on the CPU
        ddp_launch = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
                                    "--dynamo_backend", "no"]
        fsdp_launch = None  # accelerate's FSDP refuses to run without a GPU
    else:
        model, max_length, recipe = "/tmp/llama2-7b", 2048, "llama7b"
        random_checkpoint("llama2-7b", Path(model))
        ddp_launch = ["--config_file", str(REPO / "configs/accelerate/ddp.yaml"), "--num_processes", "2"]
        fsdp_launch = ["--config_file", str(REPO / "configs/accelerate/fsdp_qlora.yaml"), "--num_processes", "2"]
    data = write_random_words(work / "random_words.jsonl", rows=4 * args.batch * args.steps, words=3 * max_length)
    common = [f"+recipe={recipe}", f"model.name_or_path={model}", f"data.path={data}", "data.format=text",
              f"data.max_length={max_length}", "data.heldout_path=null", "eval.exact_match_samples=0",
              "lora.dropout=0.0",  # dropout masks differ between 1 and 2 processes; the comparison needs none
              "training.grad_accum=1", "training.logging_steps=1", "training.save_steps=0",
              "training.overwrite_output_dir=true"]
    single_env = {**env, "CUDA_VISIBLE_DEVICES": "" if args.tiny else "0"}
    launch = [sys.executable, "-m", "accelerate.commands.launch"]

    results: dict = {"device": gpu_names(), "steps": args.steps, "batch_per_process": args.batch,
                     "max_length": max_length, "model": model}
    one = run_training([sys.executable, "-m", "qlora.train"], common + [
        f"training.batch_size={2 * args.batch}", f"training.max_steps={args.steps}"], single_env, work / "one", out)
    two = run_training([*launch, *ddp_launch, "-m", "qlora.train"], common + [
        f"training.batch_size={args.batch}", f"training.max_steps={args.steps}"], env, work / "ddp", out)
    results["single"], results["ddp"] = one, two
    results["speedup"] = two["tokens_per_s"] / one["tokens_per_s"]
    pairs = list(zip(one["losses"], two["losses"]))[:20]
    results["max_relative_loss_difference"] = max(abs(a - b) / abs(a) for a, b in pairs)

    if fsdp_launch is not None:
        fsdp = run_training([*launch, *fsdp_launch, "-m", "qlora.train"], common + [
            f"training.batch_size={args.batch}", f"training.max_steps={args.fsdp_steps}",
            "quantization.quant_storage=bfloat16"], env, work / "fsdp", out)
        results["fsdp"] = fsdp
        if fsdp["returncode"] == 0:
            results["fsdp_adapter_in_one_process"] = load_adapter_alone(work / "fsdp", single_env, out)
    (out / "multi_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "multi_gpu.md").write_text(report(results))
    print(report(results))


def write_random_words(path: Path, rows: int, words: int) -> Path:
    """Rows of random words from the shipped sentiment data (the tiny tokenizer knows them all), longer
    than data.max_length so that every row is cut to exactly max_length tokens."""
    vocabulary = sorted({w for line in (ASSETS / "sentiment/train.jsonl").read_text().splitlines()
                         for w in json.loads(line)["instruction"].split() if w.isalpha()})
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(vocabulary, k=words))}) + "\n"
                            for _ in range(rows)))
    return path


def run_training(launcher: list[str], overrides: list[str], env: dict, run_dir: Path, out: Path) -> dict:
    """One training run; its metrics, losses, median tokens/s after warm-up and peak memory per GPU."""
    name = run_dir.name
    memory = GpuMemory()
    start = time.perf_counter()
    with memory:
        result = run([*launcher, *overrides, f"training.output_dir={run_dir}"], env, out / name)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    steps = [row for row in rows if "loss" in row]
    warm = [row["tokens_per_s"] for row in steps[5:] if row.get("tokens_per_s")] or \
        [row["tokens_per_s"] for row in steps if row.get("tokens_per_s")]
    return {
        "returncode": result.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "losses": [row["loss"] for row in steps],
        "tokens_per_s": statistics.median(warm) if warm else float("nan"),
        "peak_memory_gib_main_process": max((row["peak_memory_gib"] for row in steps), default=None),
        "peak_memory_used_gib_per_gpu": memory.peaks_gib(),  # nvidia-smi: what the processes hold, cache included
        "global_batch_line": next((line for line in result.stdout.splitlines() if "global batch" in line), None),
    }


def load_adapter_alone(run_dir: Path, env: dict, out: Path) -> dict:
    """The FSDP run's adapter: its tensors, and base + adapter loaded and run in one process."""
    from safetensors.torch import load_file

    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    trained_b = sum(1 for name, t in tensors.items() if "lora_B" in name and t.abs().max() > 0)
    result = run([sys.executable, "-m", "qlora.generate", f"run={run_dir}", "prompt=good movie", "max_new_tokens=4",
                  "stream=false"], env, out / "fsdp-generate")
    return {"tensors": len(tensors), "lora_B_trained": trained_b, "generate_returncode": result.returncode}


def run(command: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    log.with_suffix(".log").write_text(f"$ {' '.join(command)}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    if result.returncode != 0:
        print(f"  exit code {result.returncode}; see {log.with_suffix('.log')}\n{result.stderr[-2000:]}", flush=True)
    return result


class GpuMemory:
    """Peak memory used per GPU while a run lasts, polled from nvidia-smi (nothing on the CPU)."""

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "GpuMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                lines = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True, timeout=10).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in lines:
                index, used = (int(x) for x in line.split(","))
                self.peaks[index] = max(self.peaks.get(index, 0.0), used / 1024)

    def peaks_gib(self) -> dict[int, float]:
        return {index: round(peak, 2) for index, peak in sorted(self.peaks.items())}


def gpu_names() -> list[str]:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.splitlines()
    except OSError:
        return ["cpu"]


def report(r: dict) -> str:
    one, two, fsdp = r["single"], r["ddp"], r.get("fsdp")
    lines = [
        "# Several GPUs: DDP and FSDP-QLoRA (issue 6)", "",
        f"- device: {', '.join(r['device'])}; model {r['model']}; {r['max_length']} tokens per row",
        f"- (a) 1 process, batch {2 * r['batch_per_process']}: {one['tokens_per_s']:.0f} tokens/s "
        f"(median after warm-up), exit {one['returncode']}, {one['global_batch_line']}",
        f"- (b) DDP, 2 processes, batch {r['batch_per_process']}: {two['tokens_per_s']:.0f} tokens/s, "
        f"exit {two['returncode']}, {two['global_batch_line']}",
        f"- speed-up (b)/(a): **{r['speedup']:.2f}x** (target >= 1.85x)",
        f"- first {min(20, len(one['losses']), len(two['losses']))} losses: largest relative difference "
        f"**{100 * r['max_relative_loss_difference']:.3f}%** (target <= 1%)",
        f"- (c) FSDP-QLoRA, 2 processes, batch {r['batch_per_process']}: " + (
            f"exit {fsdp['returncode']}, losses {[round(x, 4) for x in fsdp['losses']]}" if fsdp
            else "not run (accelerate's FSDP needs GPUs)"),
        "", "| run | peak GiB, main process (torch) | peak GiB per GPU (nvidia-smi) |", "|---|---|---|",
    ]
    runs = [("(a) 1 GPU, batch 2b", one), ("(b) DDP, batch b", two)] + ([("(c) FSDP, batch b", fsdp)] if fsdp else [])
    for label, run_result in runs:
        lines.append(f"| {label} | {run_result['peak_memory_gib_main_process']} | "
                     f"{run_result['peak_memory_used_gib_per_gpu']} |")
    if "fsdp_adapter_in_one_process" in r:
        lines += ["", f"- FSDP adapter loaded in one process: {r['fsdp_adapter_in_one_process']}"]
    lines += ["", "| step | loss (a) | loss (b) | relative difference |", "|---|---|---|---|"]
    for step, (a, b) in enumerate(zip(one["losses"][:20], two["losses"][:20]), start=1):
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {100 * abs(a - b) / abs(a):.3f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
