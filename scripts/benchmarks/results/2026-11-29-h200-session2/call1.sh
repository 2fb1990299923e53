#!/usr/bin/env bash
# Call 1 (H200): what each memory switch costs and saves at Llama-2-7B 2 x 2048 (LoRA dropout 0.05), beside unsloth;
# the GPU test of performance.embeddings_on_host; where qlora's peak comes from; Llama-3-8B 1 x 2048 (issue 17, table 2).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$SECONDS
timeout 330 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 8 --warmup 3 \
  --recipes unsloth,qlora,"qlora:performance.embeddings_on_host=false","qlora:performance.reuse_recomputed_weights=false","qlora:training.optim=adamw_8bit" \
  --out "$OUT/l2-2x2048-d005" 2>&1 | grep -v "it/s]\|examples/s]" | tail -14
echo "== $((SECONDS - start)) s"
timeout 100 python3 -m pytest -m gpu -q -k "embeddings_on_host" -p no:cacheprovider 2>&1 | tail -4
echo "== $((SECONDS - start)) s"
timeout 80 python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 3 --warmup 1 --memory-peak \
  --recipes qlora --out "$OUT/peak" 2>&1 | grep -v "it/s]\|examples/s]" | tail -4
echo "== $((SECONDS - start)) s"
timeout $((560 - SECONDS)) python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --seq 2048 --batch 1 \
  --steps 8 --warmup 3 --lora-dropout 0 --recipes unsloth,qlora --out "$OUT/l3-1x2048" 2>&1 \
  | grep -v "it/s]\|examples/s]" | tail -8
echo "== $((SECONDS - start)) s"
