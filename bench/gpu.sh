#!/usr/bin/env bash
# Table 1's runs at the paper's length on one rented GPU (jax with CUDA installed: pip install -U "jax[cuda12]";
# no network needed), then one archive of everything they made. From the repository root:
#   bash bench/gpu.sh DATA_DIR             # DATA_DIR holds mnist.npz, cifar10.npz (and cifar100.npz if built)
#   REHEARSE=1 bash bench/gpu.sh DATA_DIR  # the whole sequence on a CPU, in minutes: the data split into parts of
#                                          # at most 58 MiB, joined again in a scratch home and checked by SHA-256,
#                                          # then this script with tiny budgets, then the archive
# The rows run in order of value, RUNS_AT_ONCE (default 2) side by side, each from results/gpu/ and its checkpoint
# in ~/.cache/noprop-runs, so a second call on the same machine continues where the first stopped:
#   1. NoProp-DT and backprop, CIFAR-10 one-hot, 150 epochs       2. NoProp-FM and NoProp-CT, CIFAR-10 one-hot, 500
#   3. NoProp-DT and backprop, CIFAR-100 one-hot, 150             4. the CIFAR-10 dim20 and prototype rows, 150
#   5. MNIST one-hot at 100 epochs (backprop, CT, FM)
# A row whose record in results/gpu/ is finished is skipped. TRAIN_UNTIL=S stops training S seconds after the
# start: each row runs in stages (e.g. 10, 20, 40, 80, 150 epochs), each ending with the full 5-run evaluation,
# so its last finished stage is a complete row; a stage starts only if the pace so far says it ends in time.
# ROWS="dt_cifar10_onehot_s0 ..." runs only the rows named. Beside the rows: the tests that need no data (TESTS=0: not). After them: the per-block chain study of the DT CIFAR-10
# checkpoint (results/chain_gap.py; checkpoints never leave the machine), and with BENCH=1 python -m bench.speed.
# Last: OUT/gpu_results.tar.gz (OUT defaults to ~) of results/gpu, whose path is the last line printed.
set -uo pipefail  # not -e: a part that fails must not lose what the others measured
set -m  # each part started in the background is a process group of its own, stopped with all it started
cd "$(dirname "$0")/.."
data=${1:?usage: [REHEARSE=1] bash bench/gpu.sh DATA_DIR}
data=$(cd "$data" && pwd) || exit 1
res=results/gpu extra_dt=() extra_ct=() stages_dt="10 20 40 80 150" stages_ct="50 100 200 500" stages_mnist="10 40 100"
if [ -n "${REHEARSE:-}" ]; then  # a scratch home and results folder; tiny runs on the CPU
  scratch=$(mktemp -d) && mkdir -p "$scratch/parts" "$scratch/home/data"
  for f in "$data"/*.npz; do
    n=$(basename "$f" .npz)
    split -b 58M "$f" "$scratch/parts/$n." || exit 1
    for part in "$scratch/parts/$n".*; do  # what one call carries
      [ "$(stat -c %s "$part")" -le $((58 << 20)) ] || { echo "error: $part is over 58 MiB"; exit 1; }
    done
    cat "$scratch/parts/$n".* > "$scratch/home/data/$n.npz"  # as the last call joins them
    [ "$(sha256sum < "$f")" = "$(sha256sum < "$scratch/home/data/$n.npz")" ] \
      || { echo "error: $n.npz joined from its parts differs from $f"; exit 1; }
    echo "$n.npz: $(ls "$scratch/parts/$n".* | wc -l) parts of at most 58 MiB, joined, SHA-256 equal"
  done
  rm -r "$scratch/parts"
  export HOME=$scratch/home JAX_PLATFORMS=cpu
  data=$HOME/data res=$scratch/results/gpu OUT=${OUT:-$scratch/out} TRAIN_UNTIL=${TRAIN_UNTIL:-420}
  extra_dt=(--T 2) extra_ct=(--steps 5)
  TINY=(--train-limit 256 --test-limit 100 --train-eval 100 --batch-size 32 --eval-runs 2)
  stages_dt="1 2" stages_ct="1 2" stages_mnist="1 2"
else
  python -c "import jax, sys; jax.default_backend() == 'gpu' or sys.exit(f'error: no GPU visible to jax {jax.devices()}; REHEARSE=1 runs on a CPU')" || exit 1
  TINY=()
fi
OUT=${OUT:-$HOME}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the rows share the GPU
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/noprop-jax}"
train_end=$((SECONDS + ${TRAIN_UNTIL:-10000000}))
ck="$HOME/.cache/noprop-runs" && mkdir -p "$res" "$OUT"

staged() {  # NAME "STAGES" SCRIPT FLAGS...: $res/NAME.json, in stages (without TRAIN_UNTIL: the last at once)
  local name=$1 stages=$2 t0=$SECONDS finished=0 E need; shift 2
  for E in $stages; do
    [ -z "${TRAIN_UNTIL:-}" ] && E=${stages##* }
    if python -m results.reproduce --finished "$res/$name.json" $E; then finished=$E t0=$SECONDS; continue; fi
    need=$(( finished ? (SECONDS - t0) * (E - finished) / finished : 0 ))  # at the pace so far, evaluations included
    [ $((SECONDS + need)) -lt $train_end ] || return
    timeout $((train_end - SECONDS)) python "$@" --offline --data-dir "$data" --epochs $E --quiet "${TINY[@]}" \
      --out "$res/$name.json" --checkpoint-dir "$ck/$name" --resume >> "$res/$name.log" 2>&1 || return
    finished=$E
    [ $E = "${stages##* }" ] && return
  done
}

rows=()  # "NAME|STAGES|SCRIPT FLAGS", in order of value; only those DATA_DIR has the data of
row() {  # ROWS="NAME ..." keeps only those
  [ -f "$data/$2.npz" ] && [[ -z "${ROWS:-}" || " $ROWS " == *" $1_$2_$3_s0 "* ]] && rows+=("$1_$2_$3_s0|$4|${*:5} --dataset $2 --embedding $3")
}
row dt cifar10 onehot "$stages_dt" train_dt.py "${extra_dt[@]}"
row backprop cifar10 onehot "$stages_dt" train_dt.py --method backprop "${extra_dt[@]}"
row fm cifar10 onehot "$stages_ct" train_fm.py "${extra_ct[@]}"
row ct cifar10 onehot "$stages_ct" train_ct.py "${extra_ct[@]}"
row dt cifar100 onehot "$stages_dt" train_dt.py "${extra_dt[@]}"
row backprop cifar100 onehot "$stages_dt" train_dt.py --method backprop "${extra_dt[@]}"
for e in dim20 prototype; do
  row dt cifar10 $e "$stages_dt" train_dt.py "${extra_dt[@]}"
  row backprop cifar10 $e "$stages_dt" train_dt.py --method backprop "${extra_dt[@]}"
done
row backprop mnist onehot "$stages_mnist" train_dt.py --method backprop "${extra_dt[@]}"
row ct mnist onehot "$stages_mnist" train_ct.py "${extra_ct[@]}"
row fm mnist onehot "$stages_mnist" train_fm.py "${extra_ct[@]}"

tests=
if [ "${TESTS:-1}" != 0 ]; then
  NOPROP_TEST_DATA=/nonexistent python -m pytest -q -p harness.testing test_noprop.py > "$res/tests.log" 2>&1 & tests=$!
fi
jobs_at_once=${RUNS_AT_ONCE:-2} running=()
for r in "${rows[@]}"; do
  IFS='|' read -r name stages cmd <<< "$r"
  while [ ${#running[@]} -ge "$jobs_at_once" ]; do  # wait for a free slot
    sleep 1; alive=(); for p in "${running[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done; running=("${alive[@]}")
  done
  [ $SECONDS -lt $train_end ] || break
  staged "$name" "$stages" $cmd & running+=($!)
  echo "$(date +%T) started $name"
done
while [ $SECONDS -lt $train_end ] && jobs -pr | grep -q .; do sleep 2; done
for p in $(jobs -p); do [ "$p" = "$tests" ] || kill -- -"$p" 2>/dev/null; done
wait

ckpt="$ck/dt_cifar10_onehot_s0/checkpoint.npz"
[ -f "$ckpt" ] && python results/chain_gap.py "$ckpt" --data-dir "$data" --limit 2000 > "$res/dt_cifar10_onehot_s0_chain_gap.log" 2>&1
[ -n "${BENCH:-}" ] && python -m bench.speed --out "$res/bench_gpu.json" > "$res/bench_gpu.log" 2>&1
for f in "$res"/*.json; do [ -f "$f" ] && python -m results.reproduce --finished "$f" 1 && echo "finished: $(basename "$f")"; done
tail -n 2 "$res"/*.log
tar czf "$OUT/gpu_results.tar.gz" -C "$(dirname "$res")" "$(basename "$res")"
echo "$OUT/gpu_results.tar.gz"
