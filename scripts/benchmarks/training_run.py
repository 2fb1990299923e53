"""One measured training run, the same for every recipe of scripts/benchmark.py: data, step timing, losses, memory.

Imports neither qlora nor its configuration libraries, so that a recipe with an environment of its own (unsloth,
scripts/benchmarks/unsloth_worker.py) measures exactly as the others do.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

import memory_peak

ASSETS_DIR = Path(__file__).resolve().parents[2] / "qlora" / "assets"
# the QLoRA paper's values (and qlora's defaults), set in every recipe so that their losses compare
SHARED_HYPERPARAMETERS = dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3)
_UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "b": 1}


def memory_bytes(text: str) -> int:
    """'24GiB', '80GB', '16000MiB' in bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size: use e.g. 24GiB, 80GB or 16000MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """What every recipe's worker process is told: the same run for all."""
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="training steps per recipe")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="every recipe's LoRA dropout")
    parser.add_argument("--data", default="random", choices=["random", "sentiment"],
                        help="random token sequences of --seq tokens, or the shipped sentiment rows (structured)")
    parser.add_argument("--method", default="sft", choices=["sft", "dpo"],
                        help="sft, or dpo: TRL's DPOTrainer on pairs whose two sides are --seq tokens each")
    parser.add_argument("--gpu-memory", type=memory_bytes, default=None,
                        help="cap each recipe's process at this much GPU memory (e.g. 24GiB): a smaller card")
    parser.add_argument("--memory-peak", action="store_true",
                        help="record what is allocated at each recipe's peak GPU memory, and where (memory_peak.py); "
                             "with torch 2.11 not under compiled layers (qlora:performance.torch_compile=false)")
    parser.add_argument("--train-seed", type=int, default=None, help=argparse.SUPPRESS)  # a recipe's @N
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)


def worker_command(args: argparse.Namespace, checkpoint: Path, result_file: Path, batch: int, seq: int) -> list[str]:
    """The worker arguments of add_worker_arguments, for one recipe at one batch and sequence length."""
    command = ["--checkpoint", str(checkpoint), "--result-file", str(result_file), "--seq", str(seq),
               "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--lora-dropout", str(args.lora_dropout), "--data", args.data, "--method", args.method]
    return command + ([f"--gpu-memory={args.gpu_memory}B"] if args.gpu_memory else []) + \
        (["--memory-peak"] if args.memory_peak else [])


def split_seed(recipe: str) -> tuple[str, int | None]:
    """'plain@1' -> ('plain', 1): a recipe, and the seed its training starts from where one is given (measure)."""
    name, at, seed = recipe.rpartition("@")
    return (name, int(seed)) if at and seed.isdigit() else (recipe, None)


def cap_gpu_memory(cap: int | None) -> None:
    """Let this process's allocator use at most `cap` bytes of the GPU: a smaller card measured on a larger one."""
    if cap is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0))


