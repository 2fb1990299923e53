#!/usr/bin/env bash
# NOT RUN: session 8 got no machine. For the next session, on main (LIMIT ~540 s, carry=[".whl", ".whl-unsloth"]).
# Issue 17's table 1 (Llama-2-7B, 2 x 2048), at LoRA dropout 0.05 and 0, unsloth against qlora, each recipe timed
# alone (10 steps, the median of steps 4-10), with hashed-dropout.patch (this folder) applied on the
# GPU machine's copy of main (performance.hashed_dropout, on by default there): qlora with the switch on and off at
# dropout 0.05. First the patch's CUDA test while the checkpoint builds.
set -uo pipefail
patch -p1 -s < scripts/benchmarks/results/2026-12-08-session8/hashed-dropout.patch || exit 1
UNSLOTH=1 source scripts/benchmarks/device_call.sh
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA -k hashed > "$OUT/gpu-tests.log" 2>&1 &
build_checkpoint llama2-7b
wait
tail -3 "$OUT/gpu-tests.log"
# one command per recipe, so that each one's report is written even if the call's time cuts the next
for run in 0.05:unsloth 0.05:qlora 0.05:qlora:performance.hashed_dropout=false 0:unsloth 0:qlora; do
  dropout=${run%%:*}; recipe=${run#*:}
  timeout $(left) python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 \
    --steps 10 --warmup 3 --lora-dropout "$dropout" --recipes "$recipe" \
    --out "$OUT/t1-d${dropout}-${recipe//[^a-z0-9]/_}" 2>&1 \
    | grep -v "it/s]\|examples/s]\|queued at" | grep "^| \|trained weights\|^  *[a-z].*: [0-9]"
  echo "== dropout $dropout $recipe done $SECONDS s"
done
echo "== end $SECONDS s"
