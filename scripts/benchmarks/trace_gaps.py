"""Where the GPU waits for the host in one profiled training step: a summary of a torch profiler chrome trace.

    python scripts/benchmarks/trace_gaps.py profile-qlora-2x2048.trace.json.gz

Reads the trace that `scripts/benchmark.py --profile` writes and prints, for the last profiled step: its wall
time, the GPU's busy time (the union of kernels, copies and memsets), the time the GPU sat idle, and that idle time
split by what the host was doing when it finally launched the next piece of GPU work (the innermost operator
around the launch, and its outermost one: forward, backward, optimizer...). The largest gaps are listed one by one.
A step whose idle time is large is bound by the host: fewer Python calls and launches shorten it, fewer FLOPs do not.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation"}
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}  # cuBLAS's nvjet and Triton kernels go through the driver API
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@dataclass
class StepGaps:
    wall_us: float
    busy_us: float
    gaps: list[dict] = field(default_factory=list)  # each: start, us, inner, outer, synced

    @property
    def idle_us(self) -> float:
        return sum(g["us"] for g in self.gaps)

    def idle_by(self, key: str) -> list[tuple[str, float, int]]:
        totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for gap in self.gaps:
            totals[gap[key]][0] += gap["us"]
            totals[gap[key]][1] += 1
        return sorted(((name, us, n) for name, (us, n) in totals.items()), key=lambda row: -row[1])


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def step_gaps(events: list[dict], min_gap_us: float = 5.0) -> StepGaps:
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep")]
    if not steps:
        raise SystemExit("no ProfilerStep annotation in the trace: was it written by a torch profiler schedule?")
    step = max(steps, key=lambda e: e["ts"])
    begin, end = step["ts"], step["ts"] + step["dur"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    # the GPU work this step launched, in order of start
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES
                  and begin <= launches.get(e.get("args", {}).get("correlation"), {"ts": -1})["ts"] <= end),
                 key=lambda e: e["ts"])
    host_ops = _ops_by_thread(events)
    syncs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "cuda_runtime" and e["name"] in SYNC_CALLS)
    busy, gaps, busy_until = 0.0, [], begin
    for kernel in gpu:
        start, stop = kernel["ts"], kernel["ts"] + kernel["dur"]
        if start - busy_until >= min_gap_us:
            launch = launches[kernel["args"]["correlation"]]
            chain = host_ops[launch["tid"]].enclosing(launch["ts"]) if launch["tid"] in host_ops else []
            inner = chain[-1]["name"] if chain else "(no operator)"
            outer = _phase(chain, launch["tid"], step["tid"])
            synced = bisect.bisect_left(syncs, busy_until) < bisect.bisect_right(syncs, start)
            gaps.append({"start": busy_until - begin, "us": start - busy_until, "inner": inner, "outer": outer,
                         "synced": synced})
        if stop > busy_until:
            busy += stop - max(start, busy_until)
            busy_until = stop
    return StepGaps(wall_us=max(end, busy_until) - begin, busy_us=busy, gaps=gaps)


class ThreadOps:
    """One thread's host operators, each with its parent (the operator it runs inside)."""

    def __init__(self, ops: list[dict]):
        self.ops = sorted(ops, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.ops]
        self.parent: list[int] = []
        open_ops: list[int] = []
        for i, op in enumerate(self.ops):
            while open_ops and self.ops[open_ops[-1]]["ts"] + self.ops[open_ops[-1]]["dur"] < op["ts"]:
                open_ops.pop()
            self.parent.append(open_ops[-1] if open_ops else -1)
            open_ops.append(i)

    def enclosing(self, ts: float) -> list[dict]:
        """The operators open at `ts`, outermost first."""
        i = bisect.bisect_right(self.starts, ts) - 1
        while i >= 0 and self.ops[i]["ts"] + self.ops[i]["dur"] < ts:
            i = self.parent[i]
        chain = []
        while i >= 0:
            chain.append(self.ops[i])
            i = self.parent[i]
        return chain[::-1]


def _ops_by_thread(events: list[dict]) -> dict[int, ThreadOps]:
    ops: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATEGORIES and not e["name"].startswith("ProfilerStep"):
            ops[e["tid"]].append(e)
    return {tid: ThreadOps(thread_ops) for tid, thread_ops in ops.items()}


def _phase(chain: list[dict], launch_tid, main_tid) -> str:
    names = [e["name"] for e in chain]
    if any(name.startswith("Optimizer.") for name in names):
        return "optimizer"
    if launch_tid != main_tid or any(name.startswith("autograd::engine") for name in names):
        return "backward"
    return f"main thread: {names[0]}" if names else "main thread"


def render_gaps(result: StepGaps, top: int = 12) -> str:
    ms = 1e-3
    lines = [f"step wall {result.wall_us * ms:.1f} ms, GPU busy {result.busy_us * ms:.1f} ms, "
             f"GPU idle {result.idle_us * ms:.1f} ms in {len(result.gaps)} gaps "
             f"({sum(g['us'] for g in result.gaps if g['synced']) * ms:.1f} ms of it after a host-device sync)", "",
             "idle by phase (the host's outermost operator at the launch that ended the gap):"]
    lines += [f"  {us * ms:8.1f} ms  {n:5d} gaps  {name}" for name, us, n in result.idle_by("outer")[:top]]
    lines += ["", "idle by the operator that launched the next GPU work:"]
    lines += [f"  {us * ms:8.1f} ms  {n:5d} gaps  {name}" for name, us, n in result.idle_by("inner")[:top]]
    lines += ["", "largest gaps:"]
    for gap in sorted(result.gaps, key=lambda g: -g["us"])[:top]:
        lines.append(f"  {gap['us'] * ms:8.2f} ms at {gap['start'] * ms:7.1f} ms  {gap['outer']} / {gap['inner']}"
                     + ("  (after a sync)" if gap["synced"] else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(render_gaps(step_gaps(load_events(args.trace)), args.top), end="")


if __name__ == "__main__":
    main()
