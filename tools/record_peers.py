"""Record golden LAMB trajectories of other libraries ("peers") on one fixed problem.

Each recorder runs one library's own LAMB optimizer, with that library's defaults, on the
problem built by :func:`problem` (5 float32 parameters, 20 steps of fixed gradients, linear lr
decay ``lr_s = 0.01 * (1 - s / 20)``, betas 0.9/0.999, eps 1e-6) for two weight decays, 0.0 and
0.01, and saves the result to ``tests/fixtures/peers/<name>.npz``.  A recorder needs only numpy
and its own library, so each one runs in that library's virtual environment::

    python tools/record_peers.py --list            # recorders and what each needs
    $V/timm/bin/python tools/record_peers.py timm  # V: where the venvs live, see below
    python tools/record_peers.py --check           # numpy only: compare the fixtures with the
                                                   # float64 re-implementations below

The .npz keys (all float32 except ``meta``)::

    init/<param>            initial value
    grad/<param>            (20, *shape) gradient fed at each step
    lr                      (20,) learning rate of each step, 0.01 * (1 - s / 20)
    wd0/<param>             (20, *shape) parameter after each step, weight decay 0.0
    wd0.01/<param>          (20, *shape) parameter after each step, weight decay 0.01
    meta                    strings: library, version, python, defaults, lr schedule mechanism

Recording all of them (venvs live outside the repository; CPU builds only, one at a time;
torch is installed first, pinned, so that timm / torch-optimizer do not pull a CUDA build)::

    V=$HOME/peer_venvs                          # anywhere outside the repository
    python3.11 -m venv $V/optax  && $V/optax/bin/pip install numpy jax jaxlib optax
    python3.11 -m venv $V/timm   && $V/timm/bin/pip install numpy torch==2.13.0 \\
        && $V/timm/bin/pip install timm torch-optimizer torch==2.13.0
    ln -sfn $V/timm $V/torch_optimizer          # torch-optimizer shares the torch venv
    python3.11 -m venv $V/keras  && $V/keras/bin/pip install numpy jax jaxlib keras
    python3.11 -m venv $V/paddle && $V/paddle/bin/pip install numpy paddlepaddle
    python3.11 -m venv $V/tfa    && $V/tfa/bin/pip install tensorflow-addons \\
        'tensorflow-cpu>=2.13,<2.16'
    for lib in optax timm torch_optimizer keras paddle tfa; do
        $V/$lib/bin/python tools/record_peers.py $lib || echo "FAILED: $lib"
    done
    python tools/record_peers.py --check

Note on timm: the torchvision wheel on PyPI is built against CUDA torch and does not load next
to the CPU torch; ``import timm`` then fails.  The timm recorder then loads ``timm/optim/lamb.py``
(which imports only torch and its two sibling helper modules) without running ``timm/__init__``;
the optimizer code executed is the same, and ``meta`` says that this was done.

8-bit optimizers (recorders ``bnb``: bitsandbytes' LAMB8bit, LAMB, AdamW8bit and AdamW; ``torchao``:
torchao's AdamW8bit) run on another problem, :func:`problem_8bit` (a 64x64 weight, so that both libraries
store its moments in 8 bits, and a 64-element bias; 8 steps; lr 0.01; weight decay 0.01), in one venv::

    python3.11 -m venv $V/bnb && $V/bnb/bin/pip install numpy torch==2.13.0 \\
        && $V/bnb/bin/pip install bitsandbytes==0.50.2 torchao==0.18.0 torch==2.13.0
    $V/bnb/bin/python tools/record_peers.py bnb torchao

Their .npz keys: ``init/<param>``, ``grad/<param>`` (float16: the gradients are float16 values), and per
optimizer ``<opt>/ratio`` ((8, 2): ``||dw|| / (lr ||w||)`` of each parameter at each step),
``<opt>/sample/dense.weight`` (its first 128 elements after each step), ``<opt>/traj/dense.bias``,
``<opt>/final/<param>`` and ``<opt>/quantized`` (the parameters whose state holds 8-bit tensors); ``meta``.
tests/test_peers_8bit.py compares them with ``Lamb(optim_bits=8)``.

The ``--check`` mode re-implements, in float64 NumPy, the exact per-step formula of each
library (read from its installed source) and the paper's Algorithm 2, and prints the maximum
relative deviation of every recorded trajectory from both.
"""

