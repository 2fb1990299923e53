"""`python load_peak.py CHECKPOINT`: load CHECKPOINT in 4-bit on the CPU as training does, print a JSON line with
the growth of this process's anonymous resident memory (RssAnon, sampled every 0.2 ms) during loading, and the
plan's footprint and largest shard. Run as a subprocess by the tests, so that the heap starts clean.

RssAnon leaves out the safetensors files themselves (memory-mapped, file-backed): it counts what loading copies.
"""

import ctypes
import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

from qlora.config import compose_config
from qlora.plan import plan_memory
from qlora.stages.model import load_quantized_model


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main() -> None:
    config = compose_config([f"model.name_or_path={sys.argv[1]}", "model.dtype=bfloat16"])
    plan = plan_memory(config)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # start from a heap without free chunks
    base = peak = rss_anon()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = load_quantized_model(config.model, config.quantization, torch.device("cpu"))
    stop.set()
    sampler.join()
    print(json.dumps({"peak": peak - base, "footprint": plan.footprint, "largest_shard": plan.largest_shard_bytes,
                      "largest_quantized": plan.params.largest_quantized, "layers": model.config.num_hidden_layers}))


if __name__ == "__main__":
    main()
