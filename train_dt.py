"""Train NoProp-DT (paper Sec. 2.3, Eq. 8, Algorithm 1), or its backprop baseline (Eqs. 17-19),
and report train and test accuracy of Eq. 3's inference chain.

Example: python train_dt.py --epochs 10 --out results/dt.json
"""
import functools

import jax
import optax

import noprop
from harness import cli, loop
from viz import figures

DEFAULTS = dict(  # paper Table 3 (v2 Table 4), NoProp-DT and Backprop rows
    dataset="mnist", data_dir="", offline=False, tfds=False, embedding="onehot",
    method="noprop", cls_scale=noprop.BACKPROP_CLS_SCALE,
    epochs=0,  # 0: the paper's (MNIST 100; CIFAR-10/100 150)
    batch_size=128, lr=1e-3, weight_decay=1e-3,  # AdamW
    T=10, eta=0.1,
    block_axis="auto",  # how the T blocks compile (noprop.map_blocks): same numbers, the fastest form by default
    seed=0, eval_runs=5,  # Table 1: 5 inference runs per seed, mean +- standard error
    train_limit=0, test_limit=0, deterministic=False,
    out="", checkpoint_dir="", resume=False, quiet=False, plot=False,
    devices=0, coordinator="", num_processes=1, process_id=0,  # one machine, or several (README: many devices)
)


def main(argv=None):
    args, data, (image_shape, m), k_init, k_run = cli.setup(DEFAULTS, __doc__, {"noprop": "dt", "backprop": "backprop"}, argv)
    backprop = args.method == "backprop"
    if backprop:
        init = functools.partial(noprop.init_backprop, cls_scale=args.cls_scale)
    else:
        init = noprop.init_dt
    params, state = init(k_init, image_shape, m, args.embedding, args.T, *data[:2])
    print(f"{'Backprop' if backprop else 'NoProp-DT'} {args.dataset} {args.embedding}: T={args.T} blocks of "
          f"{noprop.count_params(params['blocks']) // args.T:,} parameters, {len(data[0])} train / "
          f"{len(data[2])} test images, {jax.devices()[0].device_kind}")
    sched = noprop.cosine_schedule(args.T)
    blocks = dict(block_axis=args.block_axis)
    if backprop:
        loss = functools.partial(noprop.loss_backprop, **blocks)
        predict, also = jax.jit(functools.partial(noprop.predict_backprop, **blocks)), {}
    else:
        loss = functools.partial(noprop.loss_dt, sched=sched, eta=args.eta, **blocks)
        predict, other = (jax.jit(functools.partial(noprop.predict_dt, sched=sched, stochastic=s, **blocks))
                          for s in (not args.deterministic, args.deterministic))
        also = {"stochastic" if args.deterministic else "deterministic": other}
    optimizer = optax.adamw(args.lr, weight_decay=args.weight_decay)
    return figures.finish(args, params, *loop.fit(args, loss, predict, params, state, optimizer, data, k_run, also))


if __name__ == "__main__":
    main()
