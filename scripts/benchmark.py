"""Side-by-side benchmark: the plain Hugging Face QLoRA recipe against qlora's recipe.

    python scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2        # on a GPU
    python scripts/benchmark.py --model tiny --seq 64 --batch 2 --steps 4     # on the CPU (correctness only)
    python scripts/benchmark.py --model llama3-8b --max-context               # longest sequence at batch 1

Both recipes train the same randomly initialised checkpoint of a real architecture (built here, loaded
through the normal quantized path), on the same random token sequences, with the same seed. Each recipe
runs in its own subprocess so that its memory peaks are its own. Printed (and written to --out as
markdown + json): tokens/s (median step after warm-up), the ratio to the plain recipe, peak GPU memory,
load time and load peak, MFU and the share of the physical limit, and the first losses of both.

The plain recipe is what users write by hand: NF4 + double quant with bf16 compute,
`prepare_model_for_kbit_training`, peft LoRA r=16/alpha=32/dropout 0.05 on all linear layers, gradient
checkpointing, paged 8-bit AdamW, TRL's SFTTrainer with SDPA attention and no packing. qlora's recipe is
`+recipe=<--recipe>` with only the batch, the sequence length and the step count set, so every default
of the recipe (its performance switches included) is what gets measured; `--override` adds overrides.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
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
from qlora.config import ASSETS_DIR  # noqa: E402

PLAIN = "plain"
QLORA = "qlora"
# the QLoRA paper's values (and qlora's defaults), set in both recipes so that their losses compare
SHARED_HYPERPARAMETERS = dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3)
BASELINE_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # CPUs have no fast bf16 4-bit path


def main() -> None:
    args = parse_args()
    if args.worker:
        result = run_worker(args)
        Path(args.result_file).write_text(json.dumps(result))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="qlora-benchmark-"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.model)
    if args.max_context:
        rows = [longest_context(recipe, checkpoint, args, out) for recipe in args.recipes]
        report = render_max_context(rows, args)
    else:
        rows = [spawn_worker(recipe, checkpoint, args, out, args.batch, args.seq) for recipe in args.recipes]
        report = render_table(rows, args)
    print(report)
    (out / "benchmark.md").write_text(report)
    (out / "benchmark.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, llama2-7b or llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="training steps per recipe")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--recipe", default=None, help="qlora recipe (default: llama7b, tiny for --model tiny)")
    parser.add_argument("--recipes", default=f"{PLAIN},{QLORA}", type=lambda s: s.split(","))
    parser.add_argument("--override", action="append", default=[], help="extra qlora override (repeatable)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="both recipes' LoRA dropout")
    parser.add_argument("--data", default="random", choices=["random", "sentiment"],
                        help="random token sequences of --seq tokens, or the shipped sentiment rows (structured)")
    parser.add_argument("--max-context", action="store_true", help="double the sequence at batch 1 until OOM")
    parser.add_argument("--max-context-limit", type=int, default=1 << 20)
    parser.add_argument("--profile", action="store_true", help="write a torch profiler table of one step")
    parser.add_argument("--host-profile", action="store_true",
                        help="write where the host's (Python's) time goes in the last steps (cProfile)")
    parser.add_argument("--out", default=None, help="folder for benchmark.md/json (default: a temp folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def build_checkpoint(model: str) -> Path:
    return ASSETS_DIR / "tiny-llama" if model == "tiny" else random_checkpoint(model)


def spawn_worker(recipe: str, checkpoint: Path, args: argparse.Namespace, out: Path, batch: int, seq: int) -> dict:
    result_file = Path(tempfile.mkdtemp(prefix="qlora-benchmark-worker-")) / "result.json"
    command = [sys.executable, __file__, "--worker", recipe, "--checkpoint", str(checkpoint),
               "--result-file", str(result_file), "--model", args.model, "--seq", str(seq), "--batch", str(batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-dropout", str(args.lora_dropout),
               "--data", args.data, "--out", str(out)]
    command += ["--recipe", args.recipe] if args.recipe else []
    command += [f"--override={o}" for o in args.override] + (["--profile"] if args.profile else [])
    command += ["--host-profile"] if args.host_profile else []
    print(f"== {recipe}: batch {batch} x {seq} tokens", flush=True)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": pythonpath})
    if result_file.exists():
        return json.loads(result_file.read_text())
    return {"recipe": recipe, "batch": batch, "seq": seq, "error": f"worker exited with {done.returncode}"}


def longest_context(recipe: str, checkpoint: Path, args: argparse.Namespace, out: Path) -> dict:
    """Double the sequence length at batch 1 until a step runs out of memory; the last that trained wins."""
    fitted, seq, last = None, args.seq, None
    while seq <= args.max_context_limit:
        last = spawn_worker(recipe, checkpoint, args, out, 1, seq)
        if "error" in last:
            break
        fitted, seq = last, seq * 2
    return {"recipe": recipe, "longest_seq": fitted["seq"] if fitted else None, "longest": fitted, "failed": last}


# --- one recipe, in its own process -------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> dict:
    from transformers import set_seed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer_factory = plain_recipe if args.worker == PLAIN else qlora_recipe
    build_trainer, model = trainer_factory(args, device)
    load_seconds = time.perf_counter() - start
    load_peak = _peak_gib(device)
    footprint = model.get_memory_footprint() / 2**30
    rows = args.batch * args.steps
    dataset = random_tokens(model.config.vocab_size, args.seq, rows) if args.data == "random" else sentiment(rows)
    trainer = build_trainer(dataset)
    timer = StepTimer(device)
    trainer.add_callback(timer)
    recorded_losses = record_losses(trainer)
    if args.host_profile:
        trainer.add_callback(HostProfile(args.steps, Path(args.out) / f"host-profile-{args.worker}.txt"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        if args.profile:
            profile_one_step(trainer, Path(args.out) / f"profile-{args.worker}-{args.batch}x{args.seq}.txt")
        else:
            trainer.train()
    except torch.OutOfMemoryError as error:
        return {"recipe": args.worker, "batch": args.batch, "seq": args.seq, "error": f"out of memory: {error}"[:300]}
    all_steps = timer.seconds
    median = statistics.median(all_steps[args.warmup:] or all_steps)
    tokens_per_s = args.batch * args.seq / median
    losses = [loss.item() for loss in recorded_losses]
    return {
        "recipe": args.worker,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": tokens_per_s,
        "median_step_s": median,
        "step_seconds": all_steps,
        "peak_gib": _peak_gib(device),
        "load_s": load_seconds,
        "load_peak_gib": load_peak,
        "footprint_gib": footprint,
        "flops_per_token": flops_per_token(model.config, args.seq),
        "losses": losses,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": versions(),
    }


def plain_recipe(args: argparse.Namespace, device: str):
    """The recipe users write by hand, straight from the transformers/peft/TRL documentation."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    dtype = BASELINE_DTYPE[device]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, quantization_config=bnb, dtype=dtype,
                                                 attn_implementation="sdpa", device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    set_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)

    def build_trainer(dataset):
        sft = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                        gradient_accumulation_steps=1, max_steps=args.steps, **SHARED_HYPERPARAMETERS,
                        gradient_checkpointing=True, optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
                        bf16=dtype == torch.bfloat16, max_length=args.seq, packing=False, logging_steps=args.steps,
                        save_strategy="no", report_to="none", seed=0, data_seed=0)
        return SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer)

    return build_trainer, model


