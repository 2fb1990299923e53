"""`python load_peak.py CHECKPOINT`: load CHECKPOINT in 4-bit on the CPU as training does, print a JSON line with
the growth of this process's anonymous resident memory during loading (plan_accuracy.py's PeakMemory: RssAnon
sampled every 0.2 ms), and the plan's footprint and largest shard. A first load of the shipped tiny model leaves
out what any first load in a process costs. Run as a subprocess by the tests, so that the
heap starts clean.

RssAnon leaves out the safetensors files themselves (memory-mapped, file-backed): it counts what loading copies.
"""

import ctypes
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"))

from plan_accuracy import PeakMemory  # noqa: E402
from qlora.compose import compose_config  # noqa: E402
from qlora.plan import plan_memory  # noqa: E402
from qlora.stages.model import load_quantized_model  # noqa: E402


def main() -> None:
    config = compose_config([f"model.name_or_path={sys.argv[1]}", "model.dtype=bfloat16"])
    plan = plan_memory(config)
    # the first load in a process imports and initialises what loading needs (modules and tables, 45 MB with
    # transformers 5.25, more with each release), which is not the model's: the shipped tiny model loads first
    warm_up_model = load_quantized_model(compose_config([]).model, config.quantization, torch.device("cpu"))
    del warm_up_model
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # start from a heap without free chunks
    memory = PeakMemory(cuda=False)
    memory.reset()
    model = load_quantized_model(config.model, config.quantization, torch.device("cpu"))
    print(json.dumps({"peak": memory.max() - memory.base, "footprint": plan.footprint,
                      "largest_shard": plan.largest_shard_bytes, "largest_quantized": plan.params.largest_quantized,
                      "layers": model.config.num_hidden_layers}))


if __name__ == "__main__":
    main()
