"""Peak memory of `qlora.merge` against the model's size and its largest shard (CPU).

    python scripts/benchmarks/merge_memory.py [--hidden 1024 --layers 8 --shard 100MB]

Builds a random Llama checkpoint (bf16, several shards) and a LoRA adapter with non-zero B in a
temporary folder, then runs `python -m qlora.merge` in a child process and reads its peak resident
memory (ru_maxrss). A child that only imports the same modules gives the baseline. The shard-by-shard
merge should need about one shard (read) plus one shard (written) above the baseline, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qlora.config import ASSETS_DIR

IMPORTS = "import torch, peft, safetensors, transformers, qlora.merge"


def peak_rss_mib(command: list[str]) -> float:
    """Peak resident memory of a child process, MiB (ru_maxrss of the waited-for child)."""
    code = (f"import resource, subprocess, sys; subprocess.run({command!r}, check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard", default="100MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
        config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder / "base", max_shard_size=args.shard)
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.01)
        adapted.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        del model, adapted
        shards = sorted((folder / "base").glob("*.safetensors"))
        model_mib = sum(s.stat().st_size for s in shards) / 2**20
        largest_mib = max(s.stat().st_size for s in shards) / 2**20

        baseline = peak_rss_mib([sys.executable, "-c", IMPORTS])
        merge = peak_rss_mib([sys.executable, "-m", "qlora.merge", f"adapter={folder / 'adapter'}",
                              f"base={folder / 'base'}", f"output_dir={folder / 'merged'}"])
        result = {
            "model_mib": round(model_mib, 1), "shards": len(shards), "largest_shard_mib": round(largest_mib, 1),
            "baseline_rss_mib": round(baseline, 1), "merge_peak_rss_mib": round(merge, 1),
            "merge_above_baseline_mib": round(merge - baseline, 1),
            "above_baseline_in_shards": round((merge - baseline) / largest_mib, 2),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
