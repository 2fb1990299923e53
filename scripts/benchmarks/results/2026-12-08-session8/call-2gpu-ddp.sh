#!/usr/bin/env bash
# NOT RUN: for the first session lent a 2-GPU kind (nvidia-h100-x2 or nvidia-h200-x2), on main (LIMIT ~560 s,
# carry=[".whl"]). Issue 20's must-show 1 with qlora's defaults (fused LoRA and compiled layers on under DDP):
# scripts/benchmarks/multi_gpu.py ddp, random Llama-2-7B, 2 x 2048 tokens per process, 25 steps: (a) 1 process at
# batch 2, (b) 1 process at batch 4, (c) DDP 2 x 2; (c)'s tokens/s over (a)'s (>= 1.85x) and its first 20 losses
# against (b)'s (within 1%), on the repository's text. Reports to $OUT/multi_gpu_ddp.{md,json}, logs a.log, b.log, c.log.
set -uo pipefail
source scripts/benchmarks/device_call.sh
nvidia-smi topo -m | head -4
cd scripts/benchmarks && timeout $(left) python3 multi_gpu.py ddp > "$OUT/ddp.log" 2>&1
tail -30 "$OUT/multi_gpu_ddp.md"
echo "== end $SECONDS s"