import argparse
import os
import platform
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "peers")

NAMES = ("dense.weight", "dense.bias", "norm.gamma", "norm.beta", "zero.weight")
SHAPES = {"dense.weight": (8, 16), "dense.bias": (16,), "norm.gamma": (16,),
          "norm.beta": (16,), "zero.weight": (4, 4)}
GRAD_SCALES = {"dense.weight": 1.0, "dense.bias": 0.3, "norm.gamma": 0.2,
               "norm.beta": 0.2, "zero.weight": 1.0}
STEPS = 20
LR0 = 0.01
BETA1, BETA2, EPS = 0.9, 0.999, 1e-6
WEIGHT_DECAYS = (("wd0", 0.0), ("wd0.01", 0.01))


def lr_at(s):
    """Learning rate of the s-th update (0-based): linear decay from 0.01 towards 0."""
    return LR0 * (1.0 - s / STEPS)


def problem():
    """The inputs shared by every recorder, built deterministically with numpy (float32)."""
    rng = np.random.default_rng(0)
    init = {
        "dense.weight": (rng.standard_normal((8, 16)) * 0.5).astype(np.float32),
        "dense.bias": (rng.standard_normal((16,)) * 0.05).astype(np.float32),
        "norm.gamma": np.ones((16,), np.float32),
        "norm.beta": np.zeros((16,), np.float32),
        "zero.weight": np.zeros((4, 4), np.float32),
    }
    rng2 = np.random.default_rng(1)
    grads = {n: np.empty((STEPS,) + SHAPES[n], np.float32) for n in NAMES}
    for s in range(STEPS):
        for n in NAMES:
            grads[n][s] = (rng2.standard_normal(SHAPES[n]) * GRAD_SCALES[n]).astype(np.float32)
    lr = np.array([lr_at(s) for s in range(STEPS)], np.float32)
    return {"init": init, "grads": grads, "lr": lr}


def _new_traj():
    return {n: np.empty((STEPS,) + SHAPES[n], np.float32) for n in NAMES}


# --------------------------------------------------------------------------------------------
# Recorders: each returns {"trajs": {"wd0": {...}, "wd0.01": {...}}, "meta": [str, ...]}.
# --------------------------------------------------------------------------------------------

def record_optax(prob):
    import jax
    import jax.numpy as jnp
    import optax

    trajs = {}
    for key, wd in WEIGHT_DECAYS:
        schedule = optax.linear_schedule(init_value=LR0, end_value=0.0, transition_steps=STEPS)
        opt = optax.lamb(learning_rate=schedule, b1=BETA1, b2=BETA2, eps=EPS, weight_decay=wd)
        params = {n: jnp.asarray(prob["init"][n]) for n in NAMES}
        state = opt.init(params)
        out = _new_traj()
        for s in range(STEPS):
            grads = {n: jnp.asarray(prob["grads"][n][s]) for n in NAMES}
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            for n in NAMES:
                out[n][s] = np.asarray(params[n])
        trajs[key] = out
    return {"trajs": trajs, "meta": [
        "library=optax", "version=%s" % optax.__version__, "jax=%s" % jax.__version__,
        "defaults=optax.lamb: eps_root=0.0, mask=None (weight decay and trust ratio on every "
        "leaf); chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio(min_norm=0, "
        "trust_coefficient=1, eps=0), scale_by_learning_rate)",
        "lr_schedule=optax.linear_schedule(0.01, 0.0, 20) passed as learning_rate",
    ]}


def _torch_setup():
    import torch
    torch.set_num_threads(1)
    return torch


def _run_torch(opt_factory, prob):
    torch = _torch_setup()
    trajs = {}
    for key, wd in WEIGHT_DECAYS:
        params = [torch.nn.Parameter(torch.tensor(prob["init"][n])) for n in NAMES]
        opt = opt_factory(params, wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS)
        out = _new_traj()
        for s in range(STEPS):
            for p, n in zip(params, NAMES):
                p.grad = torch.tensor(prob["grads"][n][s])
            opt.step()
            sched.step()
            for p, n in zip(params, NAMES):
                out[n][s] = p.detach().numpy()
        trajs[key] = out
    return trajs


