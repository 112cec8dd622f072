#!/usr/bin/env bash
# The GPU check, for a machine where jax with CUDA is already installed (pip install -U "jax[cuda12]");
# needs no network. From the repository root:
#   bash bench/gpu.sh             # the tests that need no data, then python -m bench.speed (both block-axis
#                                 # forms; with torch installed, its loop on the same GPU beside each step)
#   bash bench/gpu.sh DATA_DIR    # first, from DATA_DIR/mnist.npz and beside the tests: the MNIST ablations
#                                 # (python -m results.ablations, 8 runs at once) and a paper-length NoProp-DT run
# Writes results/bench_gpu.{json,log} and results/gpu/ (the DT run's record and log, the tests' log).
# On a machine lent for a fixed time: TRAIN_UNTIL=S stops the training S seconds after the start, and
# BENCH_UNTIL=S the benchmark. The DT run then goes in stages of 10, 20, 40, 70 and 100 epochs, each
# ending with the full 5-run evaluation and each resuming the last, so the last finished stage is a
# complete run; a stage starts only if the epochs so far say it ends in time.
set -uo pipefail  # not -e: a part that fails must not lose what the others measured
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', f'no GPU visible to jax: {jax.devices()}'" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the runs share the GPU, and the bench shares it with torch
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/noprop-jax}"  # the bench reuses the warm-up's
train_end=$((SECONDS + ${TRAIN_UNTIL:-10000000})) bench_end=$((SECONDS + ${BENCH_UNTIL:-10000000}))
ck="$HOME/.cache/noprop-runs" && mkdir -p results/gpu
parts=()
start() { setsid "$@" & parts+=($!); }  # each part in its own process group, stopped with all it started
start env NOPROP_TEST_DATA=/nonexistent python -m pytest -q -p harness.testing test_noprop.py > results/gpu/tests.log 2>&1
if [ -n "${1:-}" ]; then
  start python -m results.ablations --jobs 8 --data-dir "$1" --checkpoint-root "$ck/ablations" > results/gpu/ablations.log 2>&1
  start python -m bench.speed --quick --no-torch --out /tmp/bench_warmup.json > /dev/null 2>&1  # fills the compile cache
  t0=$SECONDS finished=0
  for E in 10 20 40 70 100; do
    [ -z "${TRAIN_UNTIL:-}" ] && E=100
    need=$(( finished ? (SECONDS - t0) * (E - finished) / finished : 0 ))  # at the pace so far, evaluations included
    [ $((SECONDS + need)) -lt $train_end ] || break
    timeout $((train_end - SECONDS)) python train_dt.py --data-dir "$1" --offline --epochs $E --quiet \
      --out results/gpu/dt_mnist_onehot_s0.json --checkpoint-dir "$ck/dt_mnist_onehot_s0_gpu" --resume \
      >> results/gpu/dt_mnist_onehot_s0.log 2>&1 || break
    finished=$E
    [ $E = 100 ] && break
  done
fi
running() { for p in "${parts[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running && [ $SECONDS -lt $train_end ]; do sleep 2; done
for p in "${parts[@]}"; do kill -- -"$p" 2>/dev/null; done; wait
timeout $((bench_end - SECONDS)) python -m bench.speed --out results/bench_gpu.json 2>&1 | tee results/bench_gpu.log
tail -n 3 results/gpu/*.log
