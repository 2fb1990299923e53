#!/usr/bin/env bash
# Call 1: issue 17's table 1 at LoRA dropout 0.05 with performance.hashed_dropout (new, default on) against it off and
# unsloth, Llama-2-7B 2 x 2048, timed alone; issue 22's must-show 2 (DPO, Llama-2-7B, pairs of 2 x 1024 tokens: TRL's
# DPOTrainer + peft recipe against qlora's llama7b_dpo), timed alone; then, untimed and at once beside the GPU tests,
# table 4 again: 50 steps of the shipped sentiment rows, Llama-2-7B 4 x 512, plain recipe against qlora's defaults at
# dropout 0.05 (and qlora with hashed_dropout off: two draws of the same function) and at dropout 0.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
F="it/s]\|examples/s]\|queued at"
timeout 200 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 12 --warmup 4 \
  --recipes unsloth,qlora,qlora:performance.hashed_dropout=false --out "$OUT/t1-d005" 2>&1 | grep -v "$F" | tail -12
echo "== table 1 done $SECONDS s"
timeout 160 python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --steps 12 --warmup 4 \
  --recipes plain,qlora --out "$OUT/dpo-2x1024" 2>&1 | grep -v "$F" | tail -12
echo "== dpo done $SECONDS s"
LEFT=$((575 - SECONDS))
timeout $LEFT python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA > "$OUT/gpu-tests.log" 2>&1 &
TESTS=$!
T4="python3 scripts/benchmark.py --model llama2-7b --data sentiment --seq 512 --batch 4 --steps 50 --warmup 3"
timeout $LEFT $T4 --recipes plain,qlora,qlora:performance.hashed_dropout=false \
  --out "$OUT/t4-d005" > "$OUT/t4-d005.log" 2>&1 &
A=$!
timeout $LEFT $T4 --lora-dropout 0 --recipes plain,qlora --out "$OUT/t4-d0" > "$OUT/t4-d0.log" 2>&1 &
B=$!
wait $TESTS $A $B
tail -3 "$OUT/gpu-tests.log"
grep -A10 "^trained weights" "$OUT/t4-d005.log" "$OUT/t4-d0.log"
echo "== end $SECONDS s"
