"""Time one optimizer call of mindspore_lamb.Lamb against nn.Adam and nn.AdamWeightDecay.

Parameter sets (fixed random parameters and gradients, float32):

* ``base``:  BERT-base shapes, ~110M parameters in 199 tensors.
* ``large``: BERT-large shapes (24 layers, hidden 1024, FFN 4096), ~335M parameters in 391 tensors.
* ``small``: 400 small tensors (200 x (64x64 weight + 64 bias)); here the figure that matters is the
  compile time, also of a whole train step (TrainOneStepCell of a 200-Dense net + MSE) per optimizer.

For each set a child process builds ONE set of parameters and gradients shared by all optimizers (each
optimizer keeps its own moments), then interleaves the optimizers call by call (GRAPH_MODE, or
PYNATIVE_MODE with --mode pynative): round r calls Lamb, Adam, AdamWeightDecay (rotated each round),
each call followed by ``_timing.wait()`` (its work is done, in PYNATIVE_MODE too). Reported: the median
per optimizer, the ratio to nn.Adam's median, the compile time (first call minus the steady-state
median), and the CPU time per call of each of the process's threads (by name) during that optimizer's
calls. Peak memory is measured in separate child processes, one per optimizer (in the same mode): RSS
after building parameters, gradients and the optimizer (its moments), and the peak RSS (ru_maxrss)
after a few calls; "extra" = peak - that, as a multiple of the parameter bytes. The moments are
allocated lazily (at the first call), so every optimizer's "extra" includes its moments and the
runtime's own buffers: compare with nn.Adam's ("-Adam" column; target <= 1.0, one float32
buffer of the parameters' size).

Run:  python benchmarks/bench_step.py [--sets base,large,small] [--repeats 15] [--no-mem] [--mode pynative]
             [--mu-dtype bfloat16] [--optim-bits 8] [--opts Lamb,Lamb-8bit,Adam]
``--opts`` may also name ``Lamb-8bit`` (and ``Lamb-8bit-composite``): ``Lamb(optim_bits=8)`` timed in the same
command as float32 ``Lamb`` (``--optim-bits 8`` makes every Lamb 8-bit instead).
A tiny learning rate keeps the parameters finite for all calls (so Lamb never takes its skip branch).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("GLOG_v", "3")

from _timing import wait  # noqa: E402  (the script's folder is on sys.path)

OPTIMIZERS = ("Lamb", "Adam", "AdamWeightDecay")


# ---------------------------------------------------------------- parameter sets

def bert_shapes(layers, hidden, ffn, vocab=30522, positions=512, types=2):
    shapes = [("embeddings.word_embeddings.embedding_table", (vocab, hidden)),
              ("embeddings.position_embeddings.embedding_table", (positions, hidden)),
              ("embeddings.token_type_embeddings.embedding_table", (types, hidden)),
              ("embeddings.layernorm.gamma", (hidden,)), ("embeddings.layernorm.beta", (hidden,))]
    for i in range(layers):
        p = f"encoder.layer{i}."
        for name in ("query", "key", "value", "output"):
            shapes += [(p + f"attention.{name}.weight", (hidden, hidden)), (p + f"attention.{name}.bias", (hidden,))]
        shapes += [(p + "attention.layernorm.gamma", (hidden,)), (p + "attention.layernorm.beta", (hidden,))]
        shapes += [(p + "intermediate.weight", (ffn, hidden)), (p + "intermediate.bias", (ffn,))]
        shapes += [(p + "output.weight", (hidden, ffn)), (p + "output.bias", (hidden,))]
        shapes += [(p + "output.layernorm.gamma", (hidden,)), (p + "output.layernorm.beta", (hidden,))]
    shapes += [("pooler.weight", (hidden, hidden)), ("pooler.bias", (hidden,))]
    return shapes


def small_shapes(n_layers=200, width=64):
    shapes = []
    for i in range(n_layers):
        shapes += [(f"net.{i}.weight", (width, width)), (f"net.{i}.bias", (width,))]
    return shapes


SETS = {"base": lambda: bert_shapes(12, 768, 3072),
        "large": lambda: bert_shapes(24, 1024, 4096),
        "small": small_shapes}


def build(set_name, seed=0):
    import numpy as np
    from mindspore import Parameter, Tensor
    rng = np.random.default_rng(seed)
    params, grads = [], []
    for name, shape in SETS[set_name]():
        w = (rng.random(shape, dtype=np.float32) - 0.5) * 0.04
        if name.endswith("gamma"):
            w += 1.0
        g = (rng.random(shape, dtype=np.float32) - 0.5) * 1e-3
        params.append(Parameter(Tensor(w), name=name))
        grads.append(Tensor(g))
        del w, g
    return params, tuple(grads)


def make_optimizer(kind, params):
    from mindspore import nn
    # --mu-dtype: the first moment of every Lamb stored in that dtype (LAMB_BENCH_MU_DTYPE for the children)
    mu_dtype = os.environ.get("LAMB_BENCH_MU_DTYPE") or None
    # --optim-bits: 8 stores the moments of every Lamb in 8 bits (LAMB_BENCH_OPTIM_BITS for the children)
    optim_bits = int(os.environ.get("LAMB_BENCH_OPTIM_BITS") or 32)
    if kind == "Lamb":
        from mindspore_lamb import Lamb
        return Lamb(params, learning_rate=1e-7, weight_decay=0.01, mu_dtype=mu_dtype, optim_bits=optim_bits)
    if kind == "Lamb-exact":            # exact_skip=True: the gradient pre-pass (4 more bytes an element)
        from mindspore_lamb import Lamb
        return Lamb(params, learning_rate=1e-7, weight_decay=0.01, exact_skip=True, mu_dtype=mu_dtype,
                    optim_bits=optim_bits)
    if kind == "Lamb-composite":        # the portable composite graph (the path of GPU/Ascend/float16)
        from mindspore_lamb import Lamb
        return Lamb(params, learning_rate=1e-7, weight_decay=0.01, mu_dtype=mu_dtype, optim_bits=optim_bits,
                    backend="composite")
    if kind in ("Lamb-8bit", "Lamb-8bit-composite"):   # optim_bits=8 beside float32 Lamb in the same command
        from mindspore_lamb import Lamb
        return Lamb(params, learning_rate=1e-7, weight_decay=0.01, optim_bits=8,
                    backend="composite" if kind.endswith("composite") else None)
    if kind == "Adam":
        return nn.Adam(params, learning_rate=1e-7)
    if kind == "AdamWeightDecay":
        return nn.AdamWeightDecay(params, learning_rate=1e-7, weight_decay=0.01)
    if kind == "AdamWeightDecay-composite":   # MindSpore's own composite graph (_adam_opt), not P.AdamWeightDecay
        opt = nn.AdamWeightDecay(params, learning_rate=1e-7, weight_decay=0.01)
        opt.use_fused_opt = False              # MindSpore 2.10: read by construct when it compiles
        return opt
    if kind.startswith("bench:"):       # a prototype in benchmarks/, e.g. bench:proto_lamb.FusedLamb
        import importlib
        mod, cls = kind[len("bench:"):].rsplit(".", 1)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return getattr(importlib.import_module(mod), cls)(params, learning_rate=1e-7, weight_decay=0.01)
    raise ValueError(kind)


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call(opt, grads):
    t0 = time.perf_counter()
    opt(grads)
    wait()
    return time.perf_counter() - t0


def _thread_cpu():
    """{thread id: (name, CPU seconds)} of this process's threads (Linux /proc; {} elsewhere). The main
    thread is named "main"; MindSpore's and OpenMP's threads keep their names (OpenMP workers inherit
    the name of the thread that started them)."""
    import threading
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:            # the thread ended
            continue
        name = "main" if int(tid) == threading.get_native_id() else name
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _add_cpu(into, before, after):
    """Add each thread's CPU seconds between two _thread_cpu() snapshots to `into` (by thread name)."""
    for tid, (name, sec) in after.items():
        into[name] = into.get(name, 0.0) + sec - before.get(tid, (name, 0.0))[1]


