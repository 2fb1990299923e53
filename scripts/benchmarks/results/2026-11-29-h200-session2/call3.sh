#!/usr/bin/env bash
# Call 3 (H200): issue 17's table 1 with this session's defaults (embeddings on the host, packed dropout masks),
# Llama-2-7B 2 x 2048, LoRA dropout 0.05 and 0, beside unsloth; the GPU tests of the changed paths;
# Llama-3-8B 1 x 16,384 (table 2) with the time left.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 140 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 10 --warmup 3 \
  --recipes unsloth,qlora --out "$OUT/l2-2x2048-d005" 2>&1 | grep -v "it/s]\|examples/s]" | tail -8
echo "== $SECONDS s"
timeout 120 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 10 --warmup 3 --lora-dropout 0 \
  --recipes unsloth,qlora --out "$OUT/l2-2x2048-d0" 2>&1 | grep -v "it/s]\|examples/s]" | tail -8
echo "== $SECONDS s"
timeout 130 python3 -m pytest -m gpu -q -k "embeddings_on_host or offloaded" -p no:cacheprovider --tb=short -rA \
  > "$OUT/gpu-tests.log" 2>&1
tail -3 "$OUT/gpu-tests.log"
echo "== $SECONDS s"
timeout $((535 - SECONDS)) python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --seq 16384 --batch 1 \
  --steps 5 --warmup 2 --lora-dropout 0 --recipes qlora,unsloth --out "$OUT/l3-1x16384" 2>&1 \
  | grep -v "it/s]\|examples/s]" | tail -8
echo "== $SECONDS s"
