#!/usr/bin/env bash
# NOT RUN: session 8 got no machine. For the next session, on main (LIMIT ~540 s, carry=[".whl", ".whl-unsloth"]).
# Issue 17's table 1 (Llama-2-7B, 2 x 2048), at LoRA dropout 0.05 and 0, unsloth against qlora, each recipe timed
# alone (10 steps, the median of steps 4-10), with hashed-dropout.patch (this folder) applied on the
# GPU machine's copy of main (performance.hashed_dropout, on by default there): qlora with the switch on and off at
# dropout 0.05. First the patch's CUDA test while the checkpoint builds.
set -uo pipefail
patch -p1 -s < scripts/benchmarks/results/2026-12-08-session8/hashed-dropout.patch || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
START=$(($(date +%s) - SECONDS)); DEADLINE=$((START + ${LIMIT:-540} - 10))
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA -k hashed > "$OUT/gpu-tests.log" 2>&1 &
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
wait
tail -3 "$OUT/gpu-tests.log"
echo "== built $SECONDS s"
# one command per recipe, so that each one's report is written even if the call's time cuts the next
for run in 0.05:unsloth 0.05:qlora 0.05:qlora:performance.hashed_dropout=false 0:unsloth 0:qlora; do
  dropout=${run%%:*}; recipe=${run#*:}
  timeout $((DEADLINE - $(date +%s))) python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 \
    --steps 10 --warmup 3 --lora-dropout "$dropout" --recipes "$recipe" \
    --out "$OUT/t1-d${dropout}-${recipe//[^a-z0-9]/_}" 2>&1 \
    | grep -v "it/s]\|examples/s]\|queued at" | grep "^| \|trained weights\|^  *[a-z].*: [0-9]"
  echo "== dropout $dropout $recipe done $SECONDS s"
done
echo "== end $SECONDS s"
