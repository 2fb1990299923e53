"""Several processes under `accelerate launch` on the CPU (gloo): one run folder, the same numbers as one
process with the same global batch, resume after a signal or a killed process, FSDP-QLoRA (torch's FSDP on the
CPU, tests/fsdp_on_cpu.py) and its adapter, and the combinations refused before loading."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from qlora.compose import compose_config
from qlora.config import ASSETS_DIR, DataConfig, EvaluateConfig
from qlora.errors import QLoRAError
from qlora.evaluate import evaluate
from qlora.pipeline import run_training
from qlora.stages.artifacts import adapter_tensor_names
from qlora.stages.checkpoints import checkpoint_fault
from qlora.stages.processes import describe_global_batch
from test_checkpoints import truncate

# Two processes of batch 8 see, per step, the same 16 examples as one process of batch 16: accelerate's
# seedable sampler draws one order and gives process i the batches i, i + 2, ... of it.
STEPS = ("training.max_steps=4", "training.logging_steps=1", "eval.exact_match_samples=0")
TESTS = Path(__file__).parent
HELDOUT = TESTS.parent / "qlora/assets/sentiment/heldout.jsonl"
DDP = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
       "--dynamo_backend", "no")
# the shipped FSDP-QLoRA config without the two settings that broadcast the weights from a GPU
FSDP = ("--config_file", str(TESTS.parent / "configs/accelerate/fsdp_qlora.yaml"), "--num_processes", "2",
        "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false")


def launch_two_processes(*args: str, cwd: Path, fault: tuple[str, ...] = (), env: dict | None = None,
                         fsdp: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch` of qlora.train (or of tests/fault_injection.py FAULT STEP) in 2 CPU processes.

    `--multi_gpu` is accelerate's torchrun launcher; on a machine without CUDA qlora joins the processes
    over gloo (accelerate's `--cpu` alone starts a single process unless mpirun is configured). `fsdp`: with the
    FSDP-QLoRA config, through tests/fsdp_on_cpu.py.
    """
    if fault:
        target = [str(TESTS / "fault_injection.py"), *fault]
    else:
        target = [str(TESTS / "fsdp_on_cpu.py")] if fsdp else ["-m", "qlora.train"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *(FSDP if fsdp else DDP),
               "--main_process_port", str(29500 + os.getpid() % 1000), *target, *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
                **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def failure(result: subprocess.CompletedProcess) -> str:
    """qlora's own error lines of a failed launch, or the end of what it wrote (torchrun's report comes last)."""
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("qlora: error")]
    return "\n".join(errors) or result.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The run folder of a 1-process run, batch 16, 4 steps."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run_training(compose_config([f"training.output_dir={run_dir}", "training.batch_size=16", *STEPS]))
    return run_dir


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in (row := json.loads(line))]


def assert_same_adapter(adapter_dir: Path, reference_run: Path) -> None:
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    reference = load_file(reference_run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, Path]:
    """2 processes of batch 8 in the default output_dir (with ${now:...}); SIGTERM reaches only the process
    of rank 1, at step 2; then the same command resumes to step 4."""
    cwd = tmp_path_factory.mktemp("two")
    run = ("training.batch_size=8", *STEPS)
    interrupted = launch_two_processes(*run, cwd=cwd, fault=("sigterm-rank-1", "2"),
                                       env={"HF_DATASETS_CACHE": str(cwd / "datasets-cache"),
                                            "QLORA_TEST_TOKENIZED_LOG": str(cwd / "tokenized.log")})
    runs = list((cwd / "outputs" / "tiny").iterdir())
    assert len(runs) == 1, (runs, interrupted.stderr[-3000:])  # both processes took the main process's folder
    resumed = launch_two_processes(*run, f"training.output_dir={runs[0]}", "training.resume=auto", cwd=cwd)
    return interrupted, resumed, runs[0]


def test_a_signal_to_one_process_stops_both_at_the_same_step(interrupted_and_resumed):
    interrupted, _, run_dir = interrupted_and_resumed
    assert interrupted.returncode != 0
    assert interrupted.stderr.count("training stopped by SIGTERM after step 2") == 2, interrupted.stderr[-3000:]
    assert "Resume with: accelerate launch [the same options] -m qlora.train" in interrupted.stderr
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert interrupted.stdout.count("global batch: 16 = batch_size 8 x grad_accum 1 x 2 process(es)") == 1