def _warm_up_runtime():
    """Compile and run something unrelated, so the first optimizer's compile time excludes start-up."""
    import numpy as np
    from mindspore import nn, Tensor
    net = nn.Dense(4, 4)
    opt = nn.SGD(net.trainable_params(), 0.1)
    opt(tuple(Tensor(np.ones(p.shape, np.float32)) for p in net.trainable_params()))
    wait()


# ---------------------------------------------------------------- children

DEVICE = os.environ.get("LAMB_BENCH_DEVICE", "CPU")   # --device sets it for the children


def child_time(set_name, repeats, kinds, mode="graph"):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE, device_target=DEVICE)
    _warm_up_runtime()
    params, grads = build(set_name)
    n_elems = sum(p.size for p in params)
    opts = {k: make_optimizer(k, params) for k in kinds}
    first = {}
    for k in kinds:                                   # first call = compile + one step
        first[k] = _call(opts[k], grads)
    for k in kinds:                                   # one more warm-up each
        _call(opts[k], grads)
    times = {k: [] for k in kinds}
    cpu = {k: {} for k in kinds}                      # CPU seconds by thread name, during k's calls
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            before = _thread_cpu()
            times[k].append(_call(opts[k], grads))
            _add_cpu(cpu[k], before, _thread_cpu())
    out = {"set": set_name, "n_params": len(params), "n_elems": n_elems, "results": {}}
    for k in kinds:
        med = statistics.median(times[k])
        out["results"][k] = {"median_s": med, "min_s": min(times[k]), "first_s": first[k],
                             "compile_s": first[k] - med, "times": times[k],
                             "cpu_per_call_s": {name: sec / repeats for name, sec in cpu[k].items()}}
    if "Lamb" in kinds:
        for k in kinds:
            if hasattr(opts[k], "skipped_steps"):
                out["results"][k]["skipped_steps"] = opts[k].skipped_steps
    return out


