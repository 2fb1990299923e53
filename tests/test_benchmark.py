"""scripts/benchmark.py and its helpers (scripts/benchmarks/): the side-by-side benchmark runs end to end on the CPU
and its pieces (longest-context search, worker errors, memory peaks, memory sizes, trace gaps) do what they say."""

import argparse
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def benchmark_env(tmp_path_factory):
    """The environment to run scripts/benchmark.py in: it and each of its workers (the same environment, the
    repository put in front of PYTHONPATH again) run in a process forked from a server that has imported the
    libraries (tests/fork_server.py), not in a new Python that imports them again."""
    import torch

    from fork_server import CLIENT_DIR, SOCKET_VARIABLE, start_server

    if torch.cuda.is_available():  # the libraries initialise CUDA as they are imported: no forking after that
        yield {**os.environ, "PYTHONUNBUFFERED": "1"}
        return
    socket_path = tmp_path_factory.mktemp("fork-server") / "socket"
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), str(CLIENT_DIR), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", SOCKET_VARIABLE: str(socket_path)}
    server = start_server(socket_path, env)
    yield env
    server.terminate()
    server.wait()


def test_benchmark_runs_every_recipe_on_the_cpu(tmp_path, benchmark_env):
    """scripts/benchmark.py still works end to end; on the CPU only correctness is checked, not speed. unsloth is
    not installed here (nor would it run without a GPU): the report says so and the others run; a qlora variant
    (qlora:KEY=VALUE) runs with its overrides; RECIPE@N starts training from seed N: other dropout masks, the same
    initialisation and data."""
    variant_name = "qlora:lora.dropout=0.5;performance.mlp_chunk_tokens=16"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--seq", "32", "--batch", "2",
         "--steps", "3", "--warmup", "1", "--out", str(tmp_path), "--unsloth-path", str(tmp_path / "none"),
         "--recipes", f"plain,unsloth,unsloth@1,qlora,{variant_name},{variant_name}@7"],
        capture_output=True, text=True, timeout=600, env=benchmark_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "benchmark.md").read_text()
    assert "| plain |" in report and "| qlora |" in report
    assert "unsloth: not run, it is not installed in --unsloth-path=" in report
    assert "unsloth@1: not run, it is not installed in --unsloth-path=" in report
    import json

    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    plain, ours, variant, seven = (next(r for r in rows if r["recipe"] == name) for name in (
        "plain", "qlora", variant_name, f"{variant_name}@7"))
    # B starts at 0, so the first step's loss does not see dropout: the same data and initialisation whatever the
    # seed; from the second step the masks differ
    assert variant["losses"][0] == seven["losses"][0]
    assert variant["losses"][2] != seven["losses"][2]
    # losses recorded at every step although the trainers log only at the last one (a host read per step would
    # synchronise with the GPU); one time per step
    assert len(plain["losses"]) == len(ours["losses"]) == len(ours["step_seconds"]) == 3
    # the same data, seed and LoRA initialisation: the same function, so the same first loss
    assert ours["losses"][0] == pytest.approx(plain["losses"][0], rel=0.01)
    assert ours["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0
    assert variant["losses"][2] != ours["losses"][2]  # its dropout 0.5 applied (B starts at 0: from step 2)
    # qlora trains its adapters in float32 on the CPU (pipeline's cast for a float32 compute dtype); the report
    # names each recipe's
    assert ours["trained_dtypes"] == ["float32"] and plain["trained_dtypes"]
    assert f"trained weights: plain {'/'.join(plain['trained_dtypes'])}; qlora float32" in report


def test_benchmark_dpo_mode_runs_trl_and_qlora_on_the_cpu(tmp_path, benchmark_env):
    """--method dpo: TRL's documented DPOTrainer + peft recipe beside qlora's, on pairs cut to --seq tokens a side. On
    the CPU only correctness: both train, and both start at loss log 2 (at step 1 the policy is its reference)."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--method", "dpo", "--seq",
         "32", "--batch", "2", "--steps", "3", "--warmup", "1", "--out", str(tmp_path),
         "--recipes", "plain,unsloth,qlora"],
        capture_output=True, text=True, timeout=600, env=benchmark_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "benchmark.md").read_text()
    assert "DPO, batch 2 pairs of 2 x 32 tokens" in report and "| plain |" in report and "| qlora |" in report
    assert "unsloth: not run, this benchmark has no DPO mode for it" in report
    import json

    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    plain, ours = (next(r for r in rows if r["recipe"] == name) for name in ("plain", "qlora"))
    assert plain["method"] == ours["method"] == "dpo" and len(plain["losses"]) == len(ours["losses"]) == 3
    assert plain["losses"][0] == pytest.approx(math.log(2), abs=1e-4) and ours["losses"][0] == pytest.approx(
        math.log(2), abs=1e-4)
    assert ours["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("start, probes", [
    (8192, [8192, 12288, 16384, 24576, 40960, 73728, 139264, 106496, 90112, 81920, 86016]),  # up from below
    (98304, [98304, 94208, 90112, 81920, 86016]),  # down from above
    (86016, [86016, 90112]),  # at the answer: two probes
])
def test_longest_context_steps_out_by_doubling_steps_then_bisects(monkeypatch, start, probes):
    benchmark = _benchmark_module()
    tried = []

    def run(recipe, checkpoint, args, out, batch, seq):  # a recipe that trains up to 90,000 tokens
        tried.append(seq)
        return {"recipe": recipe, "seq": seq, **({"error": "out of memory"} if seq > 90_000 else {})}

    monkeypatch.setattr(benchmark, "spawn_worker", run)
    args = types.SimpleNamespace(seq=4096, max_context_start={"qlora": start, "unsloth": 1},
                                 max_context_limit=1 << 20, max_context_step=4096)
    result = benchmark.longest_context("qlora", None, args, None)
    assert tried == probes
    assert result["longest_seq"] == 86016 and result["failed"]["seq"] == 90112


def test_max_context_starts_are_parsed_or_refused():
    benchmark = _benchmark_module()
    assert benchmark.starts("unsloth=98304,qlora=147456") == {"unsloth": 98304, "qlora": 147456}
    with pytest.raises(argparse.ArgumentTypeError, match="RECIPE=TOKENS"):
        benchmark.starts("qlora:147456")


def test_longest_context_of_every_recipe_at_once_on_the_cpu(tmp_path, benchmark_env):
    """--max-context --concurrent: both recipes' searches run side by side (each probe a process of its own);
    on the CPU nothing runs out of memory, so each search steps up to --max-context-limit."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--model", "tiny", "--seq", "32", "--steps", "2",
         "--warmup", "1", "--recipes", "plain,qlora", "--max-context", "--concurrent", "--max-context-limit", "48",
         "--max-context-step", "16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=benchmark_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[plain 48] " in done.stdout and "[qlora 32] " in done.stdout  # each worker's lines say whose they are
    report = (tmp_path / "benchmark.md").read_text()
    assert "| plain | 48 |" in report and "| qlora | 48 |" in report and "not comparable" in report
    probes = [json.loads(line) for line in (tmp_path / "max-context-probes.jsonl").read_text().splitlines()]
    assert sorted((probe["recipe"], probe["seq"]) for probe in probes) == [("plain", 32), ("plain", 48),
                                                                           ("qlora", 32), ("qlora", 48)]


def test_a_failed_worker_says_why_in_its_row(monkeypatch, capsys):
    benchmark = _benchmark_module()
    command = [sys.executable, "-c", "print('loading'); raise SystemExit('the worker ran out of patience')"]
    returncode, last_lines = benchmark.run_echoing(command, {})
    assert returncode == 1 and last_lines == ["loading", "the worker ran out of patience"]
    assert "loading" in capsys.readouterr().out  # passed through as it came


def test_memory_peak_names_the_code_of_the_blocks_alive_at_the_peak():
    """scripts/benchmarks/memory_peak.py on a handmade allocator trace: the peak is after the third allocation
    (before the second is freed); the blocks then are grouped by the innermost frame outside torch."""
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))
    from memory_peak import describe_peak

    def frames(*names):
        return [{"filename": f"/usr/lib/site-packages/{name.split(':')[0]}", "line": 1, "name": name.split(":")[1]}
                for name in names]

    layer = frames("torch/nn/modules/module.py:_call_impl", "qlora/stages/fused_lora.py:forward")
    head = frames("trl/trainer/utils.py:_fused_forward")
    trace = [{"action": "alloc", "addr": 1, "size": 2**30, "frames": layer},
             {"action": "alloc", "addr": 2, "size": 2**29, "frames": head},
             {"action": "alloc", "addr": 3, "size": 2**30, "frames": layer},
             {"action": "free_requested", "addr": 2, "size": 2**29, "frames": head},
             {"action": "free_completed", "addr": 2, "size": 2**29, "frames": head},
             {"action": "alloc", "addr": 4, "size": 2**28, "frames": head}]
    report = describe_peak({"device_traces": [trace]}, max_allocated=3 * 2**30)
    assert "recorded peak 2.500 GiB" in report and "the rest, 0.500 GiB" in report
    rows = [line for line in report.splitlines() if line.startswith("| 2.000") or line.startswith("| 0.500")]
    assert rows == ["| 2.000 | 2 | qlora/stages/fused_lora.py:1 forward |",
                    "| 0.500 | 1 | trl/trainer/utils.py:1 _fused_forward |"]


