"""Speed, memory and dispatch of noprop on this machine, all measured in one run.

python -m bench.speed            # ~5 min on the 2-core CPU; writes results/bench.json
python -m bench.speed --quick    # shorter: fewer repetitions, 1,000 images, 100 inference steps
python -m bench.speed --memory --out results/memory.json   # compiled temporaries only (the paper's Table 2)
python -m bench.speed --profile --out results/profile.json # where the DT step's time goes, per XLA op

Shapes are MNIST's (28x28x1, 10 classes, batch 128) with random weights and inputs: time does
not depend on the values. FLOPs are XLA's own count of the compiled program (cost_analysis).
"""
import argparse, functools, json, os, platform, sys, time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness import loop  # noqa: E402


def seconds(f, *args, reps, warmup=True):
    """Median wall time of f(*args) over reps calls, after one warm-up call (skip it for long f
    whose parts are compiled beforehand: a warm-up call of an epoch would double its cost)."""
    if warmup:
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cost(compiled):
    c = compiled.cost_analysis()
    return (c[0] if isinstance(c, (list, tuple)) else c)["flops"]


def matmul_rate(n, reps):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / seconds(f, a, reps=reps)


def train_steps(shape, m, B, T, key, ode_steps):
    """name -> (init, loss, optimizer) of every training step measured."""
    adamw = optax.adamw(1e-3, weight_decay=1e-3)
    ct = noprop.init_ct(key, shape, m)
    return {
        "noprop_dt_all_blocks": (noprop.init_dt(key, shape, m, T=T),
                                 functools.partial(noprop.loss_dt, sched=noprop.cosine_schedule(T)), adamw),
        "noprop_dt_one_block": (noprop.init_dt(key, shape, m, T=1),
                                functools.partial(noprop.loss_dt, sched=noprop.cosine_schedule(1)), adamw),
        "backprop": (noprop.init_backprop(key, shape, m, T=T), noprop.loss_backprop, adamw),
        "noprop_ct": (ct, noprop.loss_ct, noprop.adam_l2(1e-3, 1e-3, ct[0])),
        "noprop_fm": (ct, noprop.loss_fm, noprop.adam_l2(1e-3, 1e-3, ct[0])),
        "adjoint": (noprop.init_adjoint(key, shape, m), functools.partial(noprop.loss_adjoint, steps=ode_steps), adamw),
    }


def bench_steps(shape, m, B, T, reps, rate, key, ode_steps, memory_only=False):
    x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
    rows = {}
    for name, ((params, state), loss, opt) in train_steps(shape, m, B, T, key, ode_steps).items():
        step = functools.partial(loop.train_step, loss_fn=loss, optimizer=opt)
        args = (params, state, opt.init(params), key, x, y)
        compiled = jax.jit(step).lower(*args).compile()
        mem = compiled.memory_analysis()
        if memory_only:
            rows[name] = {"temp_mb": mem.temp_size_in_bytes / 2 ** 20, "argument_mb": mem.argument_size_in_bytes / 2 ** 20}
            print(f"{name:28s} temporaries {rows[name]['temp_mb']:8.1f} MB", flush=True)
            continue
        s = seconds(compiled, *args, reps=reps)
        # XLA counts a loop body once: backprop's scan runs it T times; the adjoint's loops mix with the
        # image path outside them, so its count means nothing (None)
        flops = None if name == "adjoint" else cost(compiled) * (T if name == "backprop" else 1)
        rows[name] = {"ms_per_step": 1000 * s, "images_per_s": B / s, "gflop_per_step": flops and flops / 1e9,
                      "fraction_of_matmul_rate": flops and flops / s / rate,
                      "temp_mb": mem.temp_size_in_bytes / 2 ** 20, "argument_mb": mem.argument_size_in_bytes / 2 ** 20}
    return rows


def profile_step(shape, m, B, T, key, reps=3):
    """Where the DT all-blocks step spends its time: XLA:CPU's own per-op trace (jax.profiler),
    each op named by the JAX primitive at its root (from the compiled HLO's metadata) and by
    pass (forward, or backward: JAX's transpose). Returns rows sorted by time, ms per step."""
    import collections, glob, gzip, re, tempfile
    (params, state), loss, opt = train_steps(shape, m, B, T, key, 5)["noprop_dt_all_blocks"]
    x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
    args = (params, state, opt.init(params), key, x, y)
    compiled = jax.jit(functools.partial(loop.train_step, loss_fn=loss, optimizer=opt)).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    origin = dict(re.findall(r'%([\w.-]+) = .*?op_name="([^"]+)"', compiled.as_text()))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            wall = seconds(compiled, *args, reps=reps, warmup=False)
        events = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]))["traceEvents"]
    rows = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e["name"] in origin:
            op = origin[e["name"]]
            pass_ = "backward" if "transpose(" in op else "forward"
            prim = "/".join(re.findall(r"jit\((\w+)\)", op)[1:] + [re.sub(r"\(.*", "", op.rsplit("/", 1)[-1])])
            kind = re.sub(r"\.\d+$", "", e["name"])
            rows[(pass_, prim, kind)] += e["dur"] / 1000 / reps
    total = sum(rows.values())
    return {"wall_ms": 1000 * wall, "op_ms_total": total,
            "ops": [{"pass": k[0], "primitive": k[1], "xla_op": k[2], "ms": v, "share": v / total}
                    for k, v in sorted(rows.items(), key=lambda kv: -kv[1])]}