def child_mem(set_name, kind, mode="graph", calls=3):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE, device_target=DEVICE)
    params, grads = build(set_name)
    param_mib = sum(p.size for p in params) * 4 / 2**20
    opt = make_optimizer(kind, params) if kind != "none" else None
    wait()
    before = _rss_mib()
    if opt is not None:
        for _ in range(calls):
            _call(opt, grads)
    if DEVICE != "CPU":   # device memory: the peak the runtime allocated (parameters, moments, buffers)
        peak = ms.runtime.max_memory_allocated() / 2**20
        return {"set": set_name, "opt": kind, "param_mib": param_mib, "rss_before_mib": 0.0, "peak_mib": peak,
                "extra_mib": peak - param_mib * 2, "extra_over_params": (peak - param_mib * 2) / param_mib}
    return {"set": set_name, "opt": kind, "param_mib": param_mib, "rss_before_mib": before,
            "peak_mib": _peak_mib(), "extra_mib": _peak_mib() - before,
            "extra_over_params": (_peak_mib() - before) / param_mib}


def child_train_compile(kind, repeats=1):
    """Compile time of a whole train step (200 x Dense(64, 64) + MSE, 400 parameters): first call - steady."""
    import numpy as np
    import mindspore as ms
    from mindspore import nn, Tensor
    ms.set_context(mode=ms.GRAPH_MODE, device_target=DEVICE)
    _warm_up_runtime()
    res = []
    for _ in range(repeats):
        net = nn.SequentialCell([nn.Dense(64, 64) for _ in range(200)])
        step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), make_optimizer(kind, net.trainable_params()))
        x = Tensor(np.ones((8, 64), np.float32) * 0.01)
        y = Tensor(np.zeros((8, 64), np.float32))
        t0 = time.perf_counter(); step(x, y); wait(); first = time.perf_counter() - t0
        steady = []
        for _ in range(5):
            t0 = time.perf_counter(); step(x, y); wait(); steady.append(time.perf_counter() - t0)
        res.append(first - statistics.median(steady))
    return {"opt": kind, "train_compile_s": min(res), "all": res}


PEER = "AdamWeightDecay-composite"   # the fair peer of the composite backend: MindSpore's own composite graph


def composite_bars(lamb, peer):
    """The composite backend against MindSpore's composite AdamWeightDecay: call time (median of the paired
    ratios, bar 1.3) and first call, compile + run (bar 2.0)."""
    paired = statistics.median(x / y for x, y in zip(lamb["times"], peer["times"]))
    print(f"composite Lamb / composite AdamWeightDecay: call {paired:.2f} (median of paired ratios; medians "
          f"{lamb['median_s'] * 1e3:.0f} / {peer['median_s'] * 1e3:.0f} ms; bar 1.3), first call "
          f"{lamb['first_s'] / peer['first_s']:.2f} ({lamb['first_s']:.1f} / {peer['first_s']:.1f} s; bar 2.0)")


