#!/usr/bin/env bash
# Call 2 (H200): the GPU test of performance.embeddings_on_host (its failure in call 1, in full); the MLP in chunks
# of 2048 and 1024 tokens at Llama-2-7B 2 x 2048 (dropout 0.05 and 0) beside unsloth (issue 17, table 1);
# Llama-3-8B 1 x 16,384 (table 2).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 100 python3 -m pytest -m gpu -q -k "embeddings_on_host" -p no:cacheprovider --tb=long -rA > "$OUT/gpu-test.log" 2>&1
tail -3 "$OUT/gpu-test.log"
echo "== $SECONDS s"
timeout 240 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 8 --warmup 3 \
  --recipes unsloth,qlora,"qlora:performance.mlp_chunk_tokens=2048","qlora:performance.mlp_chunk_tokens=1024" \
  --out "$OUT/l2-2x2048-d005" 2>&1 | grep -v "it/s]\|examples/s]" | tail -14
echo "== $SECONDS s"
timeout 190 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 8 --warmup 3 --lora-dropout 0 \
  --recipes unsloth,qlora,"qlora:performance.mlp_chunk_tokens=2048" --out "$OUT/l2-2x2048-d0" 2>&1 \
  | grep -v "it/s]\|examples/s]" | tail -12
echo "== $SECONDS s"
timeout $((585 - SECONDS)) python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --seq 16384 --batch 1 \
  --steps 6 --warmup 2 --lora-dropout 0 --recipes unsloth,qlora --out "$OUT/l3-1x16384" 2>&1 \
  | grep -v "it/s]\|examples/s]" | tail -8
echo "== $SECONDS s"
