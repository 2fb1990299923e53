"""Side-by-side benchmark: the plain Hugging Face QLoRA recipe, unsloth's and qlora's.

    python scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2        # on a GPU
    python scripts/benchmark.py --model tiny --seq 64 --batch 2 --steps 4     # on the CPU (correctness only)
    python scripts/benchmark.py --model llama3-8b --max-context --gpu-memory 24GiB   # longest sequence at batch 1
    python scripts/benchmark.py --recipes unsloth,qlora,"qlora:performance.offload_checkpoints=false"
    python scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --recipes plain,qlora  # DPO

Every recipe trains the same randomly initialised checkpoint of a real architecture (built here, loaded
through each recipe's own quantized loading), on the same random token sequences, with the same seed, LoRA
settings and timing (scripts/benchmarks/training_run.py). Each recipe runs in its own subprocess so that its
memory peaks are its own; `--gpu-memory 24GiB` caps each of them there (torch's per-process memory fraction), so
that a 24 GB card is measured on a larger GPU. Printed (and written to --out as markdown + json): tokens/s (median
step after warm-up), the ratio to the plain recipe, peak GPU memory, load time and load peak, MFU and the share of
the physical limit, and the first losses of each.

The plain recipe is what users write by hand: NF4 + double quant with bf16 compute,
`prepare_model_for_kbit_training`, peft LoRA r=16/alpha=32/dropout 0.05 on all linear layers, gradient
checkpointing, paged 8-bit AdamW, TRL's SFTTrainer with SDPA attention and no packing. unsloth's is the one it
documents (scripts/benchmarks/unsloth_worker.py), run with its own packages (--unsloth-path; skipped with a note
where they are not installed). qlora's recipe is `+recipe=<--recipe>` with only the batch, the sequence length and
the step count set, so every default of the recipe (its performance switches included) is what gets measured;
`--override` adds overrides to it, and a recipe named `qlora:KEY=VALUE;KEY=VALUE` is qlora with those overrides
besides (a variant measured in the same call). `RECIPE@N` (e.g. `plain@1`) reseeds torch's generators with N just
before training: other dropout masks, the same LoRA initialisation, data and order, so that `plain,plain@1` shows how
far dropout alone moves the per-step losses (the floor for comparing two recipes' losses at dropout > 0).

`--method dpo` measures DPO instead, on pairs whose chosen and rejected sides are --seq tokens each (tokens/s counts
both): the plain recipe is TRL's documented DPOTrainer + peft one (the 4-bit model and a LoraConfig handed to
DPOTrainer, which wraps it and computes the reference with the adapter disabled), qlora's is `+recipe=llama7b_dpo`
(tiny_dpo for --model tiny). unsloth has no DPO mode here.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))

from make_random_checkpoint import random_checkpoint  # noqa: E402
from trace_gaps import load_events, render_gaps, step_gaps  # noqa: E402
from training_run import (ASSETS_DIR, SHARED_HYPERPARAMETERS, add_worker_arguments, cap_gpu_memory,  # noqa: E402
                          measure, split_seed, worker_command)

PLAIN, UNSLOTH, QLORA = "plain", "unsloth", "qlora"
BASELINE_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # CPUs have no fast bf16 4-bit path
UNSLOTH_WORKER = REPO_ROOT / "scripts" / "benchmarks" / "unsloth_worker.py"
WORKER_ERROR_LINES = 8  # of a failed worker's output, kept in its row of the report
PROBE_FIELDS = ("recipe", "seq", "peak_gib", "tokens_per_s", "error")  # what --max-context logs of each probe


def main() -> None:
    args = parse_args()
    if args.worker:
        cap_gpu_memory(args.gpu_memory)
        result = measure(args, plain_recipe if split_seed(args.worker)[0] == PLAIN else qlora_recipe,
                         "cuda" if torch.cuda.is_available() else "cpu")
        Path(args.result_file).write_text(json.dumps(result))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="qlora-benchmark-"))
    out.mkdir(parents=True, exist_ok=True)
    recipes, notes = available_recipes(args)
    checkpoint = build_checkpoint(args.model)
    if args.max_context and args.concurrent:  # each probe is a process of its own under the memory cap
        with concurrent.futures.ThreadPoolExecutor(len(recipes)) as pool:
            rows = list(pool.map(lambda recipe: longest_context(recipe, checkpoint, args, out), recipes))
        report = render_max_context(rows, args)
    elif args.max_context:
        rows = [longest_context(recipe, checkpoint, args, out) for recipe in recipes]
        report = render_max_context(rows, args)
    else:
        rows = [spawn_worker(recipe, checkpoint, args, out, args.batch, args.seq) for recipe in recipes]
        report = render_table(rows, args)
    report = "".join(f"{note}\n" for note in notes) + report
    for row in rows:
        if "memory_peak" in row:
            name = re.sub(r"[^\w.-]", "_", row["recipe"])
            (out / f"memory-peak-{name}.md").write_text(row.pop("memory_peak"))
    print(report)
    (out / "benchmark.md").write_text(report)
    (out / "benchmark.json").write_text(json.dumps({"args": vars(args), "notes": notes, "rows": rows}, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, llama2-7b or llama3-8b")
    add_worker_arguments(parser)
    parser.add_argument("--recipe", default=None, help="qlora recipe (default: llama7b, tiny for --model tiny)")
    parser.add_argument("--recipes", default=f"{PLAIN},{UNSLOTH},{QLORA}", type=lambda s: s.split(","),
                        help="which recipes, in order; qlora:KEY=VALUE;KEY=VALUE is a qlora variant; RECIPE@N "
                             "starts its training from seed N (other dropout masks, the same initialisation and data)")
    parser.add_argument("--override", action="append", default=[], help="extra qlora override (repeatable)")
    parser.add_argument("--unsloth-path", default=os.environ.get("QLORA_UNSLOTH_PATH", "/tmp/site_unsloth"),
                        help="the Python path that holds unsloth and the versions it pins")
    parser.add_argument("--max-context", action="store_true",
                        help="the longest sequence that trains at batch 1: from --seq up (or down) by steps that "
                             "double until a run fails (or trains), then bisect to --max-context-step")
    parser.add_argument("--max-context-start", default={}, type=starts,
                        help="RECIPE=TOKENS,...: where each recipe's search starts instead of --seq (e.g. near "
                             "a peak measured at a shorter length, extrapolated)")
    parser.add_argument("--max-context-limit", type=int, default=1 << 20)
    parser.add_argument("--max-context-step", type=int, default=4096)
    parser.add_argument("--concurrent", action="store_true",
                        help="with --max-context and --gpu-memory: search for every recipe at once on one GPU (each "
                             "probe capped; the lengths are what counts, the tokens/s are then not comparable)")
    parser.add_argument("--profile", action="store_true", help="write a torch profiler table of one step")
    parser.add_argument("--host-profile", action="store_true",
                        help="write where the host's (Python's) time goes in the last steps (cProfile)")
    parser.add_argument("--out", default=None, help="folder for benchmark.md/json (default: a temp folder)")
    args = parser.parse_args()
    name = re.sub(r"[^\w.-]", "_", args.worker or "")  # a variant's overrides in a file name
    profile = Path(args.out or ".") / f"profile-{name}-{args.batch}x{args.seq}.txt"
    args.train = (lambda trainer: profile_one_step(trainer, profile)) if args.profile else None
    args.extra_callbacks = [HostProfile(args.steps, Path(args.out) / f"host-profile-{name}.txt")] \
        if args.host_profile and args.worker else []
    return args


def starts(text: str) -> dict[str, int]:
    """'unsloth=98304,qlora=147456' -> {'unsloth': 98304, 'qlora': 147456}."""
    try:
        return {recipe: int(seq) for recipe, _, seq in (item.partition("=") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give RECIPE=TOKENS,RECIPE=TOKENS, e.g. unsloth=98304,qlora=147456")


def available_recipes(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The recipes asked for that can run here, and a note for each that cannot."""
    recipes, notes = [], []
    for recipe in args.recipes:
        unsloth = split_seed(recipe)[0] == UNSLOTH
        if unsloth and args.method == "dpo":
            notes.append(f"{recipe}: not run, this benchmark has no DPO mode for it")
        elif unsloth and not unsloth_installed(args.unsloth_path):
            notes.append(f"{recipe}: not run, it is not installed in --unsloth-path={args.unsloth_path} "
                         f"(../shared/device/README.md says how)")
        elif unsloth and not torch.cuda.is_available():
            notes.append(f"{recipe}: not run, it needs a GPU")
        else:
            recipes.append(recipe)
    return recipes, notes


