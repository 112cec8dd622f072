"""Train NoProp-DT (paper Sec. 2.3, Eq. 8, Algorithm 1) and report test accuracy (Eq. 3 inference).

Example: python train_dt.py --dataset mnist --data-dir ../shared/data --epochs 10 --out results/dt.json
"""
import functools

import jax
import optax

import noprop

DEFAULTS = dict(  # paper Table 3 (v2 Table 4), NoProp-DT row
    dataset="mnist", data_dir="data", download=False,  # download: let TFDS fetch a missing dataset
    embedding="onehot",
    method="noprop",  # or "backprop": the paper's baseline, the same blocks trained end to end (Eqs. 17-19)
    epochs=100,  # MNIST 100; CIFAR-10/100 150
    batch_size=128, lr=1e-3, weight_decay=1e-3,  # AdamW
    T=10, eta=0.1,  # blocks; eta of Eq. 8
    seed=0, eval_runs=5,  # Table 1: 5 inference runs per seed, mean +- standard error
    train_limit=0, test_limit=0,  # 0 = all; N = the first N examples (quick runs)
    deterministic=False,  # inference without the eps noise of Eq. 3
    out="", checkpoint_dir="", resume=False, quiet=False, plot=False,  # plot: figures (needs matplotlib)
    devices=0,  # 0: all local devices (or the most that divide T for DT, the batch otherwise)
)


def main(argv=None):
    args, data, (image_shape, m), k_init, k_run = noprop.setup(DEFAULTS, __doc__, argv)
    backprop = args.method == "backprop"
    init = noprop.init_backprop if backprop else noprop.init_dt
    params, state = init(k_init, image_shape, m, args.embedding, args.T, *data[:2])
    sched = noprop.cosine_schedule(args.T)
    print(f"{'Backprop' if backprop else 'NoProp-DT'} {args.dataset} {args.embedding}: T={args.T} blocks of "
          f"{noprop.count_params(params['blocks']) // args.T:,} parameters, {len(data[0])} train / "
          f"{len(data[2])} test images, {jax.devices()[0].device_kind}")
    if backprop:
        loss, predict = noprop.loss_backprop, jax.jit(noprop.predict_backprop)
    else:
        loss = functools.partial(noprop.loss_dt, sched=sched, eta=args.eta)
        predict = jax.jit(functools.partial(noprop.predict_dt, sched=sched, stochastic=not args.deterministic))
    optimizer = optax.adamw(args.lr, weight_decay=args.weight_decay)
    return noprop.fit(args, "backprop" if backprop else "dt", loss, predict, params, state, optimizer, data, k_run)


if __name__ == "__main__":
    main()