def _import_timm_lamb():
    try:
        from timm.optim import Lamb
        return Lamb, "import=timm.optim.Lamb"
    except Exception as exc:  # a CUDA-only torchvision wheel next to the CPU torch
        import importlib
        import importlib.util
        import types
        for mod in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[mod]
        spec = importlib.util.find_spec("timm")
        if spec is None:
            raise
        root = os.path.dirname(spec.origin)
        pkg = types.ModuleType("timm")
        pkg.__path__ = [root]
        sys.modules["timm"] = pkg
        sub = types.ModuleType("timm.optim")
        sub.__path__ = [os.path.join(root, "optim")]
        sys.modules["timm.optim"] = sub
        lamb = importlib.import_module("timm.optim.lamb")
        why = ("%s: %s" % (type(exc).__name__, exc)).splitlines()[0]
        return lamb.Lamb, ("import=timm/optim/lamb.py loaded without timm/__init__.py "
                           "because 'import timm' failed (%s)" % why)


def record_timm(prob):
    from importlib.metadata import version
    torch = _torch_setup()
    Lamb, how = _import_timm_lamb()
    trajs = _run_torch(lambda params, wd: Lamb(params, lr=LR0, betas=(BETA1, BETA2), eps=EPS,
                                               weight_decay=wd), prob)
    return {"trajs": trajs, "meta": [
        "library=timm", "version=%s" % version("timm"), "torch=%s" % torch.__version__, how,
        "defaults=timm.optim.Lamb: bias_correction=True, grad_averaging=True, "
        "max_grad_norm=1.0 (global clip), trust_clip=False, always_adapt=False, caution=False, "
        "decoupled_decay=False, corrected_weight_decay=False, foreach=None (single-tensor "
        "path on CPU)",
        "lr_schedule=torch.optim.lr_scheduler.LambdaLR(lambda s: 1 - s/20), lr=0.01",
    ]}


def record_torch_optimizer(prob):
    from importlib.metadata import version
    torch = _torch_setup()
    import torch_optimizer
    trajs = _run_torch(lambda params, wd: torch_optimizer.Lamb(
        params, lr=LR0, betas=(BETA1, BETA2), eps=EPS, weight_decay=wd), prob)
    return {"trajs": trajs, "meta": [
        "library=torch_optimizer", "version=%s" % version("torch-optimizer"),
        "torch=%s" % torch.__version__,
        "defaults=torch_optimizer.Lamb: clamp_value=10 (||w|| clamped to [0, 10]), "
        "adam=False, debias=False (no bias correction)",
        "lr_schedule=torch.optim.lr_scheduler.LambdaLR(lambda s: 1 - s/20), lr=0.01",
    ]}


def record_keras(prob):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    trajs = {}
    for key, wd in WEIGHT_DECAYS:
        schedule = keras.optimizers.schedules.PolynomialDecay(
            initial_learning_rate=LR0, decay_steps=STEPS, end_learning_rate=0.0, power=1.0)
        opt = keras.optimizers.Lamb(learning_rate=schedule, beta_1=BETA1, beta_2=BETA2,
                                    epsilon=EPS, weight_decay=wd)
        variables = [keras.Variable(prob["init"][n], dtype="float32", name=n.replace(".", "_"))
                     for n in NAMES]
        out = _new_traj()
        for s in range(STEPS):
            grads = [keras.ops.convert_to_tensor(prob["grads"][n][s]) for n in NAMES]
            opt.apply_gradients(zip(grads, variables))
            for v, n in zip(variables, NAMES):
                out[n][s] = keras.ops.convert_to_numpy(v.value)
        trajs[key] = out
    return {"trajs": trajs, "meta": [
        "library=keras", "version=%s" % keras.__version__,
        "backend=%s" % keras.backend.backend(),
        "defaults=keras.optimizers.Lamb: clipnorm=clipvalue=global_clipnorm=None, "
        "use_ema=False, loss_scale_factor=None, gradient_accumulation_steps=None; weight_decay "
        "is the base-optimizer decoupled decay w -= lr*wd*w applied before update_step, to all "
        "variables (no exclude_from_weight_decay)",
        "lr_schedule=keras.optimizers.schedules.PolynomialDecay(0.01, 20, 0.0, power=1) as "
        "learning_rate",
    ]}


