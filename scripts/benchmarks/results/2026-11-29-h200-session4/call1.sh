#!/usr/bin/env bash
# Call 1 (H200): issue 17's table 3 alone: the longest sequence that trains at batch 1, Llama-3-8B, LoRA dropout 0,
# under a 24 GiB cap, unsloth and qlora searched at the same time (each probe a capped process of its own, 2 steps).
# Starts from the peaks of session 3's call 2 extrapolated to 24 GiB (qlora ~149k, unsloth ~103k tokens).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama3-8b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
timeout $((590 - SECONDS)) python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --max-context --concurrent \
  --gpu-memory 24GiB --lora-dropout 0 --steps 2 --warmup 1 --max-context-start unsloth=102400,qlora=147456 \
  --recipes unsloth,qlora --out "$OUT/l3-max-context-24gib" > "$OUT/l3-max-context-24gib.log" 2>&1
echo "== rc $? at $SECONDS s"
cat "$OUT/l3-max-context-24gib/max-context-probes.jsonl"
tail -15 "$OUT/l3-max-context-24gib.log"