def unsloth_installed(path: str) -> bool:
    probe = "import importlib.util as u; print(u.find_spec('unsloth') is not None)"
    found = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": path},
                           capture_output=True, text=True)
    return found.stdout.strip() == "True"


def build_checkpoint(model: str) -> Path:
    return ASSETS_DIR / "tiny-llama" if model == "tiny" else random_checkpoint(model)


def spawn_worker(recipe: str, checkpoint: Path, args: argparse.Namespace, out: Path, batch: int, seq: int) -> dict:
    result_file = Path(tempfile.mkdtemp(prefix="qlora-benchmark-worker-")) / "result.json"
    name, seed = split_seed(recipe)
    worker_args = worker_command(args, checkpoint, result_file, batch, seq) + \
        ([f"--train-seed={seed}"] if seed is not None else [])
    if name == UNSLOTH:  # its own packages only, and unsloth imported before transformers
        command = [sys.executable, str(UNSLOTH_WORKER), *worker_args, "--worker", recipe]
        env = {**os.environ, "PYTHONPATH": args.unsloth_path, "HF_HUB_OFFLINE": "1"}
    else:
        command = [sys.executable, __file__, "--worker", recipe, *worker_args, "--model", args.model, "--out", str(out)]
        command += ["--recipe", args.recipe] if args.recipe else []
        command += [f"--override={o}" for o in args.override] + (["--profile"] if args.profile else [])
        command += ["--host-profile"] if args.host_profile else []
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath}
    print(f"== {recipe}: batch {batch} x {seq} tokens", flush=True)
    returncode, last_lines = run_echoing(command, env, prefix=f"[{recipe} {seq}] " if args.concurrent else "")
    if result_file.exists():
        return json.loads(result_file.read_text())
    return {"recipe": recipe, "batch": batch, "seq": seq,
            "error": f"worker exited with {returncode}: " + " | ".join(last_lines)}


