"""The fused CPU backend: the whole LAMB update in one C++ kernel (``fused_cpu.cc``, ``ops.Custom`` aot).

Used on CPU when every parameter is float32 and a C++ compiler with OpenMP is there. The library is
compiled on first use and cached per user (``_build.py``); without a compiler, Lamb says so once and
takes the composite backend. The kernel updates the parameters and the state in place, in two passes
over memory (40 bytes per element with float32 moments, 34 with a 16-bit first moment, 22 with the 8-bit
state of ``optim_bits=8``: codes and block scales, read back and stored again block by block), with the
float32 arithmetic of the composite rule (``composite.py``, ``blockwise.py``) operation by operation;
``benchmarks/README.md`` has its speed.

Everything the kernel and Python must agree on is generated from one Python definition and compiled in
(``-D`` macros; the library's cache key includes them): the scalars' layout (``contract.pack``), the
scalars only the general loop reads with their neutral values (``contract.GENERAL_ONLY``), and the state
slots of the optimizer, in order (its ``state.Slots``: one library per slot set; the 8-bit slot set's
library is built with the block size, ``-DLAMB_BLOCK``, and takes codes and scales instead of float moments).
"""
import os

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Tensor, nn, ops
from mindspore.ops import composite as C
from mindspore.ops import operations as P

from .. import state
from . import _build, contract

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_cpu.cc")
LAYOUT_DEFINES = [
    "-DLAMB_SCALARS(X)=" + " ".join(f"X({name})" for name in contract.SCALARS),
    "-DLAMB_GENERAL_ONLY(X)=" + " ".join(f"X({name},{float(neutral)!r}f)"
                                         for name, neutral in contract.GENERAL_ONLY.items()),
]


def slot_defines(slots):
    """The kernel's slot list, from an optimizer's slots (``-DLAMB_SLOTS(X)=X(m) X(v)``), and for the 8-bit
    state (``slots.quantized``) its block size (``-DLAMB_BLOCK=256``: the kernel takes codes and block scales)."""
    return (["-DLAMB_SLOTS(X)=" + " ".join(f"X({slot.role})" for slot in slots)]
            + ([f"-DLAMB_BLOCK={state.BLOCK}"] if state.Slots(slots).quantized else []))


# -march: the CPU this process runs on (the cache key includes the CPU's flags, so a shared cache never
# hands a library to a CPU it was not built for); MINDSPORE_LAMB_MARCH=x86-64-v3 (say) builds for an ISA
# level instead, to measure what users of that level get (benchmarks/README.md).
MARCH = os.environ.get("MINDSPORE_LAMB_MARCH", "native")
_BASE_FLAGS = ["-O3", f"-march={MARCH}", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared",
               "-std=c++17", *LAYOUT_DEFINES]
FLAGS = _BASE_FLAGS + slot_defines(state.SLOTS)     # the library of the default slots
_libraries = {}


def _cpu_signature():
    """Architecture and CPU feature flags: the library is built for this CPU (-march=native), so a cache
    directory shared between machines (a network home) must not hand an AVX-512 build to a CPU without it."""
    sig = os.uname().machine
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            sig += next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig.encode()


def library_path(src=SRC, extra_flags=(), slots=None):
    """The verified library built from `src` for the state `slots` (an optimizer's ``state.Slots``; the default
    slots for the sum of squares) (cached; built on first use). Raises _build.BuildError.

    ``ops.Custom`` gets this path and MindSpore opens it at the first step: it is absolute, resolved and
    without ':', in directories only the current user and root can change (_build.py), so it still leads
    to the library verified here."""
    flags = _BASE_FLAGS + slot_defines(slots or state.SLOTS) + list(extra_flags)
    key = (src, tuple(flags))
    if key not in _libraries:
        try:
            _libraries[key] = _build.build(src, flags, _cpu_signature())
        except _build.BuildError as error:
            _libraries[key] = error
    found = _libraries[key]
    if isinstance(found, Exception):
        raise found
    return found


def unavailable(params, slots, device_target):
    """(why this backend cannot run `params` with `slots`, whether the user should hear of it), or (None, False).
    `params` and `slots` None: float32 gradients only (a sum of squares)."""
    if device_target != "CPU":
        return f"the device target is {device_target}, not CPU", False
    if params is not None and any(p.dtype != mstype.float32 for p in params):
        return "not every parameter is float32", False
    try:
        library_path(slots=slots)
    except _build.BuildError as error:
        return str(error), True
    return None, False


class SumOfSquares(nn.Cell):
    """``sum(g^2)`` over every element of every float32 gradient, in one kernel (double accumulators)."""

    def __init__(self):
        super().__init__()
        self.op = ops.Custom(library_path() + ":LambSumSq", out_shape=lambda *shapes: (1,),
                             out_dtype=lambda *types: mstype.float32, func_type="aot")

    def construct(self, gradients):
        return ops.reshape(self.op(*gradients), ())


class FusedCpuBackend(nn.Cell):
    """The update contract (contract.py) in one kernel call."""

    name = "fused_cpu"
    unavailable = staticmethod(unavailable)
    SumOfSquares = SumOfSquares

    def __init__(self, params, slots, *, decay_flags, adapt_flags, owned_flags, constants):
        super().__init__()
        del constants       # the kernel takes its fast loop at run time, from the scalars (is_general)
        n = len(params)
        self.n = n
        self.slots = slots
        self.state = contract.parameter_state(params, slots)     # by role (contract.SlotState)
        self.state_params = self.state.flat()                   # the kernel's order: the order of `slots`
        self.grad_sq_cell = SumOfSquares()
        self.update_kernel = ops.Custom(library_path(slots=slots) + ":LambStep", out_shape=lambda *shapes: (n + 1, 3),
                                        out_dtype=lambda *types: mstype.float32, func_type="aot")
        self.update_kernel.add_prim_attr("side_effect_mem", True)   # in place: ordered with other effects
        self.decay_mask = Tensor(np.array(decay_flags, np.float32))
        self.ones = Tensor(np.ones(n, np.float32))
        # 1: layer-adapted, 0: q = 1 (layer_adaptation=False), -1: another rank updates it
        self.layer_codes = Tensor(np.array([(1.0 if adapt else 0.0) if owned else -1.0
                                            for adapt, owned in zip(adapt_flags, owned_flags)], np.float32))
        self.stack = P.Stack()
        self.hyper_map = C.HyperMap()

    def construct(self, scalars, lr, weight_decay, params, gradients, grad_sq):
        scalars = self.stack(self.hyper_map(contract.to_float32, scalars))
        out = self.update_kernel(scalars, contract.per_parameter(lr, self.ones),
                                 contract.per_parameter(weight_decay, self.ones) * self.decay_mask,
                                 self.layer_codes, *params, *self.state_params, *gradients)
        totals = out[self.n]                                   # (sum of g^2, applied, 0)
        if grad_sq is None:
            grad_sq = totals[0]
        return out[:self.n], grad_sq, totals[1] > 0.5