def record_paddle(prob):
    import paddle
    paddle.set_device("cpu")

    trajs = {}
    for key, wd in WEIGHT_DECAYS:
        params = [paddle.create_parameter(
            list(SHAPES[n]), "float32",
            default_initializer=paddle.nn.initializer.Assign(prob["init"][n])) for n in NAMES]
        sched = paddle.optimizer.lr.LambdaDecay(learning_rate=LR0,
                                                lr_lambda=lambda e: 1.0 - e / STEPS)
        opt = paddle.optimizer.Lamb(learning_rate=sched, lamb_weight_decay=wd, beta1=BETA1,
                                    beta2=BETA2, epsilon=EPS, parameters=params)
        out = _new_traj()
        for s in range(STEPS):
            # d/dp sum(p * g) == g exactly: the gradient fed is the given array.
            loss = None
            for p, n in zip(params, NAMES):
                term = (p * paddle.to_tensor(prob["grads"][n][s])).sum()
                loss = term if loss is None else loss + term
            loss.backward()
            opt.step()
            opt.clear_grad()
            sched.step()
            for p, n in zip(params, NAMES):
                out[n][s] = p.numpy()
        trajs[key] = out
    return {"trajs": trajs, "meta": [
        "library=paddle", "version=%s" % paddle.__version__,
        "defaults=paddle.optimizer.Lamb: exclude_from_weight_decay_fn=None, grad_clip=None, "
        "multi_precision=False, always_adapt=False (no trust ratio where lamb_weight_decay == "
        "0); gradients fed through loss = sum_i sum(p_i * g_i)",
        "lr_schedule=paddle.optimizer.lr.LambdaDecay(0.01, lambda e: 1 - e/20), "
        "scheduler.step() after each optimizer step",
    ]}


def record_tfa(prob):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tensorflow_addons as tfa

    trajs = {}
    for key, wd in WEIGHT_DECAYS:
        schedule = tf.keras.optimizers.schedules.PolynomialDecay(
            initial_learning_rate=LR0, decay_steps=STEPS, end_learning_rate=0.0, power=1.0)
        opt = tfa.optimizers.LAMB(learning_rate=schedule, beta_1=BETA1, beta_2=BETA2,
                                  epsilon=EPS, weight_decay=wd)
        variables = [tf.Variable(prob["init"][n], dtype=tf.float32, name=n.replace(".", "_"))
                     for n in NAMES]
        out = _new_traj()
        for s in range(STEPS):
            grads = [tf.constant(prob["grads"][n][s]) for n in NAMES]
            opt.apply_gradients(zip(grads, variables))
            for v, n in zip(variables, NAMES):
                out[n][s] = v.numpy()
        trajs[key] = out
    return {"trajs": trajs, "meta": [
        "library=tfa", "version=%s" % tfa.__version__, "tensorflow=%s" % tf.__version__,
        "defaults=tensorflow_addons.optimizers.LAMB: exclude_from_weight_decay=None, "
        "exclude_from_layer_adaptation=None (weight decay and trust ratio on every variable)",
        "lr_schedule=tf.keras.optimizers.schedules.PolynomialDecay(0.01, 20, 0.0, power=1) as "
        "learning_rate",
    ]}


RECORDERS = {
    "optax": (record_optax, "pip install numpy jax jaxlib optax"),
    "timm": (record_timm, "pip install numpy torch==2.13.0; pip install timm torch==2.13.0"),
    "torch_optimizer": (record_torch_optimizer,
                        "pip install numpy torch==2.13.0; pip install torch-optimizer "
                        "torch==2.13.0"),
    "keras": (record_keras, "pip install numpy jax jaxlib keras (KERAS_BACKEND=jax)"),
    "paddle": (record_paddle, "pip install numpy paddlepaddle"),
    "tfa": (record_tfa, "pip install tensorflow-addons 'tensorflow-cpu>=2.13,<2.16' "
                        "(Python <= 3.11)"),
}


# --------------------------------------------------------------------------------------------
# 8-bit state: a problem where bitsandbytes really quantizes (its min_8bit_size is 4096: a
# 64x64 weight), recorded into tests/fixtures/peers/<name>.npz for tests/test_peers_8bit.py.
# --------------------------------------------------------------------------------------------

NAMES_8BIT = ("dense.weight", "dense.bias")
SHAPES_8BIT = {"dense.weight": (64, 64), "dense.bias": (64,)}
STEPS_8BIT = 8
LR_8BIT, WD_8BIT = 0.01, 0.01     # constant learning rate, decoupled weight decay on both parameters
SAMPLE_8BIT = 128                 # elements of dense.weight kept after every step (all after the last)