def test_gpu_memory_sizes_are_read_as_the_issue_writes_them():
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))
    from training_run import memory_bytes

    assert memory_bytes("24GiB") == 24 * 2**30 and memory_bytes("80GB") == 80 * 10**9
    assert memory_bytes("16000MiB") == 16000 * 2**20
    with pytest.raises(argparse.ArgumentTypeError, match="not a memory size"):
        memory_bytes("lots")


def test_trace_gaps_finds_where_the_gpu_waits_for_the_host():
    """scripts/benchmarks/trace_gaps.py on a handmade profiler trace: two forward kernels 60 us apart, then a
    backward kernel launched 310 us after the GPU went idle, once the host had synchronised."""
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "benchmarks"))
    from trace_gaps import step_gaps

    def op(cat, name, ts, dur, tid=1, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {} if correlation is None else {"correlation": correlation}}

    events = [
        op("user_annotation", "ProfilerStep#1", 0, 1000),
        op("cpu_op", "LoRA4bitLinear", 0, 400),
        op("cpu_op", "aten::mm", 90, 20),
        op("cuda_runtime", "cudaLaunchKernel", 100, 5, correlation=1),
        op("cuda_driver", "cuLaunchKernelEx", 350, 5, correlation=2),  # how cuBLAS and Triton launch
        op("cuda_runtime", "cudaStreamSynchronize", 600, 100),
        op("cpu_op", "autograd::engine::evaluate_function: LoRA4bitLinearBackward", 700, 250, tid=2),
        op("cuda_runtime", "cudaLaunchKernel", 800, 5, tid=2, correlation=3),
        op("kernel", "gemm", 110, 190, tid=7, correlation=1),
        op("kernel", "dropout", 360, 140, tid=7, correlation=2),
        op("kernel", "gemm_backward", 810, 90, tid=7, correlation=3),
    ]
    result = step_gaps(events)
    assert result.wall_us == 1000 and result.busy_us == 190 + 140 + 90
    first, second = sorted(result.gaps, key=lambda g: g["start"])[1:]  # the first gap is the step's start
    assert (first["us"], first["inner"], first["outer"], first["synced"]) == (60, "LoRA4bitLinear",
                                                                             "main thread: LoRA4bitLinear", False)
    assert second["us"] == 310 and second["outer"] == "backward" and second["synced"]
    assert second["inner"] == "autograd::engine::evaluate_function: LoRA4bitLinearBackward"
