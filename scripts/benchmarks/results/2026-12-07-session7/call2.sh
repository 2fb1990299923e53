#!/usr/bin/env bash
# Session 7, call 2 (pass LIMIT): issue 22's must-show 2 with the LM head's reference pass in the trained pass's tiles
# (0bf970a; call 1 measured a first loss of 0.6847 with the defaults, exactly log 2 with TRL's head in both passes).
# `pytest -m gpu` while the checkpoint builds, then the table timed alone: plain against qlora, 12 steps.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
START=$(($(date +%s) - SECONDS)); DEADLINE=$((START + ${LIMIT:-400} - 15))
left() { echo $((DEADLINE - $(date +%s))); }
timeout $(($(left) - 120)) python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA > "$OUT/gpu-tests.log" 2>&1 &
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
wait
echo "== gpu tests done $SECONDS s"
tail -15 "$OUT/gpu-tests.log"
timeout $(left) python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --steps 12 --warmup 4 \
  --recipes plain,qlora --out "$OUT/dpo-2x1024" > "$OUT/dpo-2x1024.log" 2>&1
grep -v "it/s]\|examples/s]\|queued at" "$OUT/dpo-2x1024.log" | tail -12
echo "== end $SECONDS s"
