"""The memory planner against measurements: footprint, load peak and its bound, training peak.

    python scripts/benchmarks/plan_accuracy.py            # GPU: random Llama-2-7B and Llama-3-8B, ~4 minutes
    python scripts/benchmarks/plan_accuracy.py --tiny     # CPU: the shipped tiny model saved in 4 shards

For each architecture the checkpoint is built (scripts/benchmarks/make_random_checkpoint.py); each
(batch, sequence length) then runs in a process of its own, as a user's run does: the model is loaded through
qlora's stages (load_quantized_model, prepare_for_kbit_training, attach_lora) and trained for a few steps with
build_trainer on random tokens; peak statistics are reset after loading. On the GPU memory is
torch.cuda.max_memory_allocated; with --tiny it is the growth of the process's anonymous resident memory
(RssAnon; sampled every 0.2 ms), which also holds Python's own allocations, so only the load bound
is checked there. Writes $OUT/plan_accuracy.md (a table) and $OUT/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM

from make_random_checkpoint import random_checkpoint
from training_run import cap_gpu_memory, memory_bytes
from qlora.config import ASSETS_DIR
from qlora.compose import compose_config
from qlora.plan import GiB, plan_memory
from qlora.stages.adapters import attach_training_adapters
from qlora.stages.model import frozen_weights_dtype, load_quantized_model, load_tokenizer, prepare_for_kbit_training
from qlora.stages.trainer import build_trainer

GPU_CASES = {"llama2-7b": [(1, 1024), (4, 1024), (1, 2048), (4, 2048)],
             "llama3-8b": [(1, 1024), (4, 1024), (1, 2048), (4, 2048)]}
TINY_CASES = {"tiny": [(4, 64), (16, 128)]}
STEPS = 3


class PeakMemory:
    """Peak bytes since reset: torch's allocator on a GPU, RssAnon of this process on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self.base, self._stop = cuda, 0, 0, threading.Event()
        if not cuda:
            threading.Thread(target=self._sample, daemon=True).start()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss_anon()

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _rss_anon()

    def max(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.peak

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.0002)  # loading's peaks last a few milliseconds


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def build_checkpoint(name: str, folder: Path) -> None:
    if name == "tiny":  # the shipped model saved in several shards, as the big ones are
        model = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "tiny-llama", dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="200KB")
        load_tokenizer_folder = ASSETS_DIR / "tiny-llama"
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (folder / file).write_bytes((load_tokenizer_folder / file).read_bytes())
        return
    random_checkpoint(name, folder)


def measure(name: str, cases: list[tuple[int, int]], scratch: Path, tiny: bool, overrides: list[str],
            gpu_memory: int | None = None) -> list[dict]:
    """Build the checkpoint once, then measure each case in a process of its own, as a user's run is."""
    folder = scratch / name
    build_checkpoint(name, folder)
    rows = []
    for batch, seq in cases:
        result = scratch / f"case-{name}-{batch}-{seq}.json"
        command = [sys.executable, __file__, "--case", f"{name},{batch},{seq}", "--checkpoint", str(folder),
                   "--result-file", str(result), *(["--tiny"] if tiny else []), *[f"--override={o}" for o in overrides],
                   *([f"--gpu-memory={gpu_memory}B"] if gpu_memory else [])]
        done = subprocess.run(command)
        if not result.exists():
            raise SystemExit(f"case {name} {batch} x {seq} failed (exit {done.returncode})")
        rows.append(json.loads(result.read_text()))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan"}), flush=True)
    return rows