def qlora_recipe(args: argparse.Namespace, device: str):
    """qlora's own stages, in the pipeline's order, from the composed recipe."""
    from transformers import set_seed

    from qlora.compose import compose_config
    from qlora.stages.adapters import attach_training_adapters
    from qlora.stages.faults import step_callbacks
    from qlora.stages.model import (fit_embeddings_to_tokenizer, frozen_weights_dtype, load_quantized_model,
                                    load_tokenizer, prepare_for_kbit_training)
    from qlora.stages.trainer import build_trainer as build_qlora_trainer
    from qlora.stages.trainer import check_performance_support

    run_dir = Path(tempfile.mkdtemp())
    recipe = args.recipe or ("tiny" if args.model == "tiny" else "llama7b")
    config = compose_config([
        f"+recipe={recipe}", f"model.name_or_path={args.checkpoint}", f"training.output_dir={run_dir}",
        f"training.batch_size={args.batch}", "training.grad_accum=1", f"training.max_steps={args.steps}",
        f"training.logging_steps={args.steps}", "training.save_steps=0", "training.seed=0",
        f"data.max_length={args.seq}",
        f"lora.dropout={args.lora_dropout}", "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear",
        f"training.lr={SHARED_HYPERPARAMETERS['learning_rate']}",
        f"training.scheduler={SHARED_HYPERPARAMETERS['lr_scheduler_type']}",
        f"training.warmup_ratio={SHARED_HYPERPARAMETERS['warmup_steps']}",
        f"training.max_grad_norm={SHARED_HYPERPARAMETERS['max_grad_norm']}",
        *([] if device == "cuda" else ["training.optim=adamw_torch"]), *args.override,
    ])
    check_performance_support(config.performance, torch.device(device))
    tokenizer = load_tokenizer(config.model)
    model = load_quantized_model(config.model, config.quantization, torch.device(device))
    fit_embeddings_to_tokenizer(model, tokenizer)
    model = prepare_for_kbit_training(model, config.training.gradient_checkpointing,
                                      frozen_weights_dtype(config.performance, config.quantization))
    set_seed(0)  # the same LoRA initialisation as the plain recipe
    model = attach_training_adapters(model, config)
    callbacks = list(step_callbacks(config, run_dir))  # every run's, as in qlora.pipeline
    return (lambda dataset: build_qlora_trainer(config, model, tokenizer, dataset, run_dir, callbacks=callbacks)), model