def test_the_main_process_alone_tokenizes_and_the_other_reads_its_result(interrupted_and_resumed):
    _, _, run_dir = interrupted_and_resumed
    tokenized_by = (run_dir.parents[2] / "tokenized.log").read_text().split()
    rows = len((Path(__file__).parents[1] / "qlora/assets/sentiment/train.jsonl").read_text().splitlines())
    assert tokenized_by == ["0"] * rows  # rank 0 tokenized each row once; rank 1 read the datasets cache


def test_two_processes_resume_into_one_run_matching_one_process(interrupted_and_resumed, one_process_run):
    _, resumed, run_dir = interrupted_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/checkpoint-2" in resumed.stdout
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert losses(run_dir) == pytest.approx(losses(one_process_run), rel=1e-4)
    assert (run_dir / "train.log").read_text().count("training loss") == 1
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("adapter")) == ["adapter"]
    assert_same_adapter(run_dir / "adapter", one_process_run)


def killed_and_resumed(cwd: Path, *run: str, fsdp: bool = False
                       ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, Path]:
    """2 processes running `run` (4 steps) with checkpoints every 2 steps; the process of rank 1 is killed (SIGKILL)
    at the start of step 3, so that torchrun ends the other; then the same launch with training.resume=auto."""
    run = (f"training.output_dir={cwd / 'run'}", *run, "training.save_steps=2")
    killed = launch_two_processes(*run, cwd=cwd, fault=("sigkill-rank-1", "3"), fsdp=fsdp)
    resumed = launch_two_processes(*run, "training.resume=auto", cwd=cwd, fsdp=fsdp)
    assert killed.returncode != 0 and "step 3/4" not in killed.stdout, killed.stdout[-2000:]
    assert resumed.returncode == 0, failure(resumed)
    assert f"resuming from {cwd / 'run'}/checkpoints/checkpoint-2" in resumed.stdout
    return killed, resumed, cwd / "run"


def test_ddp_resumes_after_a_killed_process_with_the_losses_of_one_process(tmp_path, one_process_run):
    _, _, run_dir = killed_and_resumed(tmp_path, "training.batch_size=8", *STEPS)
    assert losses(run_dir) == pytest.approx(losses(one_process_run), rel=1e-4)
    assert_same_adapter(run_dir / "adapter", one_process_run)


# FSDP-QLoRA as on the 2 x H200 (no checkpoints), the 4-bit weights stored as float32 (the tiny recipe's compute
# dtype), and the validation loss at the last step: the sharded model's answers to compare the saved adapter with.
# The recipe's held-out check is left on: the sharded model cannot generate, so the run skips it.
FSDP_RUN = ("training.batch_size=8", "training.max_steps=4", "training.logging_steps=1",
            "quantization.quant_storage=float32", f"data.val_path={HELDOUT}", "training.eval_steps=4")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("fsdp")
    result = launch_two_processes(f"training.output_dir={cwd / 'run'}", *FSDP_RUN, cwd=cwd, fsdp=True)
    assert result.returncode == 0, failure(result)
    return cwd / "run"


