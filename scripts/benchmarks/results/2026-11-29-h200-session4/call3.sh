#!/usr/bin/env bash
# Call 3 (H200): issue 17's table 3 again, with performance.expandable_segments (call 1's qlora probes ran out of
# memory by fragmentation): the longest sequence at batch 1, Llama-3-8B, LoRA dropout 0, under a 24 GiB cap, unsloth
# and qlora searched at the same time from where call 1 left them; beside it (nothing here is timed) table 4: 50
# steps of the shipped sentiment rows, plain recipe against qlora's defaults, Llama-2-7B 4 x 512. The CUDA test of
# performance.expandable_segments runs while the checkpoints build.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA -k expandable > "$OUT/gpu-tests.log" 2>&1 &
BUILDS=()
for model in llama3-8b llama2-7b; do
  (cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('$model')" \
    > "$OUT/build-$model.log" 2>&1) &
  BUILDS+=($!)
done
wait "${BUILDS[@]}"
echo "== built $SECONDS s"
timeout 330 python3 scripts/benchmark.py --model llama2-7b --data sentiment --seq 512 --batch 4 --steps 50 --warmup 3 \
  --recipes plain,qlora --out "$OUT/l2-sentiment-50" > "$OUT/l2-sentiment-50.log" 2>&1 &
T4=$!
timeout $((575 - SECONDS)) python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --max-context --concurrent \
  --gpu-memory 24GiB --lora-dropout 0 --steps 2 --warmup 1 --max-context-start unsloth=106496,qlora=135168 \
  --recipes unsloth,qlora --out "$OUT/l3-max-context-24gib" > "$OUT/l3-max-context-24gib.log" 2>&1
echo "== table 3 rc $? at $SECONDS s"
cat "$OUT/l3-max-context-24gib/max-context-probes.jsonl"
wait $T4
echo "== table 4 rc $? at $SECONDS s"
tail -3 "$OUT/gpu-tests.log"
grep -v "it/s]\|examples/s]" "$OUT/l2-sentiment-50.log" | tail -8
