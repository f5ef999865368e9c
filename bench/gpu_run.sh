#!/usr/bin/env bash
# The device check for a lent GPU (one call): versions, attention check, training benchmark in bf16.
# Runs from the repo root on a machine with jax[cuda] installed; flax may be carried as a wheel in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# mathlm without installing: a namespace package of symlinks to the repo folders.
mkdir -p /tmp/pkg/mathlm && for d in cli models train data; do ln -sfn "$PWD/$d" /tmp/pkg/mathlm/$d; done
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout 120 python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt" | grep -v "^W0000\|^I0000"
timeout 420 python3 bench/train_bench.py --gpu --json "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.txt"
