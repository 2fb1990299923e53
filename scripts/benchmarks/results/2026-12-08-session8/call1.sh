#!/usr/bin/env bash
# NOT RUN: session 8 got no machine (two refused starts, then loans paused). For the next session, on main
# (LIMIT ~540 s, carry=[".whl"]).
# Issue 22: where DPO's reference pass parts from the trained pass (scripts/benchmarks/reference_check.py: the same
# pair in every batch, two steps; layer inputs, backbone output and log-probabilities of both passes and of both
# steps), six runs at once on the GPU (their values count here, not their speed; sharing the GPU also makes the
# timings Inductor's autotuning picks kernels by noisier). TORCHINDUCTOR_DETERMINISTIC=1: Inductor's deterministic
# mode (no on-device benchmarking that changes numerics, e.g. a reduction's block size). Then the DPO table timed
# alone: plain against qlora's recipe (TRL's LM head), and in a second command, in deterministic mode, qlora's
# recipe and qlora with its LM head.
set -uo pipefail
source scripts/benchmarks/device_call.sh
python3 -c "import torch, torch._inductor.config as c; print(torch.__version__, 'deterministic' in dir(c))"
build_checkpoint llama2-7b
ON="performance.lm_head_gradient_in_forward=true"
check() {  # LABEL DETERMINISTIC VARIANT
  TORCHINDUCTOR_DETERMINISTIC=$2 timeout 260 python3 scripts/benchmarks/reference_check.py --model llama2-7b \
    --seq 1024 --batch 2 --variant "$3" --label "$1" --out "$OUT/check" > "$OUT/check-$1.log" 2>&1
}
check plain 0 plain &
check head-on 0 "qlora:$ON" &
check head-on-det 1 "qlora:$ON" &
check recipe 0 qlora &
check recipe-det 1 qlora &
check head-on-bnb-dequantize 0 "qlora:$ON;performance.compiled_dequantize=false" &
wait
for label in plain head-on head-on-det recipe recipe-det head-on-bnb-dequantize; do
  grep -A4 "^== " "$OUT/check-$label.log" || tail -5 "$OUT/check-$label.log"
done
echo "== checks done $SECONDS s"
DPO="python3 scripts/benchmark.py --model llama2-7b --method dpo --seq 1024 --batch 2 --steps 12 --warmup 4"
timeout $(left) $DPO --recipes plain,qlora --out "$OUT/dpo" > "$OUT/dpo.log" 2>&1
grep -v "it/s]\|examples/s]\|queued at" "$OUT/dpo.log" | tail -8
echo "== table done $SECONDS s"
TORCHINDUCTOR_DETERMINISTIC=1 timeout $(left) $DPO --recipes "qlora,qlora:$ON" --out "$OUT/dpo-det" > "$OUT/dpo-det.log" 2>&1
grep -v "it/s]\|examples/s]\|queued at" "$OUT/dpo-det.log" | tail -8
echo "== end $SECONDS s"
