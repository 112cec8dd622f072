import jax, jax.numpy as jnp, numpy as np, functools, sys
import noprop, train_dt
T = int(sys.argv[1]); steps_ep = sys.argv[2]
rec, tree = train_dt.main(["--data-dir","../shared/data","--T",str(T),"--epochs","1","--train-limit",steps_ep,"--test-limit","1000","--eval-runs","1","--quiet"])
p, s = tree["params"], tree["state"]
_,_,x,y = noprop.load_dataset("mnist","../shared/data"); x=jnp.asarray(x[:1000]); y=jnp.asarray(y[:1000])
sched = noprop.cosine_schedule(T); u = jnp.eye(10)[y]; key = jax.random.PRNGKey(1)
for t in range(T):
    blk = jax.tree.map(lambda a: a[t], p["blocks"]); bn = jax.tree.map(lambda a: a[t], s)
    z = noprop.sample_q(key, u, sched["alpha_bar"][t])
    lg,_ = noprop.dt_block(blk, bn, x, z); lg0,_ = noprop.dt_block(blk, bn, x, jnp.zeros_like(z))
    print(f"block {t+1}: acc given z~q {float((lg.argmax(-1)==y).mean()):.3f}  given z=0 {float((lg0.argmax(-1)==y).mean()):.3f}")
for det in (False, True):
    print("chain acc stochastic" if not det else "chain acc deterministic", float((noprop.predict_dt(p, s, key, x, sched, not det)==y).mean()))