def problem_8bit():
    """Initial values and gradients (float16 values, exact in float32: the fixture stores them as
    float16) whose magnitudes spread over decades within every block of 256, as 8-bit codes find
    hardest."""
    rng = np.random.default_rng(8)
    init = {"dense.weight": (rng.standard_normal((64, 64)) * 0.5).astype(np.float32),
            "dense.bias": (rng.standard_normal((64,)) * 0.05).astype(np.float32)}
    grads = {n: (rng.standard_normal((STEPS_8BIT,) + SHAPES_8BIT[n])
                 * np.exp(1.5 * rng.standard_normal((STEPS_8BIT,) + SHAPES_8BIT[n])))
             .astype(np.float16).astype(np.float32) for n in NAMES_8BIT}
    return {"init": init, "grads": grads}


def _record_torch_8bit(factories, prob):
    """{optimizer: {"ratio": (steps, layers) ||dw|| / (lr ||w||), "sample": ..., "final": ...}}."""
    torch = _torch_setup()
    runs = {}
    for label, factory in factories.items():
        params = [torch.nn.Parameter(torch.tensor(prob["init"][n])) for n in NAMES_8BIT]
        opt = factory(params)
        ratio = np.empty((STEPS_8BIT, len(NAMES_8BIT)))
        sample = np.empty((STEPS_8BIT, SAMPLE_8BIT), np.float32)
        bias = np.empty((STEPS_8BIT,) + SHAPES_8BIT["dense.bias"], np.float32)
        for s in range(STEPS_8BIT):
            before = [p.detach().numpy().astype(np.float64) for p in params]
            for p, n in zip(params, NAMES_8BIT):
                p.grad = torch.tensor(prob["grads"][n][s])
            opt.step()
            after = [p.detach().numpy() for p in params]
            ratio[s] = [_norm(a - b) / (LR_8BIT * _norm(b)) for a, b in zip(after, before)]
            sample[s], bias[s] = after[0].reshape(-1)[:SAMPLE_8BIT], after[1]
        quantized = [n for p, n in zip(params, NAMES_8BIT)
                     if any(t.dtype in (torch.uint8, torch.int8) for t in _state_tensors(opt, p))]
        runs[label] = {"ratio": ratio, "sample/dense.weight": sample, "traj/dense.bias": bias,
                       **{"final/" + n: p.detach().numpy().copy() for p, n in zip(params, NAMES_8BIT)},
                       "quantized": np.array(quantized or [""])}
    return runs


def _state_tensors(opt, p):
    """The tensors of `p`'s optimizer state (torchao keeps its codes inside tensor subclasses)."""
    found = []
    for value in opt.state[p].values():
        for t in ([value] + [getattr(value, a) for a in ("codes",) if hasattr(value, a)]):
            if hasattr(t, "dtype"):
                found.append(t)
    return found


def record_bnb(prob):
    from importlib.metadata import version
    torch = _torch_setup()
    import bitsandbytes as bnb
    kw = dict(lr=LR_8BIT, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD_8BIT)
    runs = _record_torch_8bit({
        "LAMB8bit": lambda ps: bnb.optim.LAMB8bit(ps, **kw),
        "LAMB": lambda ps: bnb.optim.LAMB(ps, **kw),
        "AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, **kw),
        "AdamW": lambda ps: bnb.optim.AdamW(ps, **kw),
    }, prob)
    return {"runs": runs, "meta": [
        "library=bitsandbytes", "version=%s" % version("bitsandbytes"), "torch=%s" % torch.__version__,
        "defaults=bnb.optim.LAMB8bit / LAMB: bias_correction=True, adam_w_mode=True, max_unorm=1.0, "
        "min_8bit_size=4096 (8-bit state: block-wise, blocks of 256, dynamic maps); "
        "AdamW8bit: min_8bit_size=4096; AdamW: optim_bits=32; CPU backend bitsandbytes/backends/cpu/ops.py",
    ]}


def record_torchao(prob):
    from importlib.metadata import version
    torch = _torch_setup()
    from torchao.optim import AdamW8bit
    runs = _record_torch_8bit({"AdamW8bit": lambda ps: AdamW8bit(
        ps, lr=LR_8BIT, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD_8BIT)}, prob)
    return {"runs": runs, "meta": [
        "library=torchao", "version=%s" % version("torchao"), "torch=%s" % torch.__version__,
        "defaults=torchao.optim.AdamW8bit: block_size=256, bf16_stochastic_round=False",
    ]}