def run_echoing(command: list[str], env: dict, prefix: str = "") -> tuple[int, list[str]]:
    """Run a worker with its output passed through, keeping its last lines: a worker that dies says why in the
    report, not only in a console that a device call may have cut."""
    process = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    last = collections.deque(maxlen=WORKER_ERROR_LINES)
    for line in process.stdout:
        sys.stdout.write(prefix + line)
        if line.strip():
            last.append(line.strip()[:300])
    return process.wait(), list(last)


def longest_context(recipe: str, checkpoint: Path, args: argparse.Namespace, out: Path) -> dict:
    """The longest sequence that trains at batch 1, to --max-context-step tokens: from the recipe's start
    (--max-context-start, else --seq), up by a step that doubles each time (1, 2, 4, ... x --max-context-step) while
    runs train, or down the same way while they fail, then bisecting between the longest that trained and the
    shortest that failed. Probes stay near a start near the answer: at 100k tokens and more each takes minutes."""
    step = args.max_context_step
    start = args.max_context_start.get(recipe, args.seq)

    def probe(seq: int) -> dict:
        row = spawn_worker(recipe, checkpoint, args, out, 1, seq)
        if out is not None:  # each probe as it ends: a search cut short by a time limit still says what it found
            with open(out / "max-context-probes.jsonl", "a") as probes:
                probes.write(json.dumps({key: row.get(key) for key in PROBE_FIELDS}) + "\n")
        return row

    first = probe(start)
    fitted, failed = (None, first) if "error" in first else (first, None)
    jump = step
    while not (fitted and failed):
        seq = start + jump if failed is None else start - jump
        if seq > args.max_context_limit or seq < step:
            break
        row = probe(seq)
        if "error" in row:
            failed = row
        else:
            fitted = row
        jump *= 2
    while fitted and failed and failed["seq"] - fitted["seq"] > step:
        middle = fitted["seq"] + (failed["seq"] - fitted["seq"]) // 2 // step * step
        row = probe(middle)
        fitted, failed = (fitted, row) if "error" in row else (row, failed)
    return {"recipe": recipe, "longest_seq": fitted["seq"] if fitted else None, "longest": fitted, "failed": failed}


