#!/usr/bin/env bash
# Call 2 (H200): GPU tests of the new switches; Llama-2-7B 2x2048 with reuse_recomputed_weights off as a variant;
# where qlora's peak memory goes (--memory-peak); Llama-3-8B 1x65536 with each weight dequantized once for all chunks.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pytest -m gpu -q -k "offload or chunk" -p no:cacheprovider 2>&1 | tail -5
python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 10 --warmup 4 \
  --recipes unsloth,qlora,"qlora:performance.reuse_recomputed_weights=false" --out "$OUT/l2-2x2048" 2>&1 \
  | grep -v "it/s]\|examples/s]" | tail -16
python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2 --steps 3 --warmup 1 --memory-peak \
  --recipes qlora --out "$OUT/peak" 2>&1 | grep -v "it/s]\|examples/s]" | tail -3
python3 scripts/benchmark.py --model llama3-8b --recipe llama3_8b --seq 65536 --batch 1 --steps 3 --warmup 1 \
  --lora-dropout 0 --recipes qlora --out "$OUT/l3-1x65536" 2>&1 | grep -v "it/s]\|examples/s]" | tail -6