RECORDERS_8BIT = {
    "bnb": (record_bnb, "pip install numpy torch==2.13.0; pip install bitsandbytes==0.50.2 torch==2.13.0 "
                        "(8-bit problem)"),
    "torchao": (record_torchao, "pip install numpy torch==2.13.0; pip install torchao==0.18.0 torch==2.13.0 "
                                "(8-bit problem)"),
}


def save_8bit(name, prob, result):
    arrays = {"init/" + n: prob["init"][n] for n in NAMES_8BIT}
    arrays.update({"grad/" + n: prob["grads"][n].astype(np.float16) for n in NAMES_8BIT})
    for label, run in result["runs"].items():
        arrays.update({"%s/%s" % (label, key): value for key, value in run.items()})
    arrays["meta"] = np.array(list(result["meta"]) + [
        "python=%s" % platform.python_version(), "numpy=%s" % np.__version__,
        "problem=problem_8bit(): dense.weight (64, 64), dense.bias (64,), %d steps, lr %g constant, "
        "betas (0.9, 0.999), eps 1e-6, weight decay %g on both" % (STEPS_8BIT, LR_8BIT, WD_8BIT)])
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, name + ".npz")
    np.savez_compressed(path, **arrays)
    return path


def save(name, prob, result):
    os.makedirs(OUT_DIR, exist_ok=True)
    arrays = {}
    for n in NAMES:
        arrays["init/" + n] = prob["init"][n]
        arrays["grad/" + n] = prob["grads"][n]
    arrays["lr"] = prob["lr"]
    for key, _ in WEIGHT_DECAYS:
        for n in NAMES:
            arrays["%s/%s" % (key, n)] = result["trajs"][key][n].astype(np.float32)
    meta = list(result["meta"]) + [
        "python=%s" % platform.python_version(), "numpy=%s" % np.__version__,
        "problem=betas (0.9, 0.999), eps 1e-6, 20 steps, lr_s = 0.01*(1 - s/20), weight decay "
        "0.0 (wd0) and 0.01 (wd0.01) on all parameters, one parameter group",
    ]
    arrays["meta"] = np.array(meta)
    path = os.path.join(OUT_DIR, name + ".npz")
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------
# float64 NumPy re-implementations (used by --check).  Each takes (init, grads, wd) and returns
# {param: (20, *shape)}.  lr is lr_at(s) in float64.
# --------------------------------------------------------------------------------------------

def _norm(x):
    return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


def _ratio(w_norm, u_norm):
    return w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0


def _f32(x):
    return float(np.float32(x))


class Scalars:
    """How a library forms its scalar coefficients (the part of the formula where float32
    rounding of the betas is visible at the 1e-5 level: 0.999 in float32 is 0.99900001287, so
    1 - beta2**t computed from the float32 beta is off by about 1.3e-5 relative).

    mode "f64":     bias corrections 1 - beta**t and moment coefficients 1 - beta in float64
                    (Python floats: timm, torch_optimizer, and the paper).
    mode "f32pow":  1 - float32(float32(beta)**t) (beta cast to float32, power in float32:
                    optax tree_bias_correction, keras), moment coefficients 1 - beta in float64.
    mode "f32all":  as f32pow, and moment coefficients 1 - float32(beta) (tfa: beta_1_t hyper is a
                    float32 tensor, one_minus_beta_1_t = 1 - beta_1_t).
    mode "f32prod": beta**t kept as a float32 accumulator multiplied by float32(beta) each step
                    (paddle Beta1Pow/Beta2Pow, initialised to beta), moment coefficients
                    1 - float32(beta) (paddle LambMomentMENUpdateFunctor).
    """

    def __init__(self, mode):
        self.mode = mode
        self.pow = {BETA1: 1.0, BETA2: 1.0}

    def coef(self, beta):
        return 1.0 - (beta if self.mode in ("f64", "f32pow") else _f32(beta))

    def next_step(self, t):
        if self.mode == "f32prod":
            for b in (BETA1, BETA2):
                self.pow[b] = _f32(self.pow[b] * _f32(b))
        elif self.mode == "f64":
            self.pow = {b: b ** t for b in (BETA1, BETA2)}
        else:
            self.pow = {b: _f32(_f32(b) ** t) for b in (BETA1, BETA2)}

    def bc(self, beta):
        return 1.0 - self.pow[beta]


