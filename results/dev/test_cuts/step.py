"""Training-step time against batch size at the learning tests' shapes (MNIST 28x28, lr 2e-3)."""
import functools, time, jax, optax, noprop

key = jax.random.PRNGKey(0)


def time_step(params, state, loss, opt, B):
    step = jax.jit(functools.partial(noprop.train_step, loss_fn=loss, optimizer=opt))
    x, y = jax.random.uniform(key, (B, 28, 28, 1)), jax.random.randint(key, (B,), 0, 10)
    out = step(params, state, opt.init(params), key, x, y)  # compile
    jax.block_until_ready(out)
    t = time.time()
    for _ in range(20):
        out = step(*out[:3], key, x, y)
    jax.block_until_ready(out)
    return (time.time() - t) / 20 * 1000


for T, B in ((2, 32), (2, 16)):
    params, state = noprop.init_dt(key, (28, 28, 1), 10, "onehot", T)
    loss = functools.partial(noprop.loss_dt, sched=noprop.cosine_schedule(T))
    print(f"DT T={T} batch {B}: {time_step(params, state, loss, optax.adamw(2e-3, weight_decay=1e-3), B):.1f} ms/step")
for name, emb, loss in (("CT", "onehot", noprop.loss_ct), ("FM", "dim20", noprop.loss_fm)):
    for B in (32, 16):
        params, state = noprop.init_ct(key, (28, 28, 1), 10, emb)
        print(f"{name} {emb} batch {B}: {time_step(params, state, loss, noprop.adam_l2(2e-3, 1e-3, params), B):.1f} ms/step")
