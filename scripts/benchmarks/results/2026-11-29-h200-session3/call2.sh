#!/usr/bin/env bash
# Call 2 (H200): issue 17's table 2 in one call after (a) compiled MLP chunks computing with weights dequantized once
# per pass and (b) the LM head's gradient computed in the forward pass: Llama-3-8B batch 1 at 16,384, 65,536 and
# 2,048 tokens, LoRA dropout 0, unsloth beside qlora. The CUDA test of (b) runs while the checkpoint builds.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama3-8b')" \
  > "$OUT/build.log" 2>&1) &
timeout 60 python3 -m pytest -m gpu -q -k "lm_head" -p no:cacheprovider --tb=short -rA > "$OUT/gpu-tests.log" 2>&1
tail -2 "$OUT/gpu-tests.log"
wait
echo "== $SECONDS s"
B="python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --batch 1 --lora-dropout 0"
F="it/s]\|examples/s]"
timeout 170 $B --seq 16384 --steps 6 --warmup 2 --recipes unsloth,qlora --out "$OUT/l3-1x16384" 2>&1 \
  | grep -v "$F" | tail -7
echo "== $SECONDS s"
timeout 215 $B --seq 65536 --steps 3 --warmup 1 --recipes unsloth,qlora --out "$OUT/l3-1x65536" 2>&1 \
  | grep -v "$F" | tail -7
echo "== $SECONDS s"
timeout $((575 - SECONDS)) $B --seq 2048 --steps 10 --warmup 3 --recipes unsloth,qlora --out "$OUT/l3-1x2048" 2>&1 \
  | grep -v "$F" | tail -7
echo "== $SECONDS s"