def measure_case(name: str, batch: int, seq: int, folder: Path, tiny: bool, overrides: list[str]) -> dict:
    """One case in this process: load, prepare and train a few steps, with the peaks of each part."""
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    recipe = ["+recipe=tiny"] if tiny else ["+recipe=llama7b"]
    run_dir = folder.parent / f"run-{name}-{batch}-{seq}"
    case = compose_config([*recipe, f"model.name_or_path={folder}", "model.dtype=bfloat16",
                           "eval.exact_match_samples=0",
                           f"training.max_steps={STEPS}", "training.save_steps=0", "training.logging_steps=1",
                           "training.warmup_ratio=0", *overrides, f"training.batch_size={batch}",
                           f"data.max_length={seq}", f"training.output_dir={run_dir}"])
    plan = plan_memory(case)
    memory = PeakMemory(cuda)
    model, tokenizer, load_peak, after_load, footprint = load(case, device, memory)
    ids = torch.randint(3, 500, (batch * (STEPS + 1), seq), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(case, model, tokenizer, data, run_dir)
    memory.reset()
    start = time.perf_counter()
    trainer.train()
    peak = memory.max() - (0 if cuda else memory.base)
    return {
        "architecture": name, "overrides": " ".join(overrides), "batch_size": batch, "seq_len": seq,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "footprint_planned": plan.footprint, "footprint_get_memory_footprint": footprint,
        "footprint_allocated": after_load,
        "load_peak_planned": plan.load_peak, "load_peak_measured": load_peak, "load_bound": plan.load_bound,
        "training_peak_planned": plan.training_peak, "training_peak_measured": peak,
        "paged_optimizer_planned": plan.paged_optimizer, "train_seconds": round(time.perf_counter() - start, 1),
        "plan": {k: v for k, v in asdict(plan).items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }


def load(config, device: torch.device, memory: "PeakMemory"):
    """Load and prepare the model, measuring the load peak and what stays allocated."""
    memory.reset()
    before = memory.current()
    model = load_quantized_model(config.model, config.quantization, device)
    load_peak, after_load = memory.max() - before, memory.current() - before
    footprint = model.get_memory_footprint()
    tokenizer = load_tokenizer(config.model)
    dtype = frozen_weights_dtype(config.performance, config.quantization)
    model = prepare_for_kbit_training(model, config.training.gradient_checkpointing, dtype)
    model = attach_training_adapters(model, config)
    return model, tokenizer, load_peak, after_load, footprint


def render(rows: list[dict]) -> str:
    def gib(value):
        return "-" if value is None else f"{value / GiB:.3f}"

    def error(planned, measured):
        return f"{100 * (planned - measured) / measured:+.1f}%" if measured else "-"

    lines = [f"overrides: {rows[0]['overrides'] or '(none: the recipe defaults)'}" if rows else "", "",
             "| model | batch | seq | footprint planned | measured (allocated) | get_memory_footprint | error |"
             " load peak planned | measured | bound | within bound | training peak planned | measured | error |",
             "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {r['batch_size']} | {r['seq_len']} | {gib(r['footprint_planned'])} | "
            f"{gib(r['footprint_allocated'])} | {gib(r['footprint_get_memory_footprint'])} | "
            f"{error(r['footprint_planned'], r['footprint_allocated'])} | {gib(r['load_peak_planned'])} | "
            f"{gib(r['load_peak_measured'])} | {gib(r['load_bound'])} | "
            f"{'-' if r['load_bound'] is None else r['load_peak_measured'] <= r['load_bound']} | "
            f"{gib(r['training_peak_planned'])} | {gib(r['training_peak_measured'])} | "
            f"{error(r['training_peak_planned'], r['training_peak_measured'])} |")
    note = "GiB. Paged optimizer states live outside torch's allocator and are in neither column."
    return "\n".join(lines) + f"\n\n{note}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the shipped tiny model on the CPU (a correctness check)")
    parser.add_argument("--override", action="append", default=[], help="a qlora override for every case")
    parser.add_argument("--models", default=None, help="comma-separated subset of the architectures")
    parser.add_argument("--cases", default=None,
                        help="other cases than the table's, e.g. llama2-7b:2x1536,llama3-8b:3x1024 (batch x sequence)")
    parser.add_argument("--gpu-memory", type=memory_bytes, default=None,
                        help="cap each case's process at this much GPU memory, e.g. 24GiB (a smaller card)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # ARCH,BATCH,SEQ: one case, in this process
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.case:
        cap_gpu_memory(args.gpu_memory)
        name, batch, seq = args.case.split(",")
        row = measure_case(name, int(batch), int(seq), Path(args.checkpoint), args.tiny, args.override)
        Path(args.result_file).write_text(json.dumps(row))
        return
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    table = TINY_CASES if args.tiny else GPU_CASES
    if args.cases:
        table = {}
        for case in args.cases.split(","):
            name, shape = case.split(":")
            table.setdefault(name, []).append(tuple(int(n) for n in shape.split("x")))
    with tempfile.TemporaryDirectory() as scratch:
        for name, cases in table.items():
            if args.models is None or name in args.models.split(","):
                rows += measure(name, cases, Path(scratch), args.tiny, args.override, args.gpu_memory)
    (out / "plan_accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    cap = f"each case capped at {args.gpu_memory / GiB:.1f} GiB of GPU memory\n" if args.gpu_memory else ""
    (out / "plan_accuracy.md").write_text(cap + render(rows))
    print(cap + render(rows))


if __name__ == "__main__":
    main()
