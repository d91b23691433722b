#!/usr/bin/env bash
# The benchmark on an accelerator host that already has JAX for its device (and PyTorch), with no
# network: the workplace's lent GPU machine, or any GPU/TPU box. Run from the repository root:
#
#   make device-wheels                       # here, with PyPI: TorchJD's wheels into .whl/
#   bash experiments/device_bench.sh [OUT]   # there: results under OUT (default: $OUT or runs/)
#
# With the workplace's `device` tool: run(command="bash experiments/device_bench.sh",
# carry=[".whl"], timeout_s=600); the results come back from $OUT.
#
# Two passes, each under its own time limit, so that a failure or a slow compile in the second
# still leaves figures: `--quick` (joint + UPGrad at batch 1024, about a minute on the 2-core CPU
# here) and then the default benchmark (batch 256, 1024 and 4096, every schedule and aggregator,
# the peers in the same run). Each pass writes results.json, results.md and its log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/device_bench}}"
quick_s="${QUICK_S:-150}"
full_s="${FULL_S:-420}"
py="${PYTHON:-python3}"
mkdir -p "$out"

# Packages the host lacks, carried as wheels (`make device-wheels`): installed beside, not over,
# what the host has (--no-deps keeps its own jax, torch and numpy).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mtl_site .whl/*.whl || echo "device_bench: installing .whl/ failed" >&2
  export PYTHONPATH="/tmp/mtl_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # mtl from this checkout, not installed
export PYTHONUNBUFFERED=1
# JAX would take 75% of the GPU's memory up front, leaving PyTorch's peers the rest
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  date -u
  "$py" -c 'import sys, jax, flax, optax; print(sys.version.split()[0], "jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, jax.devices())'
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' ||
    true
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
} 2>&1 | tee "$out/host.txt"

status=0
run() {  # run NAME SECONDS ARGS...: one benchmark pass into $out/NAME
  local name=$1 limit=$2
  shift 2
  mkdir -p "$out/$name"
  echo "device_bench: $name (at most $limit s): benchmark.py $*"
  timeout --kill-after=10 "$limit" "$py" experiments/benchmark.py --out "$out/$name" "$@" \
    2>&1 | tee "$out/$name/log.txt"
  local rc=${PIPESTATUS[0]}
  echo "device_bench: $name exit $rc"
  [ "$rc" -eq 0 ] || status=$rc
}
run quick "$quick_s" --quick
run full "$full_s"
exit $status
