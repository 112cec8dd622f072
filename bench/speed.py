"""Speed, memory and dispatch of noprop on this machine, all measured in one run.

python -m bench.speed            # ~15 min on the 2-core CPU; writes results/bench.json
python -m bench.speed --quick    # shorter: fewer repetitions, 1,000 images, 100 inference steps
python -m bench.speed --scaling --out results/scaling.json  # the DT step over T and batch; inference over steps
python -m bench.speed --memory --out results/memory.json   # compiled temporaries only (the paper's Table 2)
python -m bench.speed --profile --out results/profile.json # where the DT step's time goes, per XLA op

Shapes are MNIST's (28x28x1, 10 classes, batch 128) and CIFAR-10's (32x32x3), random weights and
inputs: time does not depend on the values. With torch installed (optional), each step that has a
PyTorch reference (bench/torch_ref.py) is timed beside it in the same run. FLOPs are XLA's own count of the compiled program (cost_analysis).
"""
import argparse, contextlib, functools, json, os, platform, sys, time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import noprop  # noqa: E402
from harness import evaluate, loop, variants  # noqa: E402


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


SHAPES = {"MNIST": ((28, 28, 1), 10), "CIFAR-10": ((32, 32, 3), 10)}
CIFAR_ROWS = ("noprop_dt_all_blocks_vmap", "noprop_dt_all_blocks_unroll", "backprop_unroll",
              "noprop_ct", "noprop_fm")  # CIFAR-10's shapes: the steps with a PyTorch reference


def train_steps(shape, m, T, key, ode_steps):
    """name -> (init, loss, optimizer, PyTorch reference kind or None) of every training step measured,
    from the variants table (harness.variants); both forms of noprop.map_blocks for DT (block_form)."""
    rows = {"noprop_dt_all_blocks_vmap": (variants.dt(T), "dt"),
            "noprop_dt_all_blocks_unroll": (variants.dt(T), "dt"),
            "noprop_dt_one_block": (variants.dt(1), None),
            "backprop_unroll": (variants.backprop(T), "backprop"),
            "noprop_ct": (variants.ct(), "ct"), "noprop_fm": (variants.fm(), "fm"), "adjoint": (variants.adjoint(ode_steps), None)}
    return {name: (v.init(key, shape, m), v.loss, v.optimizer, ref) for name, (v, ref) in rows.items()}


@contextlib.contextmanager
def block_form(name):
    """noprop.map_blocks takes its form from the backend (a loop over the blocks on one CPU, jax.vmap elsewhere):
    while a row named *_vmap or *_unroll compiles, it is told the backend that gives that form."""
    real = jax.default_backend
    if name.endswith(("_vmap", "_unroll")):
        jax.default_backend = lambda: "gpu" if name.endswith("_vmap") else "cpu"
    try:
        yield
    finally:
        jax.default_backend = real


def compiled_step(params, state, loss, opt, key, x, y):
    """The scripts' training step (harness.loop.jit_step), compiled for these shapes; and its arguments."""
    args = (params, state, opt.init(params), key, x, y)
    return loop.jit_step(loss, opt).lower(*args).compile(), args


def bench_steps(shape, m, B, T, reps, rate, key, ode_steps, memory_only=False, only=None, rows=None, save=None):
    """Per training step: ms, images/s, XLA's FLOPs, share of the matmul rate, temporaries; into `rows`,
    calling save() after each (a run cut short keeps what it measured)."""
    x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
    rows = {} if rows is None else rows
    for name, ((params, state), loss, opt, ref) in train_steps(shape, m, T, key, ode_steps).items():
        if only and name not in only:
            continue
        with block_form(name):
            compiled, args = compiled_step(params, state, loss, opt, key, x, y)
        mem = compiled.memory_analysis()
        if memory_only:
            rows[name] = {"temp_mb": mem.temp_size_in_bytes / 2 ** 20, "argument_mb": mem.argument_size_in_bytes / 2 ** 20}
            print(f"{name:28s} temporaries {rows[name]['temp_mb']:8.1f} MB", flush=True)
            continue
        s = seconds(compiled, *args, reps=reps)
        # the adjoint's loops mix with the image path outside them (XLA counts a loop body once): no count
        flops = None if name == "adjoint" else cost(compiled)
        rows[name] = {"ms_per_step": 1000 * s, "images_per_s": B / s, "gflop_per_step": flops and flops / 1e9,
                      "fraction_of_matmul_rate": flops and rate and flops / s / rate,
                      "temp_mb": mem.temp_size_in_bytes / 2 ** 20, "argument_mb": mem.argument_size_in_bytes / 2 ** 20,
                      "pytorch_reference": ref}
        print(f"  {name:28s} {rows[name]['ms_per_step']:8.0f} ms", flush=True)
        if save:
            save()
    return rows


