"""Optional fused CPU path of the LAMB step (issue 7): two ``ops.Custom(func_type="aot")`` kernels.

``_fused_cpu.cc`` (next to this file) is compiled once with ``g++ -O3 -fopenmp`` into a shared library
cached under ``$MINDSPORE_LAMB_CACHE`` (default ``~/.cache/mindspore_lamb``), keyed by the source's hash
and the compiler flags. The composite graph of ``_update.py`` stays the portable path (GPU/Ascend,
float16/bfloat16 parameters) and the reference these kernels are tested against.

* :func:`sum_of_squares_op` - ``op(*gradients)`` -> float32[1], the sum of squares of every element of
  every gradient: the pre-pass, run only when G is needed before the update (``max_grad_norm``, an exact
  skip, the parallel optimizer), one kernel instead of 2n reductions + AddN.
* :func:`lamb_step_op` - ``op(hyper, lrs, wds, flags, *params, *moments1, *moments2, *gradients)`` -> stats
  (n + 1, 3) float32: (q, ||w||, ||u||) per parameter, then (sum of g^2, applied, 0). It updates the
  parameters and both moments IN PLACE (on CPU a Parameter handed to a kernel is its own memory), and is
  marked ``side_effect_mem`` so that the graph keeps it ordered with other side effects; its output must
  be used (depend on it). ``hyper`` = float32[10] (beta1, beta2, eps, 1 / (1 - beta1^t), 1 / (1 - beta2^t),
  grad_scale, trust_lo, trust_hi, apply, 1 / loss_scale); apply = 0 skips the call untouched, else the
  kernel skips the weight update itself when G = sqrt(sum of g^2) / loss_scale is not finite (elements
  with a NaN/Inf gradient keep their moments); ``lrs``/``wds`` = float32[n] (wds[i] = 0 for parameters
  that are not decayed); ``flags`` = float32[n]: 1 layer-adapted, 0 layer_adaptation=False (q = 1), -1
  not updated on this rank.

:func:`available` says whether the kernels can run (CPU target, a working g++ with OpenMP), :func:`usable`
whether the step applies to a parameter list (float32 too); the caller falls back to the composite graph
otherwise.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile

import mindspore as ms
import mindspore.common.dtype as mstype
from mindspore import ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fused_cpu.cc")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_lib_path = {}
_lib_error = None


def _cpu_signature():
    """Architecture and CPU feature flags: the library is built with -march=native, so a cache directory
    shared between machines (a network home) must not hand an AVX-512 build to a CPU without it."""
    sig = os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            sig += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig.encode()


def library_path(defines=(), src=_SRC):
    """Compile ``_fused_cpu.cc`` on first use (cached on disk) and return the .so path; raises on failure.

    `defines` (extra -D flags) and `src` (another source file) are for benchmarking variants."""
    global _lib_error
    key_ = (tuple(defines), src)
    if key_ in _lib_path:
        return _lib_path[key_]
    if _lib_error is not None:
        raise RuntimeError(_lib_error)
    flags = _FLAGS + [f"-D{d}" for d in defines]
    with open(src, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(flags).encode() + _cpu_signature()).hexdigest()[:16]
    cache = os.environ.get("MINDSPORE_LAMB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mindspore_lamb"))
    path = os.path.join(cache, f"lamb_fused_cpu_{key}.so")
    if not os.path.exists(path):
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            _lib_error = f"no C++ compiler ({cxx}) found"
            raise RuntimeError(_lib_error)
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        proc = subprocess.run([cxx, *flags, src, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            _lib_error = f"compiling {src} failed: {proc.stderr[-2000:]}"
            raise RuntimeError(_lib_error)
        os.replace(tmp, path)  # atomic: concurrent processes never load a half-written library
    _lib_path[key_] = path
    return path


def available():
    """True when the fused kernels can run: CPU target, the library builds, and MINDSPORE_LAMB_FUSED is not
    "0". (Lamb.construct is always compiled with jit, so PYNATIVE_MODE too.)"""
    if os.environ.get("MINDSPORE_LAMB_FUSED", "1") == "0":
        return False
    if ms.get_context("device_target") != "CPU":
        return False
    try:
        library_path()
    except RuntimeError:
        return False
    return True


def usable(params):
    """True when the fused LAMB step applies: :func:`available`, and every parameter is float32."""
    return all(p.dtype == mstype.float32 for p in params) and available()


to_f32_scalar = C.MultitypeFuncGraph("lamb_to_f32_scalar")


@to_f32_scalar.register("Number")
def _number_to_f32(x):
    """A Python number (fixed weight decay) as a float32 0-D tensor."""
    return F.scalar_to_tensor(x, mstype.float32)


@to_f32_scalar.register("Tensor")
def _tensor_to_f32(x):
    """A 0-D or (1,) tensor (lr, global_step-derived values) as a float32 0-D tensor."""
    return F.reshape(F.cast(x, mstype.float32), ())


def sum_of_squares_op():
    op = ops.Custom(library_path() + ":LambSumSq", out_shape=lambda *shapes: (1,), out_dtype=lambda *types: mstype.float32,
                    func_type="aot")
    return op


def lamb_step_op(n_params, defines=(), src=_SRC):
    op = ops.Custom(library_path(defines, src) + ":LambStep", out_shape=lambda *shapes: (n_params + 1, 3),
                    out_dtype=lambda *types: mstype.float32, func_type="aot")
    op.add_prim_attr("side_effect_mem", True)
    return op
