"""Write a randomly initialised checkpoint of a real architecture, for GPU runs without downloads.

    python scripts/benchmarks/make_random_checkpoint.py llama2-7b /tmp/llama2-7b
    python scripts/benchmarks/make_random_checkpoint.py codellama-34b /tmp/codellama-34b   # 68 GB

Built on the GPU in bf16 and saved as sharded safetensors, with the shipped tiny tokenizer (its ids
fit every vocabulary here). Speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qlora.config import ASSETS_DIR

ARCHITECTURES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0),
    "codellama-34b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=16384,
                          rms_norm_eps=1e-5, rope_theta=1000000.0),
}


def random_checkpoint(architecture: str, folder: Path | None = None) -> Path:
    """The random-init checkpoint of `architecture` in `folder` (default: qlora-random-ARCH in the temp folder),
    built by this script in a subprocess, so that the GPU memory of building it goes back, unless it is there."""
    folder = folder or Path(tempfile.gettempdir()) / f"qlora-random-{architecture}"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, __file__, architecture, str(folder)], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("output_dir")
    args = parser.parse_args()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    config = LlamaConfig(**ARCHITECTURES[args.architecture], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    # built in bf16 directly: a 34B model in float32 would need 136 GB of the GPU
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.output_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(args.output_dir)
    print(f"{args.architecture}: {model.num_parameters() / 1e9:.2f}B parameters written to {args.output_dir} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
