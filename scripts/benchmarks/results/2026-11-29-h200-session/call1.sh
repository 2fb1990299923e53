#!/usr/bin/env bash
# Call 1 (H200): unsloth beside qlora with the new memory switches. Run from the repo root on the GPU machine.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 8 --warmup 3 \
  --recipes unsloth,qlora,"qlora:performance.offload_checkpoints=false" --out "$OUT/l2-2x2048" 2>&1 \
  | tee "$OUT/l2-2x2048.log" | grep -v "it/s]\|examples/s]" | tail -25
python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --seq 65536 --batch 1 --steps 3 --warmup 1 \
  --lora-dropout 0 --recipes unsloth,qlora --out "$OUT/l3-1x65536" 2>&1 \
  | tee "$OUT/l3-1x65536.log" | grep -v "it/s]\|examples/s]" | tail -25