def versions() -> dict[str, str]:
    import importlib.metadata

    names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def random_tokens(vocab_size: int, seq: int, rows: int):
    import datasets

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (rows, seq), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def sentiment(rows: int):
    """The shipped sentiment rows as token sequences: data with structure, so that losses fall."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    source = datasets.load_dataset("json", data_files=str(ASSETS_DIR / "sentiment" / "train.jsonl"), split="train")
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in source]
    ids = [tokenizer(texts[i % len(texts)]).input_ids + [tokenizer.eos_token_id] for i in range(rows)]
    return datasets.Dataset.from_dict({"input_ids": ids})


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token with recomputation: 6 x parameters (forward, recompute, input gradients of
    the frozen base; LoRA's weight gradients are negligible) plus causal attention's two matmuls."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config.intermediate_size
    params = layers * per_layer + 2 * config.vocab_size * hidden
    attention = 4 * layers * seq * hidden  # QK^T and AV, 2 FLOPs per MAC, half masked: per pass
    return 6 * params + 3 * attention


class StepTimer(TrainerCallback):
    """Time of each optimizer step: between step ends, as the GPU reaches them (CUDA events), on the CPU the wall.

    Nothing here waits for the GPU: a sync at every step would keep the host from queueing the next step while
    the GPU finishes this one, which is not how training runs.
    """

    def __init__(self, device: str):
        self.device, self._marks = device, []

    def on_train_begin(self, *_, **__):
        self._mark()

    def on_step_end(self, *_, **__):
        self._mark()

    def _mark(self) -> None:
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000 for start, end in zip(self._marks, self._marks[1:])]
        return [end - start for start, end in zip(self._marks, self._marks[1:])]


def record_losses(trainer) -> list[torch.Tensor]:
    """Each step's loss, kept on the device: logging every step would read it on the host (a sync) each step."""
    losses = []
    training_step = trainer.training_step

    def recorded(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        losses.append(loss.detach())
        return loss

    trainer.training_step = recorded
    return losses


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


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


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
    plain = next((r for r in rows if r["recipe"] == PLAIN and "error" not in r), None)
    lines = [
        f"model {args.model} (random init), batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
        f"median over steps {args.warmup + 1}..{args.steps}; measured bf16 matmul peak {tflops:.0f} TFLOP/s",
        "MFU: against the GPU's dense bf16 specification; of limit: against the measured matmul peak, i.e. the "
        "share of the physical limit (tokens/s at 100% of that peak, for the FLOPs per token with recomputation)",
        "",
        "| recipe | tokens/s | vs plain | peak GiB | load s | load peak GiB | footprint GiB | MFU | of limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['error']} |||||||| ")
            continue
        ratio = r["tokens_per_s"] / plain["tokens_per_s"] if plain else float("nan")
        achieved = r["tokens_per_s"] * r["flops_per_token"] / 1e12  # TFLOP/s
        mfu = achieved / spec_bf16_tflops(r["device"])
        lines.append(
            f"| {r['recipe']} | {r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['peak_gib']:.2f} | {r['load_s']:.1f} | "
            f"{r['load_peak_gib']:.2f} | {r['footprint_gib']:.2f} | {mfu:.1%} | {achieved / tflops:.1%} |"
        )
    lines += ["", "first losses:"]
    for r in rows:
        if "losses" in r:
            lines.append(f"  {r['recipe']:>6}: " + " ".join(f"{x:.4f}" for x in r["losses"][:8]))
    if plain:
        for r in rows:
            if r is not plain and "losses" in r:
                n = min(len(r["losses"]), len(plain["losses"]))
                worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], plain["losses"][:n]))
                lines.append(f"  largest relative loss difference to plain over {n} steps: {worst:.2%}")
    return "\n".join(lines) + "\n"


def render_max_context(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"model {args.model}: longest sequence that trains at batch 1 (doubling from {args.seq})", "",
             "| recipe | longest seq | peak GiB there | tokens/s there | next (failed) |", "|---|---|---|---|---|"]
    for r in rows:
        longest = r["longest"] or {}
        failed = r["failed"] or {}
        lines.append(f"| {r['recipe']} | {r['longest_seq']} | {longest.get('peak_gib', float('nan')):.2f} | "
                     f"{longest.get('tokens_per_s', float('nan')):,.0f} | "
                     f"{failed.get('seq') if 'error' in failed else '-'} |")
    plain = next((r for r in rows if r["recipe"] == PLAIN), None)
    for r in rows:
        if plain and r is not plain and r["longest_seq"] and plain["longest_seq"]:
            lines.append(f"\n{r['recipe']}: {r['longest_seq'] / plain['longest_seq']:.0f}x the plain recipe's context")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
