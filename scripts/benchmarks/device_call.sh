# Sourced at the top of a device call script (scripts/benchmarks/results/*/call*.sh), run from the repository root on
# the GPU machine: qlora's wheels (carry .whl) into /tmp/site, with UNSLOTH=1 also unsloth's (carry .whl-unsloth) into
# /tmp/site_unsloth as ../shared/device/README.md says; the environment; the GPU's name; a deadline LIMIT seconds from
# the start (`left`: the seconds to it); `build_checkpoint MODEL`: the random-init checkpoint, logged to $OUT/build.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
if [ "${UNSLOTH:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_unsloth .whl-unsloth/*.whl \
    .whl/bitsandbytes*.whl .whl/dill*.whl .whl/multiprocess*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
DEADLINE=$(($(date +%s) - SECONDS + ${LIMIT:-540} - 15))
left() { echo $((DEADLINE - $(date +%s))); }
build_checkpoint() {
  (cd scripts/benchmarks && python3 -c "from make_random_checkpoint import random_checkpoint as r; r('$1')" \
    > "$OUT/build.log" 2>&1)
  echo "== built $1 at $SECONDS s"
}