def bench_dispatch(shape, m, B, n_steps, key):
    """One epoch of CT steps: a Python loop over batches vs one compiled lax.scan over batches."""
    params, state = noprop.init_ct(key, shape, m)
    opt = noprop.adam_l2(1e-3, 1e-3, params)
    step = functools.partial(loop.train_step, loss_fn=noprop.loss_ct, optimizer=opt)
    x = jax.random.uniform(key, (n_steps * B,) + shape)
    y = jax.random.randint(key, (n_steps * B,), 0, m)
    batches, keys = jnp.arange(n_steps * B).reshape(n_steps, B), jax.random.split(key, n_steps)
    jstep = jax.jit(step)
    tree = (params, state, opt.init(params))
    jax.block_until_ready(jstep(*tree, keys[0], *loop.get_batch(x, y, batches, 0)))  # compile only

    def python_loop(tree):
        for i in range(n_steps):
            tree = jstep(*tree, keys[i], *loop.get_batch(x, y, batches, i))[:3]
        return tree

    def scanned(tree):
        def body(tree, inp):
            k, idx = inp
            return step(*tree, k, x[idx], y[idx])[:3], None
        return jax.lax.scan(body, tree, (keys, batches))[0]

    scanned = jax.jit(scanned).lower(tree).compile()
    return {"steps": n_steps, "python_loop_steps_per_s": n_steps / seconds(python_loop, tree, reps=1, warmup=False),
            "scan_steps_per_s": n_steps / seconds(scanned, tree, reps=1, warmup=False)}


def predict_recompute(params, key, x, steps, variant):
    """The slow way, for comparison only: the whole network, image path included, at every step."""
    W, model = noprop.class_embeddings(params), params["model"]
    z0 = jax.random.normal(key, (x.shape[0], W.shape[1]))

    def logits(t, z):  # the barrier ties x to the step, else XLA hoists the image path out of the loop
        x_t, z = jax.lax.optimization_barrier((x, z))
        return noprop.ct_logits(model, noprop.ct_features(model, x_t), z, jnp.full((1,), t))

    if variant == "fm":
        return noprop.nearest_embedding(noprop.euler_chain(z0, lambda t, z: logits(t, z) @ W, steps), W)
    sched = noprop.ct_grid_schedule(params["schedule"], steps)
    u_hat = lambda t, z: jax.nn.softmax(logits(t, z)) @ W
    zT, _ = noprop.eq3_chain(key, z0, sched, u_hat, jnp.arange(steps) / steps)
    return jnp.argmax(noprop.dense(params["classifier"], zT), -1)