# --- one recipe, in its own process -------------------------------------------------------------------------


def plain_recipe(args: argparse.Namespace, device: str):
    """The recipe users write by hand, straight from the transformers/peft/TRL documentation."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    dtype = BASELINE_DTYPE[device]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, quantization_config=bnb, dtype=dtype,
                                                 attn_implementation="sdpa", device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    shared = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                  max_steps=args.steps, **SHARED_HYPERPARAMETERS, gradient_checkpointing=True,
                  optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch", bf16=dtype == torch.bfloat16,
                  max_length=args.seq, logging_steps=args.steps, save_strategy="no", report_to="none", seed=0,
                  data_seed=0)
    if args.method == "dpo":  # DPOTrainer wraps the model in peft itself (seeded) and disables the adapter for
        # the reference, as TRL documents for QLoRA
        return (lambda dataset: DPOTrainer(model=model, args=DPOConfig(**shared), train_dataset=dataset,
                                           processing_class=tokenizer, peft_config=lora)), model
    set_seed(0)
    model = get_peft_model(model, lora)

    def build_trainer(dataset):
        return SFTTrainer(model=model, args=SFTConfig(**shared, packing=False), train_dataset=dataset,
                          processing_class=tokenizer)

    return build_trainer, model


def qlora_recipe(args: argparse.Namespace, device: str):
    """qlora's own stages, in the pipeline's order, from the composed recipe."""
    from transformers import set_seed

    from qlora.compose import compose_config
    from qlora.stages.allocator import expand_segments
    from qlora.stages.adapters import attach_training_adapters
    from qlora.stages.faults import step_callbacks
    from qlora.stages.model import (fit_embeddings_to_tokenizer, frozen_weights_dtype, load_quantized_model,
                                    load_tokenizer, prepare_for_kbit_training)
    from qlora.stages.trainer import build_trainer as build_qlora_trainer
    from qlora.stages.trainer import check_performance_support

    run_dir = Path(tempfile.mkdtemp())
    recipe = args.recipe or ("tiny" if args.model == "tiny" else "llama7b") + ("_dpo" if args.method == "dpo" else "")
    config = compose_config([
        f"+recipe={recipe}", f"model.name_or_path={args.checkpoint}", f"training.output_dir={run_dir}",
        f"training.batch_size={args.batch}", "training.grad_accum=1", f"training.max_steps={args.steps}",
        f"training.logging_steps={args.steps}", "training.save_steps=0", "training.seed=0",
        f"data.max_length={args.seq}",
        f"lora.dropout={args.lora_dropout}", "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear",
        f"training.lr={SHARED_HYPERPARAMETERS['learning_rate']}",
        f"training.scheduler={SHARED_HYPERPARAMETERS['lr_scheduler_type']}",
        f"training.warmup_ratio={SHARED_HYPERPARAMETERS['warmup_steps']}",
        f"training.max_grad_norm={SHARED_HYPERPARAMETERS['max_grad_norm']}", f"training.method={args.method}",
        *([] if device == "cuda" else ["training.optim=adamw_torch"]), *args.override,
        *variant_overrides(split_seed(args.worker)[0]),
    ])
    check_performance_support(config.performance, torch.device(device))
    expand_segments(config.performance.expandable_segments)  # as run_training does (CUDA has started: the cap)
    tokenizer = load_tokenizer(config.model)
    model = load_quantized_model(config.model, config.quantization, torch.device(device))
    fit_embeddings_to_tokenizer(model, tokenizer)
    model = prepare_for_kbit_training(model, config.training.gradient_checkpointing,
                                      frozen_weights_dtype(config.performance, config.quantization))
    set_seed(0)  # the same LoRA initialisation as the plain recipe
    model = attach_training_adapters(model, config)
    callbacks = list(step_callbacks(config, run_dir))  # every run's, as in qlora.pipeline
    return (lambda dataset: build_qlora_trainer(config, model, tokenizer, dataset, run_dir, callbacks=callbacks)), model


def variant_overrides(recipe: str) -> list[str]:
    """qlora:KEY=VALUE;KEY=VALUE -> [KEY=VALUE, KEY=VALUE]; plain qlora -> []."""
    return [o for o in recipe.partition(":")[2].split(";") if o]


class HostProfile(TrainerCallback):
    """cProfile over the last three steps: the Python functions the host spends its time in (the GPU profiler
    shows where the GPU waits, not what the host was doing meanwhile)."""

    def __init__(self, steps: int, path: Path):
        import cProfile

        self.first, self.path, self.profiler = max(steps - 2, 1), path, cProfile.Profile()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            self.profiler.enable()

    def on_train_end(self, *_, **__):
        import io
        import pstats

        self.profiler.disable()
        text = io.StringIO()
        pstats.Stats(self.profiler, stream=text).sort_stats("cumulative").print_stats(80)
        self.path.write_text(text.getvalue())


def profile_one_step(trainer, path: Path) -> None:
    """Train, profiling the last step: the table of the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile, schedule

    steps = trainer.args.max_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, schedule=schedule(wait=steps - 2, warmup=1, active=1))

    class _Step(TrainerCallback):
        def on_step_end(self, *_, **__):
            profiler.step()

    trainer.add_callback(_Step())
    with profiler:
        trainer.train()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    path.write_text(profiler.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90))
    # the timeline (chrome://tracing, perfetto): where the GPU waits for the CPU
    trace = path.with_suffix(".trace.json")
    profiler.export_chrome_trace(str(trace))
    if torch.cuda.is_available():  # where the GPU waited for the host, from the trace
        path.with_suffix(".gaps.txt").write_text(render_gaps(step_gaps(load_events(trace))))
    with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()