def test_fsdp_adapter_loads_in_one_process_and_answers_like_the_sharded_model(fsdp_run, one_process_run, tmp_path):
    """The 2 x H200 run (scripts/benchmarks/results/2026-11-22-h200x2-multi-gpu.md) saved no LoRA tensors."""
    assert losses(fsdp_run) == pytest.approx(losses(one_process_run), rel=1e-4)
    adapter = load_file(fsdp_run / "adapter/adapter_model.safetensors")
    assert adapter.keys() == load_file(one_process_run / "adapter/adapter_model.safetensors").keys()
    assert all(tensor.abs().max() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    sharded = [row["eval_loss"] for line in (fsdp_run / "metrics.jsonl").read_text().splitlines()
               if "eval_loss" in (row := json.loads(line))]
    # the base and the adapter in this one process, through peft's PeftModel.from_pretrained
    alone = evaluate(EvaluateConfig(run=str(fsdp_run), data=DataConfig(path=str(HELDOUT)), generation=False,
                                    output_file=str(tmp_path / "eval.json")))
    assert alone["eval_loss"] == pytest.approx(sharded[-1], rel=1e-5)


def test_fsdp_resumes_after_a_killed_process_with_the_losses_of_the_uninterrupted_run(fsdp_run, tmp_path):
    _, _, run_dir = killed_and_resumed(tmp_path, *FSDP_RUN, fsdp=True)
    assert losses(run_dir) == pytest.approx(losses(fsdp_run), rel=1e-6)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # the adapter gathered at every checkpoint
        assert adapter_tensor_names(run_dir / "checkpoints" / checkpoint) == adapter_tensor_names(fsdp_run / "adapter")
    assert_same_adapter(run_dir / "adapter", fsdp_run)
    # resume=auto reads the optimizer state under accelerate's FSDP name too before it chooses a checkpoint
    checkpoint = run_dir / "checkpoints/checkpoint-4"
    assert checkpoint_fault(checkpoint) is None
    truncate(checkpoint / "optimizer.bin")
    assert checkpoint_fault(checkpoint).startswith("optimizer.bin is unreadable")


def test_global_batch_is_described_with_its_factors(tiny_config):
    config = tiny_config("training.batch_size=4", "training.grad_accum=2")
    assert describe_global_batch(config, 4) == "32 = batch_size 4 x grad_accum 2 x 4 process(es)"


@pytest.mark.parametrize("environment, overrides, expected", [
    ({"WORLD_SIZE": "2"}, ["training.batch_size=auto"], "training.batch_size=auto with 2 processes"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed is not supported.*configs/accelerate/fsdp_qlora.yaml"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], r"quantization.quant_storage=uint8 .* under FSDP.*Set quantization.quant_storage=float32"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["quantization.quant_storage=float32", "model.dtype=bfloat16"],
     "model.dtype=bfloat16 under FSDP.*quant_storage=float32 and model.dtype=float32"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["quantization=int8", "quantization.double_quant=false"],
     "quantization.method=int8 cannot be sharded"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["quantization.quant_storage=float32", "eval.during_training=true"],
     "eval.during_training=true under FSDP"),
])
def test_launch_combinations_that_cannot_work_are_refused(tiny_config, monkeypatch, environment, overrides, expected):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(QLoRAError, match=expected):
        tiny_config(*overrides)


def test_fsdp_with_float_storage_is_accepted(tiny_config, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert tiny_config("quantization.quant_storage=float32").quantization.quant_storage == "float32"


def _multi_gpu_script():
    sys.path.insert(0, str(TESTS.parent / "scripts" / "benchmarks"))
    import multi_gpu

    return multi_gpu


def test_multi_gpu_benchmark_s_fsdp_model_fits_two_capped_gpus_and_not_one(tmp_path):
    """scripts/benchmarks/multi_gpu.py fsdp --gpu-memory 24GiB: by the plan, its default architecture and batch need
    more than 24 GiB on one GPU and less in each of 2 FSDP processes, and each process can load the 4-bit model."""
    from transformers import LlamaConfig

    multi_gpu = _multi_gpu_script()
    from make_random_checkpoint import ARCHITECTURES

    defaults = multi_gpu.DEFAULTS["fsdp"]
    LlamaConfig(**ARCHITECTURES[defaults["architecture"]]).save_pretrained(tmp_path / "model")
    args = argparse.Namespace(tiny=False, seq=2048, steps=defaults["steps"])
    rows, b = tmp_path / "rows.jsonl", defaults["batch"]
    rows.write_text('{"text": "a"}\n')
    plan = multi_gpu.plan(multi_gpu.train_overrides(args, str(tmp_path / "model"), rows, b),
                          multi_gpu.train_overrides(args, str(tmp_path / "model"), rows, 2 * b), processes=2)
    cap = 24
    assert plan["one_gpu_training_peak_gib"] > cap > plan["fsdp_process_training_peak_gib"]
    assert plan["fsdp_process_load_peak_gib"] < cap


def test_multi_gpu_benchmark_text_rows_are_natural_text_never_repeated(tmp_path):
    multi_gpu = _multi_gpu_script()
    path = multi_gpu.text_rows(tmp_path / "rows.jsonl", rows=40, seq=64, model=str(ASSETS_DIR / "tiny-llama"))
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(texts) == len(set(texts)) == 40
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    assert all(len(tokenizer(text)["input_ids"]) >= 60 for text in texts)  # every row fills data.max_length
    validation = multi_gpu.validation_rows(tmp_path / "validation.jsonl", multiple=10)
    assert len(validation.read_text().splitlines()) == 30  # of the 32 held-out rows
