import functools, jax, jax.numpy as jnp, numpy as np, sys, noprop, train_ct
noprop.init_gamma = functools.partial(noprop.init_gamma, ends=(-float(sys.argv[2]), float(sys.argv[2])))
lr = sys.argv[1]
rec, tree = train_ct.main(["--data-dir","../shared/data","--batch-size","32","--epochs","4","--lr",lr,"--train-limit","2048","--test-limit","500","--steps","20","--eval-runs","1","--quiet"])
p = tree["params"]; _,_,x,y = noprop.load_dataset("mnist","../shared/data"); x=jnp.asarray(x[:500]); y=jnp.asarray(y[:500])
f = noprop.ct_features(p["model"], x)
for t in (0.0, 0.5, 0.9):
    z = noprop.sample_q(KEY:=jax.random.PRNGKey(1), jnp.eye(10)[y], noprop.alpha_bar_ct(p["schedule"], jnp.array(t)))
    print("t", t, "net acc given z~q", float((noprop.ct_logits(p["model"], f, z, jnp.full(500, t)).argmax(-1)==y).mean()))
print("classifier on onehot", float((noprop.dense(p["classifier"], jnp.eye(10)).argmax(-1)==jnp.arange(10)).mean()))
print("ab(0), ab(1)", noprop.alpha_bar_ct(p["schedule"], jnp.array([0.0, 1.0])))
for st in (5, 20, 100):
    print("chain", st, float((noprop.predict_ct(p, {}, KEY, x, st)==y).mean()), "det", float((noprop.predict_ct(p, {}, KEY, x, st, False)==y).mean()))
