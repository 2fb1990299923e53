#!/usr/bin/env bash
# Call 2 (H200): issue 17's table 1 in one call with performance.skip_down_proj_recompute (the MLP's down projection
# left out of the layer's recomputation), A/B'd in the same commands: Llama-2-7B 2 x 2048, LoRA dropout 0 (unsloth,
# qlora, qlora without the switch) and 0.05 (plain, unsloth, qlora, qlora without). The CUDA tests of the switch,
# of performance.expandable_segments and of the compiled/fused layers run while the checkpoint builds.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
  .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1) &
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA \
  -k "down_projection or compiled_layers or fused_lora_computes or expandable" > "$OUT/gpu-tests.log" 2>&1
tail -5 "$OUT/gpu-tests.log"
wait
echo "== built $SECONDS s"
B="python3 scripts/benchmark.py --model llama2-7b --seq 2048 --batch 2"
F="it/s]\|examples/s]"
OFF="qlora:performance.skip_down_proj_recompute=false"
timeout 170 $B --steps 12 --warmup 4 --lora-dropout 0 --recipes unsloth,qlora,$OFF --out "$OUT/l2-2x2048-d0" 2>&1 \
  | grep -v "$F" | tail -8
echo "== $SECONDS s"
timeout 230 $B --steps 12 --warmup 4 --recipes plain,unsloth,qlora,$OFF --out "$OUT/l2-2x2048-d005" 2>&1 \
  | grep -v "$F" | tail -9
echo "== $SECONDS s"
