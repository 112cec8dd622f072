#!/usr/bin/env bash
# The GPU check, for a machine where jax with CUDA is already installed (pip install -U "jax[cuda12]");
# needs no network. From the repository root:
#   bash bench/gpu.sh               # the tests that need no data, then python -m bench.speed (both block-axis forms)
#   bash bench/gpu.sh DATA_DIR      # and then a paper-length NoProp-DT MNIST run from DATA_DIR/mnist.npz
# Writes results/bench_gpu.json and .log, and the run's JSON and log; EPOCHS=N shortens the run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', f'no GPU visible to jax: {jax.devices()}'"
NOPROP_TEST_DATA=/nonexistent python -m pytest -q -p harness.testing test_noprop.py 2>&1 | tail -3 | tee results/bench_gpu_tests.log
python -m bench.speed --no-torch --out results/bench_gpu.json 2>&1 | tee results/bench_gpu.log
if [ -n "${1:-}" ]; then
  python train_dt.py --data-dir "$1" --offline --epochs "${EPOCHS:-100}" --quiet --out results/dt_mnist_onehot_s0_gpu.json \
    --checkpoint-dir "${HOME}/.cache/noprop-runs/dt_mnist_onehot_s0_gpu" --resume 2>&1 | tee results/dt_mnist_onehot_s0_gpu.log
fi
