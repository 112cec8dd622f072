"""The CE term of loss_dt alone: how many AdamW steps until p(y|z_T) reads clean one-hot embeddings."""
import jax, jax.numpy as jnp, optax, noprop
key = jax.random.PRNGKey(0); sched = noprop.cosine_schedule(10)
for steps in (50, 100, 468, 1000):
    p = noprop.init_dense(key, 10, 10); opt = optax.adamw(1e-3, weight_decay=1e-3); st = opt.init(p)
    @jax.jit
    def step(p, st, k):
        y = jax.random.randint(k, (128,), 0, 10)
        g = jax.grad(lambda p: noprop.cross_entropy(noprop.dense(p, noprop.sample_q(k, jnp.eye(10)[y], sched["alpha_bar"][-1])), y))(p)
        u, st = opt.update(g, st, p); return optax.apply_updates(p, u), st
    for i in range(steps): p, st = step(p, st, jax.random.fold_in(key, i))
    print(steps, "steps: classifier accuracy on the 10 clean embeddings:",
          float((noprop.dense(p, jnp.eye(10)).argmax(-1) == jnp.arange(10)).mean()))
