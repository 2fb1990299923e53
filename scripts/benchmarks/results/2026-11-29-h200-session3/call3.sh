#!/usr/bin/env bash
# Call 3 (H200): the full GPU test suite and issue 17's table 4 (losses over 50 steps against the plain recipe on
# the shipped sentiment rows) side by side while nothing is timed, then table 1 in one command each: Llama-2-7B
# 2 x 2048, LoRA dropout 0.05 (plain, unsloth, qlora) and 0 (unsloth, qlora).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
B="python3 scripts/benchmark.py --model llama2-7b"
F="it/s]\|examples/s]"
timeout 210 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA > "$OUT/gpu-tests.log" 2>&1 &
TESTS=$!
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
timeout 160 $B --data sentiment --seq 512 --batch 4 --steps 50 --warmup 3 --recipes plain,qlora \
  --out "$OUT/l2-sentiment-50" > "$OUT/l2-sentiment-50.log" 2>&1
tail -4 "$OUT/l2-sentiment-50.log"
wait $TESTS
tail -2 "$OUT/gpu-tests.log"
echo "== $SECONDS s"
timeout 200 $B --seq 2048 --batch 2 --steps 12 --warmup 4 --recipes plain,unsloth,qlora --out "$OUT/l2-2x2048-d005" \
  2>&1 | grep -v "$F" | tail -10
echo "== $SECONDS s"
timeout $((570 - SECONDS)) $B --seq 2048 --batch 2 --steps 12 --warmup 4 --lora-dropout 0 --recipes unsloth,qlora \
  --out "$OUT/l2-2x2048-d0" 2>&1 | grep -v "$F" | tail -8
echo "== $SECONDS s"
