#!/usr/bin/env bash
# NOT RUN: session 6 had no device machine. Written in session 5 (its call2.sh, not run there either). For the next
# session, on main with ../2026-12-07-h200-session5/hashed-dropout.patch applied.
# Call 2: performance.hashed_dropout again after call 1's compile error (Inductor folded index x 0x9E3779B9 into an
# indexing expression whose constant overflowed int32; the hash now starts with index xor seed): its CUDA test while
# the checkpoint builds, then issue 17's table 1 at LoRA dropout 0.05, Llama-2-7B 2 x 2048, qlora with the switch on
# and off, then unsloth, each timed alone (10 steps, the median of steps 4-10).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA -k "hashed or generate_evaluate_and_merge" > "$OUT/gpu-tests.log" 2>&1 &
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
wait
tail -3 "$OUT/gpu-tests.log"
echo "== built $SECONDS s"
# one command per recipe, so that each one's report is written even if the call's time cuts the next
for recipe in qlora qlora:performance.hashed_dropout=false unsloth; do
  timeout $((${LIMIT:-300} - 10 - SECONDS)) python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 \
    --steps 10 --warmup 3 --recipes "$recipe" --out "$OUT/t1-d005-${recipe//[^a-z0-9]/_}" 2>&1 \
    | grep -v "it/s]\|examples/s]\|queued at" | grep "^| \|trained weights\|^  *[a-z].*: [0-9]"
  echo "== $recipe done $SECONDS s"
done
echo "== end $SECONDS s"