def measure(args: argparse.Namespace, recipe: Callable, device: str) -> dict:
    """Build the recipe's model and trainer (`recipe(args, device)` -> (build_trainer, model)), train
    `args.steps` steps on `args.data`, and return the timings, losses and memory as the report's row."""
    from transformers import set_seed

    set_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    build_trainer, model = recipe(args, device)
    load_seconds = time.perf_counter() - start
    load_peak = peak_gib(device)
    footprint = model.get_memory_footprint() / 2**30
    rows = args.batch * args.steps
    if args.method == "dpo":
        dataset = random_pairs(args.seq, rows)
    else:
        dataset = random_tokens(model.config.vocab_size, args.seq, rows) if args.data == "random" else sentiment(rows)
    trainer = build_trainer(dataset)
    # the trained (LoRA) weights' dtypes as the trainer has them: an update rounded to bfloat16 is not one in float32,
    # which shows in the losses of long runs
    trained_dtypes = sorted({str(param.dtype).removeprefix("torch.") for param in trainer.model.parameters()
                             if param.requires_grad})
    timer = StepTimer(device)
    trainer.add_callback(timer)
    recorded_losses = record_losses(trainer)
    for callback in getattr(args, "extra_callbacks", []):
        trainer.add_callback(callback)
    recording = args.memory_peak and device == "cuda"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if recording:
        memory_peak.start_recording()
    row = {"recipe": args.worker, "batch": args.batch, "seq": args.seq}
    if args.train_seed is not None:
        # the random state training starts from, and with it the dropout masks; the LoRA initialisation, the data
        # and its order (data_seed) stay: how far dropout alone moves the losses
        torch.manual_seed(args.train_seed)
    try:
        (getattr(args, "train", None) or (lambda t: t.train()))(trainer)
    except torch.OutOfMemoryError as error:
        return {**row, "error": f"out of memory: {error}"[:300], "peak_gib": peak_gib(device)}
    all_steps = timer.seconds
    median = statistics.median(all_steps[args.warmup:] or all_steps)
    sequences = 2 if args.method == "dpo" else 1  # a pair's chosen and rejected sequences
    return {
        **row,
        "method": args.method,
        "tokens_per_s": sequences * args.batch * args.seq / median,
        "median_step_s": median,
        "step_seconds": all_steps,
        "peak_gib": peak_gib(device),
        "load_s": load_seconds,
        "load_peak_gib": load_peak,
        "footprint_gib": footprint,
        "flops_per_token": flops_per_token(model.config, args.seq, reference_pass=args.method == "dpo"),
        "losses": [loss.item() for loss in recorded_losses],
        "trained_dtypes": trained_dtypes,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "gpu_memory_cap_gib": args.gpu_memory / 2**30 if args.gpu_memory else None,
        "versions": versions(),
        **({"memory_peak": memory_peak.peak_report()} if recording else {}),
    }


def versions() -> dict[str, str]:
    names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel", "unsloth",
             "unsloth_zoo")
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


def random_pairs(seq: int, rows: int):
    """Preference pairs of random words from the shipped sentiment rows, each side longer than `seq` tokens, so that
    DPOTrainer's collator cuts both to exactly `seq`: a prompt of seq/4 words (at most a few tokens each, so
    shorter than `seq`: DPOTrainer drops a pair whose prompt fills it) and two answers of `seq` words."""
    import datasets

    source = datasets.load_dataset("json", data_files=str(ASSETS_DIR / "sentiment" / "train.jsonl"), split="train")
    words = sorted({word for row in source for word in row["input"].split()})
    generator = torch.Generator().manual_seed(0)

    def text(count: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (count,), generator=generator).tolist())

    return datasets.Dataset.from_dict({"prompt": [text(seq // 4) for _ in range(rows)],
                                       "chosen": [text(seq) for _ in range(rows)],
                                       "rejected": [text(seq) for _ in range(rows)]})


def flops_per_token(config, seq: int, reference_pass: bool = False) -> float:
    """Training FLOPs per token with recomputation: 6 x parameters (forward, recompute, input gradients of
    the frozen base; LoRA's weight gradients are negligible) plus causal attention's two matmuls; DPO's
    reference forward pass (`reference_pass`) adds one forward more."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config.intermediate_size
    params = layers * per_layer + 2 * config.vocab_size * hidden
    attention = 4 * layers * seq * hidden  # QK^T and AV, 2 FLOPs per MAC, half masked: per pass
    # forward, recompute, backward (input gradients only: the base is frozen), and DPO's reference forward
    passes = 4 if reference_pass else 3
    return 2 * passes * params + passes * attention


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


class StepTimer(TrainerCallback):
    """Time of each optimizer step: between step ends, as the GPU reaches them (CUDA events), on the CPU the wall.

    Nothing here waits for the GPU: a sync at every step would keep the host from queueing the next step while
    the GPU finishes this one, which is not how training runs.
    """

    def __init__(self, device: str):
        self.device, self._marks, self._start = device, [], 0.0

    def on_train_begin(self, *_, **__):
        self._start = time.perf_counter()
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()
        # the host's progress (it may run ahead of the GPU): a run cut by a time limit shows how far it came
        print(f"step {state.global_step}/{state.max_steps} queued at {time.perf_counter() - self._start:.1f} s",
              flush=True)

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
