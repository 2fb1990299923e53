#!/usr/bin/env bash
# Session 7, call 1 (on main; pass LIMIT): which qlora switch moves the losses away from the plain recipe's.
# - Issue 22: DPO's first three losses (Llama-2-7B, pairs of 2 x 1024, 3 steps) with qlora's defaults, with
#   lm_head_gradient_in_forward=false, torch_compile=false, compiled_dequantize=false, fused_lora=false, and every
#   switch off (performance=off). The reference pass (adapter off) runs peft's own layers, bitsandbytes' dequantization.
# - Issue 17, table 4 at LoRA dropout 0 (50 steps of the shipped sentiment rows, 4 x 512): plain, qlora, qlora with
#   every switch off, and qlora with one switch off (or frozen weights in float32) at a time.
# - Beside them, the GPU test whose default job failed in session 6's call 1 (forked after CUDA was initialised).
# Runs share the GPU, 6 at a time: their losses count here, not their tokens/s.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
END=$((${LIMIT:-560} - 15))
timeout $END python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rA -k generate_evaluate_and_merge \
  > "$OUT/gpu-tests.log" 2>&1 &
TESTS=$!
(cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('llama2-7b')" \
  > "$OUT/build.log" 2>&1)
echo "== built $SECONDS s"
run() {  # NAME ARGS...: one benchmark, its log and its folder under $OUT/NAME
  local name=$1; shift
  timeout $((DEADLINE - $(date +%s))) python3 scripts/benchmark.py --model llama2-7b "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? at $(($(date +%s) - START)) s"
}
START=$(($(date +%s) - SECONDS)); DEADLINE=$((START + END))
export -f run; export OUT START DEADLINE
DPO="--method dpo --seq 1024 --batch 2 --steps 3 --warmup 1 --recipes"
T4="--data sentiment --seq 512 --batch 4 --steps 50 --warmup 3 --lora-dropout 0 --recipes"
{
  echo "dpo-qlora $DPO qlora"
  echo "dpo-lm_head_off $DPO qlora:performance.lm_head_gradient_in_forward=false"
  echo "dpo-compile_off $DPO qlora:performance.torch_compile=false"
  echo "dpo-compiled_dequantize_off $DPO qlora:performance.compiled_dequantize=false"
  echo "dpo-fused_lora_off $DPO qlora:performance.fused_lora=false"
  echo "dpo-all_off $DPO qlora:performance=off"
  echo "t4-plain $T4 plain"
  echo "t4-qlora $T4 qlora"
  echo "t4-all_off $T4 qlora:performance=off"
  for switch in lm_head_gradient_in_forward=false frozen_weights_float32=true torch_compile=false fused_lora=false \
      compiled_dequantize=false embeddings_on_host=false mlp_chunk_tokens=0 offload_checkpoints=false; do
    echo "t4-${switch%%=*} $T4 qlora:performance.$switch"
  done
} | xargs -P 6 -L 1 bash -c 'run "$@"' _
wait $TESTS
tail -3 "$OUT/gpu-tests.log"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {p.parent.name: json.loads(p.read_text())["rows"][0] for p in sorted(out.glob("*/benchmark.json"))}
plain = rows.get("t4-plain", {}).get("losses")
for name, row in rows.items():
    losses = row.get("losses") or []
    worst = max((abs(a - b) / abs(b) for a, b in zip(losses, plain)), default=None) if plain and name.startswith("t4") else None
    print(f"{name:32s} first {' '.join(f'{x:.4f}' for x in losses[:5])}"
          + (f"  largest diff to plain {100 * worst:.2f}% over {len(losses)}" if worst is not None else ""))
PY
echo "== end $SECONDS s"
