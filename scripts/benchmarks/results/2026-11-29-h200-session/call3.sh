#!/usr/bin/env bash
# Call 3 (H200): the tree after the compile fix of dequantizing_once; qlora against unsloth, each table in this call:
# Llama-2-7B 2x2048 (LoRA dropout 0.05, then 0) and Llama-3-8B 1x65536.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 8 --warmup 3 --recipes unsloth,qlora \
  --out "$OUT/l2-2x2048-d005" 2>&1 | grep -v "it/s]\|examples/s]" | tail -9
python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --seq 65536 --batch 1 --steps 3 --warmup 1 \
  --lora-dropout 0 --recipes unsloth,qlora --out "$OUT/l3-1x65536" 2>&1 | grep -v "it/s]\|examples/s]" | tail -8
python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 8 --warmup 3 --recipes unsloth,qlora \
  --lora-dropout 0 --out "$OUT/l2-2x2048-d0" 2>&1 | grep -v "it/s]\|examples/s]" | tail -9
