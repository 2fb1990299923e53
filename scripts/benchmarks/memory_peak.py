"""What is allocated at a run's peak GPU memory, and by which code: `scripts/benchmark.py --memory-peak`.

torch's allocator records every allocation and free with the Python stack (torch.cuda.memory._record_memory_history);
replaying that trace finds the moment the allocated bytes peak and the blocks alive then. They are grouped by the
innermost frame outside torch's own modules (qlora, peft, transformers, TRL, bitsandbytes, or Inductor's generated
code), so that the report reads "1.00 GiB in 32 blocks from transformers/.../modeling_llama.py:123 forward".

torch 2.11 cannot record under compiled code inside a gradient checkpoint: the first compiled layer's autograd
Function fails with "SystemError: <built-in method apply of FunctionMeta> returned NULL without setting an exception"
(pytorch/pytorch#179536, a regression from 2.10; seen on an H200 in two calls). Record qlora with its layers eager
(`--recipes "qlora:performance.torch_compile=false"`), whose peak is not the compiled one's.
"""

from __future__ import annotations

from collections import defaultdict

import torch

MAX_ENTRIES = 2_000_000  # trace events kept (a 7B step makes a few hundred thousand)
_TORCH_INTERNALS = ("/torch/", "/contextlib.py", "/functools.py", "/threading.py")


def start_recording() -> None:
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=MAX_ENTRIES)


def peak_report(top: int = 30) -> str:
    """Stop recording and describe the live blocks at the recorded peak, largest sites first; a failure of torch's
    recording is described instead of ending the run whose figures it accompanies."""
    try:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return describe_peak(snapshot, torch.cuda.max_memory_allocated(), top)
    except Exception as error:  # noqa: BLE001 (a diagnostic: its failure is reported, not raised)
        return f"no memory-peak report: {type(error).__name__}: {error}\n"


def describe_peak(snapshot: dict, max_allocated: int, top: int = 30) -> str:
    """The blocks alive when the allocations in `snapshot`'s trace peaked, grouped by the code that made them."""
    events = [event for trace in snapshot["device_traces"] for event in trace]
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in events:
        action, address, size = event["action"], event.get("addr"), event.get("size", 0)
        if action == "alloc":
            live[address] = event
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested", "free_completed") and address in live:
            total -= live.pop(address)["size"]
    before = max_allocated - peak  # allocated before recording started: the weights, mostly
    sites = defaultdict(lambda: [0, 0])
    for event in at_peak.values():
        site = sites[_site(event.get("frames") or [])]
        site[0] += event["size"]
        site[1] += 1
    lines = [f"recorded peak {peak / 2**30:.3f} GiB of allocations made while recording "
             f"(torch's peak {max_allocated / 2**30:.3f} GiB; the rest, {before / 2**30:.3f} GiB, "
             f"was allocated before: weights, adapters)", "", "| GiB | blocks | where |", "|---|---|---|"]
    for where, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"| {size / 2**30:.3f} | {count} | {where} |")
    return "\n".join(lines) + "\n"


def _site(frames: list[dict]) -> str:
    """The innermost frame outside torch (and its caller), shortened to the package's path."""
    outside = [f for f in frames if not any(part in f["filename"] for part in _TORCH_INTERNALS)
               or "torchinductor" in f["filename"]]
    if not outside:
        return "torch internals: " + (_frame(frames[0]) if frames else "no Python frame")
    return " < ".join(_frame(frame) for frame in outside[:2])


def _frame(frame: dict) -> str:
    path = frame["filename"]
    for marker in ("site-packages/", "/qlora/", "/scripts/", "torchinductor"):
        if marker in path:
            path = path[path.index(marker):].removeprefix("site-packages/")
            break
    return f"{path}:{frame['line']} {frame['name']}"
