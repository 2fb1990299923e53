#!/usr/bin/env bash
# NOT RUN: written in session 8 (no machine). For the next session, on main (LIMIT ~560 s, carry=[".whl"]).
# Issue 17's table 4 against its noise floor, at LoRA dropout 0 (no masks): qlora@1 is qlora in another process with
# nothing else changed, so its distance to qlora is what Inductor's autotuning alone moves the losses (kernels picked by
# timing, other reduction orders: pytorch/pytorch#163589, #189121); then the same three with Inductor's deterministic
# mode, where qlora@1 should repeat qlora exactly. 50 steps, 4 x 512, sentiment; the runs share the GPU (losses count).
set -uo pipefail
source scripts/benchmarks/device_call.sh
build_checkpoint llama2-7b
T4="python3 scripts/benchmark.py --model llama2-7b --data sentiment --seq 512 --batch 4 --steps 50 --warmup 3 --lora-dropout 0"
for recipe in plain qlora qlora@1; do
  timeout $(left) $T4 --recipes $recipe --out "/tmp/t4-$recipe" > "$OUT/t4-$recipe.log" 2>&1 &
  TORCHINDUCTOR_DETERMINISTIC=1 timeout $(left) $T4 --recipes $recipe \
    --out "/tmp/t4-det-$recipe" > "$OUT/t4-det-$recipe.log" 2>&1 &
done
wait
# the folders hold a file per run: only their reports come back
for d in /tmp/t4-*; do cp "$d/benchmark.json" "$OUT/$(basename "$d").json" 2>/dev/null; done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for mode in ("t4", "t4-det"):
    rows = {json.loads(p.read_text())["rows"][0]["recipe"]: json.loads(p.read_text())["rows"][0]["losses"]
            for p in out.glob(f"{mode}-*.json") if p.name.count("-") == mode.count("-") + 1}
    plain = rows.get("plain")
    for name, losses in rows.items():
        worst = max(abs(a - b) / b for a, b in zip(losses, plain)) if plain else float("nan")
        print(mode, name, " ".join(f"{x:.4f}" for x in losses[:5]), f"largest difference to plain {worst:.2%}")
    if "qlora" in rows and "qlora@1" in rows:
        apart = max(abs(a - b) / b for a, b in zip(rows["qlora@1"], rows["qlora"]))
        print(mode, f"qlora@1 against qlora: largest difference {apart:.2%}")
PY
echo "== end $SECONDS s"