def add_torch(out, shapes, B, T, reps, torch_ref):
    """The PyTorch references, timed after every JAX row: torch's idle OpenMP threads keep spinning
    for a while after it runs, and would slow whatever is timed next in this process."""
    out["pytorch_device"] = str(torch_ref.DEVICE)
    for name, rows in out.get("train_step", {}).items():
        (shape, m), ms = shapes[name], {}
        for row in rows.values():
            ref = row["pytorch_reference"]
            if ref and ref not in ms:
                ms[ref] = torch_ref.ms_per_step(ref, shape, m, B, T, reps)
                print(f"  PyTorch {ref} step, {name}: {ms[ref]:.0f} ms", flush=True)
            if ref:
                row.update(pytorch_ms_per_step=ms[ref], speed_vs_pytorch=ms[ref] / row["ms_per_step"])
        for step, row in rows.items():
            if row["pytorch_reference"]:
                print(f"  {name:8s} {step:28s} {row['ms_per_step']:7.0f} ms, PyTorch {row['pytorch_ms_per_step']:7.0f} ms: "
                      f"{row['speed_vs_pytorch']:.2f}x as fast", flush=True)
    for rows in out["inference"].values():
        for variant, row in ([("ct", rows["ct"]), ("fm", rows["fm"])] if "ct" in rows else []):
            row["pytorch_s"] = torch_ref.seconds_inference(variant, shapes[next(iter(shapes))][0], 10, row["images"], row["steps"])
            row["speed_vs_pytorch"] = row["pytorch_s"] / row["features_once_s"]
            print(f"  PyTorch {variant.upper()} inference, {row['images']} images x {row['steps']} steps: "
                  f"{row['pytorch_s']:.1f} s ({row['speed_vs_pytorch']:.2f}x)", flush=True)


def bench_scaling(shape, m, key, reps, Ts=(1, 2, 5, 10, 20), batches=(32, 128, 512)):
    """ms of the DT all-blocks step in both forms of the block axis, over T and the batch size."""
    rows = []
    for T in Ts:
        params, state = variants.dt(T).init(key, shape, m)
        for B in batches:
            x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
            row = {"T": T, "batch": B}
            for form in ("vmap", "unroll"):
                v = variants.dt(T)
                with block_form(f"dt_{form}"):
                    compiled, args = compiled_step(params, state, v.loss, v.optimizer, key, x, y)
                row[f"{form}_ms"] = 1000 * seconds(compiled, *args, reps=reps)
            print(f"  T={T:2d} batch {B:3d}: vmap {row['vmap_ms']:7.0f} ms, unroll {row['unroll_ms']:7.0f} ms", flush=True)
            rows.append(row)
    return rows


def profile_step(shape, m, B, T, key, reps=3, form="unroll"):
    """Where the DT all-blocks step spends its time: XLA:CPU's own per-op trace (jax.profiler),
    each op named by the JAX primitive at its root (from the compiled HLO's metadata) and by
    pass (forward, or backward: JAX's transpose). Returns rows sorted by time, ms per step."""
    import collections, glob, gzip, re, tempfile
    (params, state), loss, opt, _ = train_steps(shape, m, T, key, 5)[f"noprop_dt_all_blocks_{form}"]
    x, y = jax.random.uniform(key, (B,) + shape), jax.random.randint(key, (B,), 0, m)
    with block_form(f"dt_{form}"):
        compiled, args = compiled_step(params, state, loss, opt, key, x, y)
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
    return {"wall_ms": 1000 * wall, "op_ms_total": total, "form": form,
            "ops": [{"pass": k[0], "primitive": k[1], "xla_op": k[2], "ms": v, "share": v / total}
                    for k, v in sorted(rows.items(), key=lambda kv: -kv[1])]}


