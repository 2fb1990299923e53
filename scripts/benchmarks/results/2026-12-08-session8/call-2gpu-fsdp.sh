#!/usr/bin/env bash
# NOT RUN: for a session lent a 2-GPU kind, after call-2gpu-ddp.sh, on main (LIMIT ~590 s, carry=[".whl"]). Issue 20's
# must-show 2: scripts/benchmarks/multi_gpu.py fsdp --gpu-memory 24GiB, a random CodeLlama-34B-shaped checkpoint (its
# build writes ~68 GB of bf16 shards: check the disk and the time in the output; if the build does not fit one call,
# build it in a call of its own first), 2 processes x batch 5 x 2048 tokens, each capped at 24 GiB: the per-process
# peak against the plan, the adapter alone in one capped process (same validation loss), and 1 process at batch 10
# capped (out of memory expected). Reports to $OUT/multi_gpu_fsdp.{md,json}.
set -uo pipefail
source scripts/benchmarks/device_call.sh
df -h /tmp | tail -1
cd scripts/benchmarks && timeout $(left) python3 multi_gpu.py fsdp --gpu-memory 24GiB > "$OUT/fsdp.log" 2>&1
tail -30 "$OUT/multi_gpu_fsdp.md"
echo "== end $SECONDS s"
