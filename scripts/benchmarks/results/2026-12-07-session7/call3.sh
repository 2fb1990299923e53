#!/usr/bin/env bash
# NOT RUN (session 7 had 104 s of budget left); for the next session, on main (pass LIMIT, ~300 s). Issue 22's
# must-show 2 with recipes/llama7b_dpo.yaml's lm_head_gradient_in_forward=false (call 1: the first loss exactly log 2
# with it off, 0.6847 with it on): the table timed alone, plain against qlora, 12 steps (24 pairs); then the first
# losses on call 1's pairs (3 steps, 6 pairs).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
START=$(($(date +%s) - SECONDS)); DEADLINE=$((START + ${LIMIT:-300} - 15))
left() { echo $((DEADLINE - $(date +%s))); }
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
DPO="python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2"
timeout $(left) $DPO --steps 12 --warmup 4 --recipes plain,qlora --out "$OUT/dpo-2x1024" > "$OUT/dpo-2x1024.log" 2>&1
grep -v "it/s]\|examples/s]\|queued at" "$OUT/dpo-2x1024.log" | tail -12
echo "== table done $SECONDS s"
timeout $(left) $DPO --steps 3 --warmup 1 --recipes qlora --out "$OUT/dpo-3-steps" > "$OUT/dpo-3-steps.log" 2>&1
grep -A2 "^first losses" "$OUT/dpo-3-steps.log"
echo "== end $SECONDS s"