def bench_dispatch(shape, m, B, n_steps, key):
    """One epoch of CT steps: a Python loop of one call per step (batch gathered by its own call, as
    the scripts did before) vs harness.loop.train_steps, the scripts' calls of many steps each."""
    v = variants.ct()
    (params, state), opt = v.init(key, shape, m), v.optimizer
    x = jax.random.uniform(key, (n_steps * B,) + shape)
    y = jax.random.randint(key, (n_steps * B,), 0, m)
    batches, keys = jnp.arange(n_steps * B).reshape(n_steps, B), jax.random.split(key, n_steps)
    jstep, many = loop.jit_step(v.loss, opt), loop.jit_step(v.loss, opt, loop.train_steps)
    tree, n = {"params": params, "state": state, "opt_state": opt.init(params)}, loop.steps_per_call(n_steps)
    gather = jax.jit(lambda x, y, idx: (x[idx], y[idx]))
    jax.block_until_ready(jstep(tree["params"], tree["state"], tree["opt_state"], keys[0], *gather(x, y, batches[0])))
    jax.block_until_ready(many(tree, keys[:n], batches[:n], x, y))  # compile both

    def one_per_step(tree):
        p = (tree["params"], tree["state"], tree["opt_state"])
        for i in range(n_steps):
            p = jstep(*p, keys[i], *gather(x, y, batches[i]))[:3]
            jax.block_until_ready(p)  # the progress bar's wait
        return p

    def chunks(tree):
        for i in range(0, n_steps, n):
            tree, loss, _ = many(tree, keys[i:i + n], batches[i:i + n], x, y)
            loss.block_until_ready()
        return tree

    return {"steps": n_steps, "steps_per_call": n,
            "python_loop_steps_per_s": n_steps / seconds(one_per_step, tree, reps=1, warmup=False),
            "train_steps_steps_per_s": n_steps / seconds(chunks, tree, reps=1, warmup=False)}


def predict_recompute(params, key, x, steps, variant):
    """The slow way, for comparison only: the whole network, image path included, at every step."""
    W, model = noprop.class_embeddings(params), params["model"]
    z0 = jax.random.normal(key, (x.shape[0], W.shape[1]))

    def logits(t, z):  # the barrier ties x to the step, else XLA hoists the image path out of the loop
        x_t, z = jax.lax.optimization_barrier((x, z))
        return noprop.continuous_logits(model, noprop.continuous_features(model, x_t), z, jnp.full((1,), t), x.shape[1:])

    if variant == "fm":
        return noprop.nearest_embedding(noprop.euler_chain(z0, lambda t, z: logits(t, z) @ W, steps), W)
    sched = noprop.ct_grid_schedule(params["schedule"], steps)
    u_hat = lambda t, z: jax.nn.softmax(logits(t, z)) @ W
    zT, _ = noprop.eq3_chain(key, z0, sched, u_hat, jnp.arange(steps) / steps)
    return jnp.argmax(noprop.dense(params["classifier"], zT), -1)


def bench_inference(shape, m, n_images, steps, n_slice, key, recompute=True):
    """Seconds of CT and FM inference over n_images in the scripts' chunks, and of the recomputing
    form (timed on n_slice images, scaled)."""
    params, _ = noprop.init_ct(key, shape, m)
    x = jax.random.uniform(key, (n_images,) + shape)
    rows = {}
    for variant, predict in (("ct", noprop.predict_ct), ("fm", noprop.predict_fm)):
        fast = jax.jit(functools.partial(predict, steps=steps))
        run = lambda p: evaluate.predictions(fast, p, {}, key, x, 1)  # the scripts' path, in chunks
        chunk = min(n_images, evaluate.EVAL_CHUNK)
        evaluate.predictions(fast, params, {}, key, x[:chunk], 1)  # compile the chunk shape and its helpers
        row = rows[variant] = {"images": n_images, "steps": steps, "features_once_s": seconds(run, params, reps=1, warmup=False)}
        if recompute:
            slow = jax.jit(functools.partial(predict_recompute, steps=steps, variant=variant))
            slow = slow.lower(params, key, x[:n_slice]).compile()
            t_slow = seconds(slow, params, key, x[:n_slice], reps=1, warmup=False) * n_images / n_slice
            row.update(recompute_s_scaled=t_slow, recompute_slice=n_slice, speedup=t_slow / row["features_once_s"])
        print(f"  {variant.upper()} inference, {n_images} images x {steps} steps: {row['features_once_s']:.1f} s"
              + (f", recomputing {row['recompute_s_scaled']:.0f} s" if recompute else ""), flush=True)
    return rows