# dense bf16 TFLOP/s from the vendors' datasheets (SXM parts)
SPEC_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def spec_bf16_tflops(device_name: str) -> float:
    return next((v for k, v in SPEC_BF16_TFLOPS.items() if k in device_name), float("nan"))


def peak_bf16_tflops() -> float:
    """Measured dense bf16 matmul throughput of this GPU: the ceiling for MFU."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 20
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * runs / (time.perf_counter() - start) / 1e12


# --- the report ---------------------------------------------------------------------------------------------


def render_table(rows: list[dict], args: argparse.Namespace) -> str:
    tflops = peak_bf16_tflops()
    plain, unsloth = (next((r for r in rows if r["recipe"] == name and "error" not in r), None)
                      for name in (PLAIN, UNSLOTH))
    lines = [
        f"model {args.model} (random init), {describe_batch(args)}, LoRA dropout {args.lora_dropout}, "
        f"{args.steps} steps, median over steps {args.warmup + 1}..{args.steps}; measured bf16 matmul peak "
        f"{tflops:.0f} TFLOP/s{memory_cap(args)}",
        "MFU: against the GPU's dense bf16 specification; of limit: against the measured matmul peak, i.e. the "
        "share of the physical limit (tokens/s at 100% of that peak, for the FLOPs per token with recomputation)",
        "",
        "| recipe | tokens/s | vs plain | vs unsloth | peak GiB | load s | load peak GiB | footprint GiB | MFU "
        "| of limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['error']} ||||||||| ")
            continue
        achieved = r["tokens_per_s"] * r["flops_per_token"] / 1e12  # TFLOP/s
        mfu = achieved / spec_bf16_tflops(r["device"])
        lines.append(
            f"| {r['recipe']} | {r['tokens_per_s']:,.0f} | {_ratio(r, plain)} | {_ratio(r, unsloth)} | "
            f"{r['peak_gib']:.2f} | {r['load_s']:.1f} | {r['load_peak_gib']:.2f} | {r['footprint_gib']:.2f} | "
            f"{mfu:.1%} | {achieved / tflops:.1%} |"
        )
    lines += ["", "trained weights: " + "; ".join(f"{r['recipe']} {'/'.join(r['trained_dtypes'])}" for r in rows
                                                 if "trained_dtypes" in r), "", "first losses:"]
    for r in rows:
        if "losses" in r:
            lines.append(f"  {r['recipe']:>6}: " + " ".join(f"{x:.4f}" for x in r["losses"][:8]))
    for reference in (plain, unsloth):
        for r in rows:
            if reference and r is not reference and "losses" in r:
                n = min(len(r["losses"]), len(reference["losses"]))
                worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], reference["losses"][:n]))
                lines.append(f"  {r['recipe']}: largest relative loss difference to {reference['recipe']} over "
                             f"{n} steps: {worst:.2%}")
    return "\n".join(lines) + "\n"


def describe_batch(args: argparse.Namespace) -> str:
    if args.method == "dpo":
        return f"DPO, batch {args.batch} pairs of 2 x {args.seq} tokens (tokens/s counts both sides)"
    return f"batch {args.batch} x {args.seq} tokens"


def _ratio(row: dict, reference: dict | None) -> str:
    return f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"


def memory_cap(args: argparse.Namespace) -> str:
    return f"; each process capped at {args.gpu_memory / 2**30:.1f} GiB of GPU memory" if args.gpu_memory else ""


def render_max_context(rows: list[dict], args: argparse.Namespace) -> str:
    start = ", ".join(f"{recipe} {seq}" for recipe, seq in args.max_context_start.items()) or str(args.seq)
    lines = [f"model {args.model}: longest sequence that trains at batch 1 (from {start} by doubling steps, then "
             f"bisecting to {args.max_context_step} tokens; {args.steps} steps each){memory_cap(args)}"
             + ("; the recipes' searches ran at once on one GPU: their tokens/s are not comparable" if args.concurrent
                else ""), "",
             "| recipe | longest seq | peak GiB there | tokens/s there | shortest that failed |",
             "|---|---|---|---|---|"]
    for r in rows:
        longest = r["longest"] or {}
        failed = r["failed"] or {}
        lines.append(f"| {r['recipe']} | {r['longest_seq']} | {longest.get('peak_gib', float('nan')):.2f} | "
                     f"{longest.get('tokens_per_s', float('nan')):,.0f} | "
                     f"{failed.get('seq', '-')}: {failed.get('error', '-')[:80]} |")
    for reference in (PLAIN, UNSLOTH):
        base = next((r for r in rows if r["recipe"] == reference), None)
        for r in rows:
            if base and r is not base and r["longest_seq"] and base["longest_seq"]:
                lines.append(f"\n{r['recipe']}: {r['longest_seq'] / base['longest_seq']:.2f}x {reference}'s context")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
