"""Several GPUs through accelerate (issue 20): two measurements, one command each on a machine with 2 GPUs.

    python scripts/benchmarks/multi_gpu.py ddp                        # random Llama-2-7B, 2 x 2048 tokens per process
    python scripts/benchmarks/multi_gpu.py fsdp --gpu-memory 24GiB    # random CodeLlama-34B shape, 5 x 2048 per process
    python scripts/benchmarks/multi_gpu.py ddp --tiny                 # either one with the tiny model on the CPU
                                                                      # (2 gloo processes): checks the script only

ddp: (a) 1 process, batch b; (b) 1 process, batch 2b; (c) DDP, 2 processes x batch b (configs/accelerate/ddp.yaml).
The speed-up is (c)'s tokens/s over (a)'s, the same batch per process (target >= 1.85x); the first 20 losses of (c)
are compared with (b)'s, the same examples per step (target <= 1%). The data is natural text that a random model
cannot drive to ~0 in 20 steps: the repository's Markdown and Python files, cut into rows of --seq tokens.

fsdp: a model whose 4-bit weights plus training state exceed --gpu-memory on one GPU but not on two: (e) FSDP-QLoRA
(configs/accelerate/fsdp_qlora.yaml), 2 processes x batch b, each capped, with its per-process peak against the plan;
(f) its adapter loaded alone in one capped process (qlora.evaluate), whose loss on the validation rows must be the
sharded model's at the last step; (d) 1 process, batch 2b, capped: out of memory if the model indeed does not fit.
FSDP needs no more than the 4-bit weights of the whole model on one GPU (each process quantizes it before FSDP shards
it), and runs without qlora's fused LoRA, chunked MLPs and offloaded checkpoints: the architecture and batch are
chosen from the plan so that (d) exceeds the cap and (e) does not (`python -m qlora.plan` shows both).

Every process is capped with torch.cuda.set_per_process_memory_fraction (training_run.py's cap_gpu_memory) and
writes its own torch peak. Everything goes to $OUT (markdown + json), written again after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

from make_random_checkpoint import random_checkpoint
from training_run import cap_gpu_memory, memory_bytes

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "qlora" / "assets"
ACCELERATE = REPO / "configs" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
# what FSDP runs without (qlora/stages/adapters.py, offload.py): the plan of one of its processes leaves them out
FSDP_PERFORMANCE = ("performance.fused_lora=false", "performance.reuse_recomputed_weights=false",
                    "performance.mlp_chunk_tokens=0", "performance.offload_checkpoints=false",
                    "performance.torch_compile=false")
DEFAULTS = {"ddp": {"architecture": "llama2-7b", "batch": 2, "steps": 25},
            "fsdp": {"architecture": "codellama-34b", "batch": 5, "steps": 6}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2:])
    args = parse_arguments()
    out = Path(os.environ.get("OUT", "multi_gpu_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bench = Benchmark(args, out, work)
    bench.run_ddp() if args.measurement == "ddp" else bench.run_fsdp()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measurement", choices=["ddp", "fsdp"])
    parser.add_argument("--tiny", action="store_true", help="the shipped tiny model on the CPU (correctness only)")
    parser.add_argument("--architecture", help="make_random_checkpoint.py's architecture (default: per measurement)")
    parser.add_argument("--batch", type=int, help="b: the batch of each of the 2 processes")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--gpu-memory", type=memory_bytes, default=None,
                        help="cap every process at this much GPU memory (e.g. 24GiB)")
    parser.add_argument("--work-dir", default="/tmp/qlora-multi-gpu")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.measurement].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.seq = min(args.seq, 128)
    return args


class Benchmark:
    """The runs of one measurement; each adds its row to the report, rewritten after every run."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path):
        self.args, self.out, self.work = args, out, work
        self.model = str(ASSETS / "tiny-llama") if args.tiny else \
            str(random_checkpoint(args.architecture, work / args.architecture))
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if args.tiny:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # 2 gloo processes on the CPU
        self.rows = text_rows(work / "text.jsonl", 4 * args.batch * args.steps, args.seq, self.model)
        self.results: dict = {"measurement": args.measurement, "device": gpu_names(), "model": self.model,
                              "architecture": "tiny" if args.tiny else args.architecture, "seq": args.seq,
                              "batch_per_process": args.batch, "steps": args.steps,
                              "gpu_memory_cap_gib": args.gpu_memory / 2**30 if args.gpu_memory else None}

    def overrides(self, batch: int, *extra: str) -> list[str]:
        return train_overrides(self.args, self.model, self.rows, batch, *extra)

    def run_ddp(self) -> None:
        b = self.args.batch
        self.train("a", f"1 process, batch {b}", [sys.executable, *self.capped("qlora.train")], self.overrides(b))
        self.train("b", f"1 process, batch {2 * b}", [sys.executable, *self.capped("qlora.train")],
                   self.overrides(2 * b))
        ddp = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"] \
            if self.args.tiny else ["--config_file", str(ACCELERATE / "ddp.yaml"), "--num_processes", "2"]
        self.train("c", f"DDP, 2 processes x batch {b}", [*LAUNCH, *ddp, *self.capped("qlora.train")],
                   self.overrides(b))
        runs = self.results["runs"]
        self.results["speedup_c_over_a"] = runs["c"]["tokens_per_s"] / runs["a"]["tokens_per_s"]
        self.results["max_relative_loss_difference_c_b"] = max_relative_difference(runs["b"]["losses"],
                                                                                   runs["c"]["losses"])
        self.write()

    def run_fsdp(self) -> None:
        b = self.args.batch
        heldout = str(validation_rows(self.work / "validation.jsonl", multiple=2 * b))
        self.results["plan"] = plan(self.overrides(b), self.overrides(2 * b), processes=2)
        self.write()
        # the shipped config, 4-bit weights stored in the compute dtype; on the CPU without the settings that
        # broadcast from a GPU, through tests/fsdp_on_cpu.py
        fsdp = ["--config_file", str(ACCELERATE / "fsdp_qlora.yaml"), "--num_processes", "2"]
        fsdp += ["--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false",
                 str(REPO / "tests" / "fsdp_on_cpu.py")] if self.args.tiny else self.capped("qlora.train")
        storage = "float32" if self.args.tiny else "bfloat16"
        sharded = self.train("e", f"FSDP-QLoRA, 2 processes x batch {b}", [*LAUNCH, *fsdp], self.overrides(
            b, f"quantization.quant_storage={storage}", f"data.val_path={heldout}",
            f"training.eval_steps={self.args.steps}"))
        if sharded["returncode"] == 0:
            self.results["adapter_alone"] = self.evaluate_alone(self.work / "e", heldout, sharded)
            self.write()
        self.train("d", f"1 process, batch {2 * b}", [sys.executable, *self.capped("qlora.train")],
                   self.overrides(2 * b))

    def capped(self, module: str) -> list[str]:
        """`module` through this script's worker: the process's GPU memory capped, its torch peak written."""
        return [__file__, "worker", str(self.args.gpu_memory or 0), str(self.work / "peaks"), "-m", module]

    def train(self, key: str, label: str, launcher: list[str], overrides: list[str]) -> dict:
        """One training run (qlora's CLI); its exit code, losses, median tokens/s after warm-up and peaks."""
        run_dir = self.work / key
        peaks = self.work / "peaks"
        for old in peaks.glob("*.json"):
            old.unlink()
        start = time.perf_counter()
        result = run([*launcher, *overrides, f"training.output_dir={run_dir}"], self.env, self.out / f"{key}.log")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        steps = [row for row in rows if "loss" in row]
        warm = [row["tokens_per_s"] for row in steps[5:] if row.get("tokens_per_s")] or \
            [row["tokens_per_s"] for row in steps if row.get("tokens_per_s")]
        entry = {
            "label": label, "returncode": result.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "out_of_memory": "out of memory" in (result.stdout + result.stderr).lower(),
            "losses": [row["loss"] for row in steps],
            "eval_loss": next((row["eval_loss"] for row in reversed(rows) if "eval_loss" in row), None),
            "tokens_per_s": statistics.median(warm) if warm else float("nan"),
            "peak_gib_per_process": {p.stem: json.loads(p.read_text())["peak_gib"] for p in sorted(peaks.glob("*"))},
            "global_batch": next((line for line in result.stdout.splitlines() if "global batch" in line), None),
        }
        self.results.setdefault("runs", {})[key] = entry
        self.write()
        return entry

    def evaluate_alone(self, run_dir: Path, heldout: str, sharded: dict) -> dict:
        """The sharded run's adapter on the base in one process (peft's from_pretrained, in qlora.evaluate)."""
        result = run([sys.executable, *self.capped("qlora.evaluate"), f"run={run_dir}", f"data.path={heldout}",
                      "generation=false"], self.env, self.out / "f.log")
        report = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
        return {"returncode": result.returncode, "eval_loss": report.get("eval_loss"),
                "sharded_eval_loss": sharded["eval_loss"]}

    def write(self) -> None:
        (self.out / f"multi_gpu_{self.args.measurement}.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / f"multi_gpu_{self.args.measurement}.md").write_text(report(self.results))


def train_overrides(args: argparse.Namespace, model: str, rows: Path, batch: int, *extra: str) -> list[str]:
    """qlora.train's overrides for a run of this benchmark: the llama7b recipe (tiny: the tiny recipe) on `rows`."""
    return ["+recipe=" + ("tiny" if args.tiny else "llama7b"), f"model.name_or_path={model}", f"data.path={rows}",
            "data.format=text", f"data.max_length={args.seq}", "data.heldout_path=null", "eval.exact_match_samples=0",
            "lora.dropout=0.0",  # dropout masks differ between 1 and 2 processes; the comparison needs none
            "training.grad_accum=1", "training.logging_steps=1", "training.save_steps=0",
            f"training.max_steps={args.steps}", f"training.batch_size={batch}", "training.overwrite_output_dir=true",
            *extra]


def worker(argv: list[str]) -> None:
    """`worker CAP_BYTES PEAK_DIR -m MODULE ARGS`: run MODULE as `python -m` does, in a process whose GPU memory is
    capped at CAP_BYTES (0: not capped); its torch peak goes to PEAK_DIR/rank<N>.json, whatever the outcome."""
    import torch

    cap, peak_dir, module, module_args = int(argv[0]), Path(argv[1]), argv[3], argv[4:]
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the cap applies to the current device
        cap_gpu_memory(cap or None)
    sys.argv = [module, *module_args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        peak_dir.mkdir(parents=True, exist_ok=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        (peak_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_gib": peak}))


def plan(sharded_overrides: list[str], single_overrides: list[str], processes: int) -> dict:
    """The planner's training peaks (GiB): one GPU at the global batch, with qlora's switches; and one FSDP process,
    without the switches FSDP runs without, its weights and adapter state split over the processes (the one
    decoder layer FSDP gathers at a time is not counted)."""
    from qlora.compose import compose_config
    from qlora.plan import GiB, plan_memory

    one = plan_memory(compose_config(single_overrides))
    shard = plan_memory(compose_config([*sharded_overrides, *FSDP_PERFORMANCE]))
    split = (shard.weights + shard.lora_and_optimizer) * (processes - 1) / processes
    return {"one_gpu_training_peak_gib": one.training_peak / GiB, "one_gpu_load_peak_gib": one.load_peak / GiB,
            "fsdp_process_training_peak_gib": (shard.training_peak - split) / GiB,
            "fsdp_process_load_peak_gib": shard.load_peak / GiB}


def validation_rows(path: Path, multiple: int) -> Path:
    """The shipped sentiment held-out rows, as many as split evenly into batches of `multiple` (the 2 processes'
    batches): the sharded evaluation then averages the same rows as one process does, none repeated."""
    rows = (ASSETS / "sentiment" / "heldout.jsonl").read_text().splitlines()
    if multiple > len(rows):
        raise SystemExit(f"--batch up to {len(rows) // 2}: the validation rows are {len(rows)}")
    path.write_text("".join(row + "\n" for row in rows[:len(rows) // multiple * multiple]))
    return path


def text_rows(path: Path, rows: int, seq: int, model: str) -> Path:
    """`rows` rows of natural text of about `seq` tokens each: the repository's Markdown and Python files in a
    fixed order, cut apart, never repeated (a random model learns a repeated row by heart)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    files = sorted(p for pattern in ("*.md", "*.py") for p in REPO.rglob(pattern)
                   if not any(part.startswith(".") for part in p.relative_to(REPO).parts))
    ids = tokenizer("".join(p.read_text(errors="replace") for p in files))["input_ids"]
    if len(ids) < rows * seq:
        raise SystemExit(f"the repository's text makes {len(ids) // seq} rows of {seq} tokens; {rows} are needed: "
                         f"lower --steps or --batch")
    chunks = [tokenizer.decode(ids[i * seq:(i + 1) * seq]) for i in range(rows)]
    random.Random(0).shuffle(chunks)
    path.write_text("".join(json.dumps({"text": chunk}) + "\n" for chunk in chunks))
    return path


def max_relative_difference(reference: list[float], other: list[float], steps: int = 20) -> float:
    pairs = list(zip(reference, other))[:steps]
    return max(abs(a - b) / abs(a) for a, b in pairs) if pairs else float("nan")


def run(command: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    if result.returncode != 0:
        print(f"  exit code {result.returncode}; see {log}\n{result.stderr[-2000:]}", flush=True)
    return result


def gpu_names() -> list[str]:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.splitlines() or ["cpu"]
    except OSError:
        return ["cpu"]


def report(r: dict) -> str:
    cap = f"{r['gpu_memory_cap_gib']:.1f} GiB per process" if r["gpu_memory_cap_gib"] else "none"
    lines = [f"# Several GPUs: {r['measurement']} (issue 20)", "",
             f"- device: {', '.join(r['device'])}; model {r['architecture']} ({r['model']}); rows of {r['seq']} "
             f"tokens of natural text; b = {r['batch_per_process']}; {r['steps']} steps; GPU memory cap: {cap}"]
    if "speedup_c_over_a" in r:
        lines += [f"- speed-up (c)/(a): **{r['speedup_c_over_a']:.2f}x** (target >= 1.85x)",
                  f"- first 20 losses, (c) against (b): largest relative difference "
                  f"**{100 * r['max_relative_loss_difference_c_b']:.3f}%** (target <= 1%)"]
    if "plan" in r:
        p = r["plan"]
        lines += [f"- plan: one GPU at batch 2b {p['one_gpu_training_peak_gib']:.2f} GiB (load "
                  f"{p['one_gpu_load_peak_gib']:.2f}); one FSDP process at batch b "
                  f"{p['fsdp_process_training_peak_gib']:.2f} GiB (load {p['fsdp_process_load_peak_gib']:.2f})"]
    if "adapter_alone" in r:
        a = r["adapter_alone"]
        lines += [f"- (f) adapter of (e) alone in one process: exit {a['returncode']}, eval loss {a['eval_loss']} "
                  f"against the sharded model's {a['sharded_eval_loss']}"]
    lines += ["", "| run | exit | out of memory | tokens/s | torch peak GiB per process | first losses "
              "| global batch |", "|---|---|---|---|---|---|---|"]
    for key, run_result in sorted(r.get("runs", {}).items()):
        peaks = {rank: round(gib, 2) if gib is not None else None
                 for rank, gib in run_result["peak_gib_per_process"].items()}
        lines.append(f"| ({key}) {run_result['label']} | {run_result['returncode']} | {run_result['out_of_memory']} | "
                     f"{run_result['tokens_per_s']:.0f} | {peaks} | {[round(x, 4) for x in run_result['losses'][:5]]} "
                     f"| {run_result['global_batch']} |")
    runs = r.get("runs", {})
    if "b" in runs and "c" in runs:
        lines += ["", "| step | loss (b) | loss (c) | relative difference |", "|---|---|---|---|"]
        for step, (a, b) in enumerate(zip(runs["b"]["losses"][:20], runs["c"]["losses"][:20]), start=1):
            lines.append(f"| {step} | {a:.4f} | {b:.4f} | {100 * abs(a - b) / abs(a):.3f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