def torch_or_none():
    try:  # optional: the PyTorch references, when torch is installed
        from bench import torch_ref
        import torch
        torch.set_num_threads(os.cpu_count())
        return torch_ref
    except ImportError:
        print("(pip install torch to time the PyTorch references beside ours)")
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter: fewer repetitions, 1,000 images, 100 inference steps")
    p.add_argument("--tiny", action="store_true", help="16x16 images, batch 8, T=2, and the profile too (for the test)")
    p.add_argument("--memory", action="store_true", help="only the compiled temporaries of each training step (no timing)")
    p.add_argument("--profile", action="store_true", help="only a per-op profile of the DT all-blocks step")
    p.add_argument("--scaling", action="store_true", help="only how the DT step grows with T and the batch, and "
                   "CT/FM inference with the number of steps (~15 min)")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch references even if torch is installed")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "bench.json"))
    a = p.parse_args(argv)
    key = jax.random.PRNGKey(0)
    shapes = {"tiny": ((16, 16, 1), 10)} if a.tiny else SHAPES
    B, T = (8, 2) if a.tiny else (128, 10)
    reps, n_images, steps, n_slice, epoch = (2, 64, 5, 8, 4) if a.tiny else (3, 1000, 100, 100, 60) if a.quick \
        else (5, 10000, 1000, 100, 60000 // 128)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    ode_steps = 5 if a.tiny else 1000
    out = {"machine": machine, "jax": jax.__version__, "backend": jax.default_backend(), "batch": B, "T": T}
    shape, m = next(iter(shapes.values()))
    if a.memory:
        out.update(adjoint_steps=ode_steps, train_step=bench_steps(shape, m, B, T, reps, None, key, ode_steps, memory_only=True))
        return loop.write_json(a.out, out)
    if a.profile or a.tiny:
        out["profile"] = prof = profile_step(shape, m, B, T, key)
        print(f"DT all-blocks step ({prof['form']}): {prof['wall_ms']:.0f} ms wall, {prof['op_ms_total']:.0f} ms in XLA ops (both threads)")
        for r in prof["ops"][:20]:
            print(f"{r['ms']:8.1f} ms {100 * r['share']:5.1f}%  {r['pass']:8s} {r['primitive']:28s} {r['xla_op']}")
        if a.profile:
            return loop.write_json(a.out, out)
    if a.scaling:
        out["dt_step"] = bench_scaling(shape, m, key, 2 if not a.tiny else 1, *(((1, 2), (4, 8)) if a.tiny else ()))
        out["inference"] = {str(s): bench_inference(shape, m, n_images, s, n_slice, key, recompute=False)
                            for s in ((2, 5) if a.tiny else (10, 100, 1000))}
        torch_ref = None if a.no_torch else torch_or_none()
        if torch_ref:
            add_torch(out, shapes, B, T, 1, torch_ref)
        return loop.write_json(a.out, out)
    rate = matmul_rate(256 if a.tiny else 2048, reps)
    out.update(quick=a.quick, tiny=a.tiny, matmul_gflop_per_s=rate / 1e9, train_step={})
    print(f"machine: {machine}, jax {jax.__version__}; float32 matmul {rate / 1e9:.0f} GFLOP/s")
    save = functools.partial(loop.write_json, a.out, out)
    for name, (shape, m) in shapes.items():
        print(f"training steps, {name}, batch {B}, T = {T}:")
        only = None if name in ("MNIST", "tiny") else CIFAR_ROWS
        bench_steps(shape, m, B, T, reps, rate, key, ode_steps, only=only, rows=out["train_step"].setdefault(name, {}), save=save)
    s = out["train_step"][next(iter(shapes))]
    out["ratios"] = {
        "all_blocks_vs_ten_one_block_steps": s["noprop_dt_all_blocks_unroll"]["ms_per_step"] / (T * s["noprop_dt_one_block"]["ms_per_step"]),
        "one_block_temp_vs_backprop_temp": s["noprop_dt_one_block"]["temp_mb"] / s["backprop_unroll"]["temp_mb"]}
    shape, m = next(iter(shapes.values()))
    out["dispatch"] = bench_dispatch(shape, m, B, epoch, key)
    save()
    out["inference"] = {"features_once": bench_inference(shape, m, n_images, steps, n_slice, key)}
    save()
    torch_ref = None if a.no_torch else torch_or_none()
    if torch_ref:
        add_torch(out, shapes, B, T, reps, torch_ref)
    d, r = out["dispatch"], out["ratios"]
    print(f"all-blocks step / ten one-block steps: {r['all_blocks_vs_ten_one_block_steps']:.2f}x; "
          f"one-block temporaries / backprop's: {100 * r['one_block_temp_vs_backprop_temp']:.0f}%")
    print(f"dispatch, {d['steps']} CT steps: one call per step {d['python_loop_steps_per_s']:.2f} steps/s, "
          f"{d['steps_per_call']} steps per call {d['train_steps_steps_per_s']:.2f} steps/s")
    return loop.write_json(a.out, out)


if __name__ == "__main__":
    main()
