#!/usr/bin/env bash
# The GPU check, for a machine where jax with CUDA is already installed (pip install -U "jax[cuda12]");
# needs no network. From the repository root:
#   bash bench/gpu.sh             # the tests that need no data, then python -m bench.speed (both block-axis
#                                 # forms; with torch installed, its loop on the same GPU beside each step)
#   bash bench/gpu.sh DATA_DIR    # first, beside the tests, Table 1's runs that DATA_DIR holds the data of and
#                                 # results/ lacks: the MNIST ablations (python -m results.ablations, 8 at once)
#                                 # and NoProp-DT at the paper's length; with cifar10.npz / cifar100.npz there,
#                                 # NoProp-DT, backprop and NoProp-CT on them (one-hot, seed 0)
# Writes results/bench_gpu.{json,log} and results/gpu/ (each run's record and log, the tests' log); the
# README's table shows results/gpu/ runs as rows of their own.
# On a machine lent for a fixed time: TRAIN_UNTIL=S stops the training S seconds after the start, and
# BENCH_UNTIL=S the benchmark. Each run then goes in stages (e.g. 10, 20, 40, 70, 100 epochs), each ending
# with the full 5-run evaluation and resuming the last, so its last finished stage is a complete run; a
# stage starts only if the epochs so far say it ends in time.
set -uo pipefail  # not -e: a part that fails must not lose what the others measured
set -m  # each part started in the background is a process group of its own, stopped with all it started
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', f'no GPU visible to jax: {jax.devices()}'" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the runs share the GPU, and the bench shares it with torch
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/noprop-jax}"  # the bench reuses the warm-up's
train_end=$((SECONDS + ${TRAIN_UNTIL:-10000000})) bench_end=$((SECONDS + ${BENCH_UNTIL:-10000000}))
ck="$HOME/.cache/noprop-runs" && mkdir -p results/gpu

staged() {  # NAME "STAGES" SCRIPT FLAGS...: results/gpu/NAME.json, in stages (without TRAIN_UNTIL: the last at once)
  local name=$1 stages=$2 t0=$SECONDS finished=0 E need; shift 2
  for E in $stages; do
    [ -z "${TRAIN_UNTIL:-}" ] && E=${stages##* }
    if python -m results.reproduce --finished "results/gpu/$name.json" $E; then finished=$E t0=$SECONDS; continue; fi
    need=$(( finished ? (SECONDS - t0) * (E - finished) / finished : 0 ))  # at the pace so far, evaluations included
    [ $((SECONDS + need)) -lt $train_end ] || return
    timeout $((train_end - SECONDS)) python "$@" --offline --epochs $E --quiet --out "results/gpu/$name.json" \
      --checkpoint-dir "$ck/$name" --resume >> "results/gpu/$name.log" 2>&1 || return
    finished=$E
    [ $E = "${stages##* }" ] && return
  done
}

parts=()
start() { "$@" & parts+=($!); }
start env NOPROP_TEST_DATA=/nonexistent python -m pytest -q -p harness.testing test_noprop.py > results/gpu/tests.log 2>&1
if [ -n "${1:-}" ]; then
  start python -m results.ablations --jobs 8 --data-dir "$1" --checkpoint-root "$ck/ablations" > results/gpu/ablations.log 2>&1
  start python -m bench.speed --quick --no-torch --out /tmp/bench_warmup.json > /dev/null 2>&1  # fills the compile cache
  start staged dt_mnist_onehot_s0 "10 20 40 70 100" train_dt.py --data-dir "$1"
  for d in cifar10 cifar100; do
    [ -f "$1/$d.npz" ] || continue
    start staged dt_${d}_onehot_s0 "10 20 40 80 150" train_dt.py --dataset $d --data-dir "$1"
    start staged backprop_${d}_onehot_s0 "10 20 40 80 150" train_dt.py --method backprop --dataset $d --data-dir "$1"
    ct="40 100 200 500" && [ $d = cifar100 ] && ct="$ct 1000"  # Table 4: 500 and 1000 epochs
    start staged ct_${d}_onehot_s0 "$ct" train_ct.py --dataset $d --data-dir "$1"
  done
fi
running() { for p in "${parts[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running && [ $SECONDS -lt $train_end ]; do sleep 2; done
for p in "${parts[@]}"; do kill -- -"$p" 2>/dev/null; done; wait
timeout $((bench_end - SECONDS)) python -m bench.speed --out results/bench_gpu.json 2>&1 | tee results/bench_gpu.log
tail -n 3 results/gpu/*.log
