#!/usr/bin/env bash
# Issue 22: where DPO's reference pass parts from the trained pass (scripts/benchmarks/reference_check.py: the same
# pair in every batch, two steps; layer inputs, backbone output and log-probabilities of both passes and of both
# steps), five recipes at once on the GPU (their values count here, not their speed); then the DPO table with
# recipes/llama7b_dpo.yaml (TRL's LM head, lm_head_gradient_in_forward=false) timed alone, plain against qlora.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
START=$(($(date +%s) - SECONDS)); DEADLINE=$((START + ${LIMIT:-420} - 15))
left() { echo $((DEADLINE - $(date +%s))); }
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
ON="performance.lm_head_gradient_in_forward=true"
i=0
for variant in plain qlora "qlora:$ON" "qlora:$ON;performance.compiled_dequantize=false" \
    "qlora:$ON;performance.fused_lora=false"; do
  i=$((i + 1))
  timeout 240 python3 scripts/benchmarks/reference_check.py --model llama2-7b --seq 1024 --batch 2 \
    --variant "$variant" --out "$OUT/check" > "$OUT/check-$i.log" 2>&1 &
done
wait
for i in 1 2 3 4 5; do grep -A4 "^== " "$OUT/check-$i.log" || tail -5 "$OUT/check-$i.log"; done
echo "== checks done $SECONDS s"
timeout $(left) python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --steps 12 \
  --warmup 4 --recipes plain,qlora --out "$OUT/dpo-2x1024" > "$OUT/dpo-2x1024.log" 2>&1
grep -v "it/s]\|examples/s]\|queued at" "$OUT/dpo-2x1024.log" | tail -12
echo "== end $SECONDS s"