def _loop(init, grads, step_fn, mode="f64"):
    w = {n: init[n].astype(np.float64) for n in NAMES}
    m = {n: np.zeros_like(w[n]) for n in NAMES}
    v = {n: np.zeros_like(w[n]) for n in NAMES}
    out = {n: np.empty((STEPS,) + SHAPES[n]) for n in NAMES}
    sc = Scalars(mode)
    for s in range(STEPS):
        sc.next_step(s + 1)
        g = {n: grads[n][s].astype(np.float64) for n in NAMES}
        step_fn(s, w, m, v, g, sc)
        for n in NAMES:
            out[n][s] = w[n]
    return out


def ref_paper(init, grads, wd, mode="f64"):
    """LAMB, paper Algorithm 2 (== optax.lamb, == tfa LAMB): trust ratio on every parameter."""
    def step(s, w, m, v, g, sc):
        for n in NAMES:
            m[n] = (1 - sc.coef(BETA1)) * m[n] + sc.coef(BETA1) * g[n]
            v[n] = (1 - sc.coef(BETA2)) * v[n] + sc.coef(BETA2) * g[n] ** 2
            r = (m[n] / sc.bc(BETA1)) / (np.sqrt(v[n] / sc.bc(BETA2)) + EPS)
            u = r + wd * w[n]
            w[n] = w[n] - lr_at(s) * _ratio(_norm(w[n]), _norm(u)) * u
    return _loop(init, grads, step, mode)


def ref_optax(init, grads, wd, mode="f32pow"):
    return ref_paper(init, grads, wd, mode)


def ref_tfa(init, grads, wd, mode="f32all"):
    return ref_paper(init, grads, wd, mode)


def ref_timm(init, grads, wd, mode="f64", max_grad_norm=1.0):
    """timm.optim.Lamb defaults: global grad-norm clip, trust ratio only where wd != 0."""
    def step(s, w, m, v, g, sc):
        clip = max(np.sqrt(sum(_norm(g[n]) ** 2 for n in NAMES)) / max_grad_norm, 1.0)
        for n in NAMES:
            gn = g[n] / clip
            m[n] = m[n] + (gn - m[n]) * sc.coef(BETA1)           # lerp_(grad, 1 - beta1)
            v[n] = BETA2 * v[n] + sc.coef(BETA2) * gn ** 2
            u = (m[n] / sc.bc(BETA1)) / (np.sqrt(v[n]) / np.sqrt(sc.bc(BETA2)) + EPS)
            q = 1.0
            if wd != 0:
                u = u + wd * w[n]
                q = _ratio(_norm(w[n]), _norm(u))
            w[n] = w[n] - lr_at(s) * q * u
    return _loop(init, grads, step, mode)


def ref_torch_optimizer(init, grads, wd, mode="f64", clamp_value=10.0):
    """torch_optimizer.Lamb defaults: no bias correction, trust ratio on every parameter,
    ||w|| clamped to [0, 10]."""
    def step(s, w, m, v, g, sc):
        for n in NAMES:
            m[n] = BETA1 * m[n] + sc.coef(BETA1) * g[n]
            v[n] = BETA2 * v[n] + sc.coef(BETA2) * g[n] ** 2
            u = m[n] / (np.sqrt(v[n]) + EPS)
            if wd != 0:
                u = u + wd * w[n]
            q = _ratio(min(_norm(w[n]), clamp_value), _norm(u))
            w[n] = w[n] - lr_at(s) * q * u
    return _loop(init, grads, step, mode)


def ref_keras(init, grads, wd, mode="f32pow"):
    """keras.optimizers.Lamb: decoupled w -= lr*wd*w first, then the trust ratio (on every
    variable) of the Adam direction alone, computed with the decayed w."""
    def step(s, w, m, v, g, sc):
        lr = lr_at(s)
        for n in NAMES:
            w[n] = w[n] - w[n] * wd * lr
            m[n] = m[n] + (g[n] - m[n]) * sc.coef(BETA1)
            v[n] = v[n] + (g[n] ** 2 - v[n]) * sc.coef(BETA2)
            r = (m[n] / sc.bc(BETA1)) / (np.sqrt(v[n] / sc.bc(BETA2)) + EPS)
            w[n] = w[n] - _ratio(_norm(w[n]), _norm(r)) * lr * r
    return _loop(init, grads, step, mode)