def _run_child(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"child {args} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="base,small", help="comma list of base,large,small (default base,small)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per optimizer (after 2 warm-up calls)")
    ap.add_argument("--opts", default=",".join(OPTIMIZERS),
                    help="optimizers, comma list of Lamb (fused on CPU), Lamb-exact (exact_skip=True), "
                         "Lamb-composite, Adam, AdamWeightDecay, AdamWeightDecay-composite; "
                         "'bench:module.Class' loads a prototype from benchmarks/")
    ap.add_argument("--no-mem", action="store_true", help="skip the per-optimizer peak-memory children")
    ap.add_argument("--mode", choices=("graph", "pynative"), default="graph",
                    help="MindSpore execution mode of the timed calls and of the memory children (default graph)")
    ap.add_argument("--device", choices=("CPU", "GPU", "Ascend"), default="CPU",
                    help="device target (default CPU); on GPU, memory is the device's peak allocation, "
                         "'extra' is that minus parameters and gradients")
    ap.add_argument("--mu-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                    help="Lamb(mu_dtype=...): the dtype its first moment is stored in (default float32)")
    ap.add_argument("--optim-bits", type=int, choices=(32, 8), default=32,
                    help="Lamb(optim_bits=...): 8 stores both moments of each large tensor in 8 bits (default 32)")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        what = a.child[0]
        if what == "time":
            res = child_time(a.child[1], int(a.child[2]), a.child[3].split(","), a.child[4])
        elif what == "mem":
            res = child_mem(a.child[1], a.child[2], a.child[3])
        elif what == "train":
            res = child_train_compile(a.child[1])
        print(json.dumps(res))
        return

    os.environ["LAMB_BENCH_DEVICE"] = a.device
    os.environ["LAMB_BENCH_MU_DTYPE"] = a.mu_dtype or ""
    os.environ["LAMB_BENCH_OPTIM_BITS"] = str(a.optim_bits)
    kinds = a.opts.split(",")
    ref = "Adam" if "Adam" in kinds else kinds[0]
    import platform
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import cpu_header
    print(cpu_header())
    print(f"# python {platform.python_version()}; {a.mode} mode on {a.device}; Lamb mu_dtype "
          f"{a.mu_dtype or 'float32'}, optim_bits {a.optim_bits}; {time.strftime('%Y-%m-%d %H:%M')}")
    all_res = []
    for set_name in a.sets.split(","):
        t = _run_child(["time", set_name, str(a.repeats), ",".join(kinds), a.mode])
        all_res.append(t)
        print(f"\n== set {set_name}: {t['n_params']} tensors, {t['n_elems'] / 1e6:.1f}M parameters, "
              f"{a.repeats} interleaved calls each")
        print(f"{'optimizer':<34}{'median ms':>10}{'min ms':>9}{'x Adam':>8}{'paired':>8}{'compile s':>10}"
              f"{'x AdamWD':>9}")
        rr = t["results"]
        for k in kinds:
            r = rr[k]
            cr = r["compile_s"] / rr["AdamWeightDecay"]["compile_s"] if "AdamWeightDecay" in rr else float("nan")
            # paired: median over rounds of (this call / the reference's call of the same round)
            paired = statistics.median(x / y for x, y in zip(r["times"], rr[ref]["times"]))
            print(f"{k:<34}{r['median_s'] * 1e3:>10.1f}{r['min_s'] * 1e3:>9.1f}"
                  f"{r['median_s'] / rr[ref]['median_s']:>8.2f}{paired:>8.2f}{r['compile_s']:>10.2f}{cr:>9.2f}")
        if "Lamb-composite" in rr and PEER in rr:
            composite_bars(rr["Lamb-composite"], rr[PEER])
        print("CPU time per call, by thread (in PYNATIVE_MODE a compiled step runs on frontend_queue or ActorThread:"
              " CPU time of the main thread beside it there is a busy wait):")
        for k in kinds:
            busy = sorted(rr[k]["cpu_per_call_s"].items(), key=lambda item: -item[1])
            print(f"  {k:<32}" + ", ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in busy if sec >= 0.0005))
        if set_name == "small":
            tr = {k: _run_child(["train", k]) for k in kinds}
            all_res.append({"set": "small-train-step", "results": tr})
            base = tr.get("AdamWeightDecay", tr[kinds[0]])["train_compile_s"]
            print("train-step compile (TrainOneStepCell, 200 x Dense(64,64), 400 params):")
            for k in kinds:
                print(f"  {k:<32}{tr[k]['train_compile_s']:>8.2f} s  x AdamWD {tr[k]['train_compile_s'] / base:.2f}")
        if not a.no_mem:
            mems = {k: _run_child(["mem", set_name, k, a.mode]) for k in kinds}
            all_res.append({"set": set_name + "-mem", "results": mems})
            print("peak memory (separate process per optimizer; extra = peak RSS - RSS after construction):")
            for k in kinds:
                m = mems[k]
                vs = (f"  (-Adam: {(m['extra_mib'] - mems['Adam']['extra_mib']) / m['param_mib']:+.2f} x params)"
                      if "Adam" in mems else "")
                print(f"  {k:<32} params {m['param_mib']:>7.0f} MiB  after-construct {m['rss_before_mib']:>7.0f} MiB"
                      f"  peak {m['peak_mib']:>7.0f} MiB  extra {m['extra_mib']:>7.0f} MiB"
                      f" = {m['extra_over_params']:.2f} x params{vs}")
            if "Lamb-composite" in mems and PEER in mems and "Adam" in mems:
                over = {k: (mems[k]["extra_mib"] - mems["Adam"]["extra_mib"]) / mems[k]["param_mib"]
                        for k in ("Lamb-composite", PEER)}
                print(f"  composite Lamb's extra memory beyond nn.Adam's: {over['Lamb-composite']:+.2f} x params, "
                      f"composite AdamWeightDecay's {over[PEER]:+.2f} x params (bar: no more)")
        sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(all_res, f, indent=1)


if __name__ == "__main__":
    main()