def bench_inference(shape, m, n_images, steps, n_slice, key):
    params, _ = noprop.init_ct(key, shape, m)
    x, y = jax.random.uniform(key, (n_images,) + shape), jnp.zeros(n_images, jnp.int32)
    rows = {}
    for variant, predict in (("ct", noprop.predict_ct), ("fm", noprop.predict_fm)):
        fast = jax.jit(functools.partial(predict, steps=steps))
        evaluate = lambda p: loop.evaluate(fast, p, {}, key, x, y, 1)  # the scripts' path, in chunks
        slow = jax.jit(functools.partial(predict_recompute, steps=steps, variant=variant))
        slow = slow.lower(params, key, x[:n_slice]).compile()
        jax.block_until_ready(fast(params, {}, key, x[:loop.EVAL_CHUNK]))  # compile evaluate's chunk shape
        t_fast = seconds(evaluate, params, reps=1, warmup=False)
        t_slow = seconds(slow, params, key, x[:n_slice], reps=1, warmup=False) * n_images / n_slice
        rows[variant] = {"images": n_images, "steps": steps, "features_once_s": t_fast,
                         "recompute_s_scaled": t_slow, "recompute_slice": n_slice, "speedup": t_slow / t_fast}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~30 s version: fewer repetitions and images")
    p.add_argument("--tiny", action="store_true", help="16x16 images, batch 8, T=2 (for the test)")
    p.add_argument("--memory", action="store_true", help="only the compiled temporaries of each training step (no timing)")
    p.add_argument("--profile", action="store_true", help="only a per-op profile of the DT all-blocks step")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "bench.json"))
    a = p.parse_args(argv)
    key = jax.random.PRNGKey(0)
    shape, m, B, T = ((16, 16, 1), 10, 8, 2) if a.tiny else ((28, 28, 1), 10, 128, 10)
    reps, n_images, steps, n_slice, epoch = (2, 64, 5, 8, 4) if a.tiny else (3, 1000, 100, 100, 60) if a.quick \
        else (5, 10000, 1000, 100, 60000 // 128)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    ode_steps = 5 if a.tiny else 1000
    if a.memory:
        return loop.write_json(a.out, {"machine": machine, "jax": jax.__version__, "batch": B, "T": T, "adjoint_steps": ode_steps,
                             "train_step": bench_steps(shape, m, B, T, reps, None, key, ode_steps, memory_only=True)})
    if a.profile:
        prof = profile_step(shape, m, B, T, key)
        print(f"DT all-blocks step: {prof['wall_ms']:.0f} ms wall, {prof['op_ms_total']:.0f} ms in XLA ops (both threads)")
        for r in prof["ops"][:20]:
            print(f"{r['ms']:8.1f} ms {100 * r['share']:5.1f}%  {r['pass']:8s} {r['primitive']:28s} {r['xla_op']}")
        return loop.write_json(a.out, {"machine": machine, "jax": jax.__version__, "batch": B, "T": T, "profile": prof})
    rate = matmul_rate(256 if a.tiny else 2048, reps)
    out = {"machine": machine,
           "jax": jax.__version__, "quick": a.quick, "tiny": a.tiny, "batch": B, "T": T,
           "matmul_gflop_per_s": rate / 1e9}
    print(f"machine: {out['machine']}, jax {jax.__version__}; float32 matmul {rate / 1e9:.0f} GFLOP/s")
    out["train_step"] = bench_steps(shape, m, B, T, reps, rate, key, ode_steps)
    print(f"\n{'training step, batch %d' % B:28s} {'ms/step':>8s} {'img/s':>7s} {'GFLOP':>7s} {'of matmul':>9s} "
          f"{'temp MB':>8s} {'args MB':>8s}")
    for name, r in out["train_step"].items():
        g, f = (("%7.1f" % r["gflop_per_step"], "%8.0f%%" % (100 * r["fraction_of_matmul_rate"])) if r["gflop_per_step"]
                else ("%7s" % "-", "%9s" % "-"))
        print(f"{name:28s} {r['ms_per_step']:8.0f} {r['images_per_s']:7.0f} {g} {f} {r['temp_mb']:8.0f} {r['argument_mb']:8.0f}")
    s = out["train_step"]
    try:  # the yardstick, when torch is installed (optional): the same DT step as a PyTorch loop over blocks
        from bench import torch_ref
        ref = torch_ref.ms_per_step(shape, m, B, T, reps)
        out["torch_reference"] = {"ms_per_step": ref, "jax_speedup": ref / s["noprop_dt_all_blocks"]["ms_per_step"]}
        print(f"{'pytorch_dt_loop_over_blocks':28s} {ref:8.0f}   (noprop_dt_all_blocks is "
              f"{out['torch_reference']['jax_speedup']:.2f}x as fast)")
    except ImportError:
        print("(pip install torch to time the PyTorch reference of the DT step beside ours)")
    out["ratios"] = {
        "all_blocks_vs_ten_one_block_steps": s["noprop_dt_all_blocks"]["ms_per_step"] / (T * s["noprop_dt_one_block"]["ms_per_step"]),
        "one_block_temp_vs_backprop_temp": s["noprop_dt_one_block"]["temp_mb"] / s["backprop"]["temp_mb"]}
    out["dispatch"] = bench_dispatch(shape, m, B, epoch, key)
    out["inference"] = bench_inference(shape, m, n_images, steps, n_slice, key)
    d, r = out["dispatch"], out["ratios"]
    print(f"\nall-blocks step / ten one-block steps: {r['all_blocks_vs_ten_one_block_steps']:.2f}x")
    print(f"one-block temporaries / backprop temporaries: {100 * r['one_block_temp_vs_backprop_temp']:.0f}%")
    print(f"dispatch, {d['steps']} CT steps: python loop {d['python_loop_steps_per_s']:.2f} steps/s, "
          f"lax.scan {d['scan_steps_per_s']:.2f} steps/s")
    for v, i in out["inference"].items():
        print(f"{v.upper()} inference, {i['images']} images x {i['steps']} steps: features once {i['features_once_s']:.1f} s, "
              f"recompute {i['recompute_s_scaled']:.0f} s (timed on {i['recompute_slice']}, scaled): {i['speedup']:.0f}x")
    return loop.write_json(a.out, out)


if __name__ == "__main__":
    main()
