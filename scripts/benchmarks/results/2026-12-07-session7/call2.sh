#!/usr/bin/env bash
# Session 7, call 2 (pass LIMIT): issue 22's must-show 2 with the LM head's reference pass in the trained pass's tiles.
# First, at once: DPO's first three losses with the defaults, with fused_lora=false and with compiled_dequantize=false
# (call 1: only the configurations whose head was TRL's in both passes, or whose hidden states happened to round
# alike, started at log 2), and `pytest -m gpu`. Then the table timed alone: plain against qlora, 12 steps.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
START=$(($(date +%s) - SECONDS)); DEADLINE=$((START + ${LIMIT:-560} - 20))
left() { echo $((DEADLINE - $(date +%s))); }
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
timeout $(left) python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA > "$OUT/gpu-tests.log" 2>&1 &
TESTS=$!
DPO="python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --steps 3 --warmup 1 --recipes"
for recipe in qlora qlora:performance.fused_lora=false qlora:performance.compiled_dequantize=false; do
  name=dpo-${recipe//[^a-z0-9]/_}
  timeout $(left) $DPO "$recipe" --out "$OUT/runs/$name" > "$OUT/$name.log" 2>&1 &
done
wait $(jobs -p | grep -v "^$TESTS$")
echo "== first losses done $SECONDS s"
grep -h -A3 "^first losses" "$OUT"/dpo-*.log
timeout $(left) python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --steps 12 --warmup 4 \
  --recipes plain,qlora --out "$OUT/runs/dpo-2x1024" > "$OUT/dpo-2x1024.log" 2>&1
grep -v "it/s]\|examples/s]\|queued at" "$OUT/dpo-2x1024.log" | tail -12
echo "== table done $SECONDS s"
wait $TESTS
tail -15 "$OUT/gpu-tests.log"
tar czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
echo "== end $SECONDS s"