def ref_paddle(init, grads, wd, mode="f32prod"):
    """paddle.optimizer.Lamb defaults: paper rule, trust ratio only where wd > 0."""
    def step(s, w, m, v, g, sc):
        for n in NAMES:
            m[n] = (1 - sc.coef(BETA1)) * m[n] + sc.coef(BETA1) * g[n]
            v[n] = (1 - sc.coef(BETA2)) * v[n] + sc.coef(BETA2) * g[n] * g[n]
            u = (m[n] / sc.bc(BETA1)) / (np.sqrt(v[n] / sc.bc(BETA2)) + EPS) + wd * w[n]
            q = _ratio(_norm(w[n]), _norm(u)) if wd > 0 else 1.0
            w[n] = w[n] - lr_at(s) * q * u
    return _loop(init, grads, step, mode)


REFERENCES = {
    "optax": ref_optax,
    "timm": ref_timm,
    "torch_optimizer": ref_torch_optimizer,
    "keras": ref_keras,
    "paddle": ref_paddle,
    "tfa": ref_tfa,
}


def deviation(traj, ref, init):
    """(max over params and steps of ||a - b|| / ||b||, same with ||b - w0|| in the denominator)."""
    rel_w = rel_d = 0.0
    for n in NAMES:
        for s in range(STEPS):
            d = _norm(traj[n][s].astype(np.float64) - ref[n][s])
            rel_w = max(rel_w, d / max(_norm(ref[n][s]), 1e-30))
            rel_d = max(rel_d, d / max(_norm(ref[n][s] - init[n].astype(np.float64)), 1e-30))
    return rel_w, rel_d


def check(names):
    rows = []
    for name in names:
        path = os.path.join(OUT_DIR, name + ".npz")
        if not os.path.exists(path):
            print("%-16s no fixture (%s)" % (name, path))
            continue
        data = np.load(path)
        init = {n: data["init/" + n] for n in NAMES}
        grads = {n: data["grad/" + n] for n in NAMES}
        for key, wd in WEIGHT_DECAYS:
            traj = {n: data["%s/%s" % (key, n)] for n in NAMES}
            own = deviation(traj, REFERENCES[name](init, grads, wd), init)
            own64 = deviation(traj, REFERENCES[name](init, grads, wd, mode="f64"), init)
            paper = deviation(traj, ref_paper(init, grads, wd), init)
            rows.append((name, key, own, own64, paper))
    print("max relative deviation, w: ||a-b||/||b||, disp: ||a-b||/||b-w0||, over params and steps")
    print("%-16s %-7s %-21s %-21s %-21s" % ("library", "traj", "own formula+scalars",
                                             "own formula, f64", "paper Alg. 2, f64"))
    print("%-16s %-7s %-21s %-21s %-21s" % ("", "", "(w / disp)", "(w / disp)", "(w / disp)"))
    for name, key, own, own64, paper in rows:
        print("%-16s %-7s %.2e / %.2e    %.2e / %.2e    %.2e / %.2e" % (
            name, key, own[0], own[1], own64[0], own64[1], paper[0], paper[1]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="recorders to run (see --list)")
    ap.add_argument("--list", action="store_true", help="list the recorders and exit")
    ap.add_argument("--check", action="store_true",
                    help="compare the saved fixtures with the float64 re-implementations")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, how) in {**RECORDERS, **RECORDERS_8BIT}.items():
            print("%-16s %s" % (name, how))
        return 0
    if args.check:
        check(args.names or list(RECORDERS))
        return 0
    if not args.names:
        ap.error("name a recorder (see --list)")
    unknown = [n for n in args.names if n not in RECORDERS and n not in RECORDERS_8BIT]
    if unknown:
        ap.error("unknown recorder(s): %s" % ", ".join(unknown))
    prob = problem()
    for name in args.names:
        if name in RECORDERS_8BIT:
            prob8 = problem_8bit()
            path = save_8bit(name, prob8, RECORDERS_8BIT[name][0](prob8))
        else:
            path = save(name, prob, RECORDERS[name][0](prob))
        print("%s: wrote %s (%d bytes)" % (name, path, os.path.getsize(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
