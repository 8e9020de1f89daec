"""Backends of the LAMB update of all parameters, behind one contract (contract.py, docs/architecture.md).

``create()`` is the one dispatch: when the optimizer is built, it picks the backend that runs the update
(``select()``: the first of ``BACKENDS`` that can run the parameters and store the state, or the one
asked for by name) and builds it; with ``shard_state`` the state is sharded across data-parallel workers and
the sharded backend runs the chosen one's operators on each worker's piece. Every backend allocates its
own state from the optimizer's slot set (``state.declare``), held by role. Adding a backend (a GPU or
Ascend kernel) is one module with a class like ``CompositeBackend`` and one entry in ``BACKENDS``.

``MINDSPORE_LAMB_FUSED`` (case and surrounding spaces ignored) steers the automatic choice: ``0``,
``false``, ``off`` or ``no`` never uses the fused CPU backend; ``1``, ``true``, ``on``, ``yes``, empty or
unset (the default) uses it where it can and says once, as a warning, why it could not; ``require`` raises
instead of falling back when it cannot be used (for benchmarks); any other value is a ``ValueError`` naming
the variable and the value. A backend asked for by name (``Lamb(backend=...)``) is used whatever the
variable says, or a ``RuntimeError`` says why it cannot be.
"""
import os
import warnings

import mindspore as ms

from . import composite, fused_cpu, sharded

BACKENDS = (fused_cpu.FusedCpuBackend, composite.CompositeBackend)
NAMES = tuple(backend.name for backend in BACKENDS)
_warned = set()
# MINDSPORE_LAMB_FUSED, lower-cased: whether the fused backend is wanted
_FUSED_SETTINGS = {"0": False, "false": False, "off": False, "no": False, "": True, "1": True, "true": True,
                   "on": True, "yes": True, "require": "require"}


def _wanted(backend):
    """False when MINDSPORE_LAMB_FUSED turns `backend` off; "require" when it must be used."""
    if backend is fused_cpu.FusedCpuBackend:
        setting = os.environ.get("MINDSPORE_LAMB_FUSED", "")
        wanted = _FUSED_SETTINGS.get(setting.strip().lower())
        if wanted is None:
            raise ValueError(f"mindspore_lamb: MINDSPORE_LAMB_FUSED must be one of 0, false, off, no, 1, true, on, "
                             f"yes or require, but got {setting!r}.")
        return wanted
    return True


def select(params, slots=None, device_target=None, name=None):
    """The backend class for `params` (None: float32 gradients only) and the state `slots` on `device_target`
    (default: the context's): the backend called `name` (one of :data:`NAMES`), or, with `name` None, the
    first of ``BACKENDS`` that can run them and that MINDSPORE_LAMB_FUSED allows. A backend that is not
    there for a reason the user can fix (no compiler) is named in a warning, once."""
    device_target = device_target or ms.get_context("device_target")
    if name is not None:
        backend = BACKENDS[NAMES.index(name)]
        reason, _ = backend.unavailable(params, slots, device_target)
        if reason is not None:
            raise RuntimeError(f"For 'Lamb', the argument 'backend' is {name!r}, but that backend cannot be used: "
                               f"{reason}.")
        return backend
    reasons = []
    for backend in BACKENDS:
        wanted = _wanted(backend)
        if not wanted:
            continue
        reason, loud = backend.unavailable(params, slots, device_target)
        if reason is None:
            return backend
        if wanted == "require":
            raise RuntimeError(f"mindspore_lamb: MINDSPORE_LAMB_FUSED=require, but the {backend.name} backend "
                               f"cannot be used: {reason}.")
        reasons.append(f"{backend.name}: {reason}")
        if loud and backend.name not in _warned and backend is not BACKENDS[-1]:
            _warned.add(backend.name)
            warnings.warn(f"mindspore_lamb: the {backend.name} backend is not used ({reason}); Lamb takes the "
                          f"composite graph, about 8x slower per optimizer step on CPU (BERT-base shapes, "
                          f"benchmarks/README.md). Install g++ with OpenMP to get it, or set "
                          f"MINDSPORE_LAMB_FUSED=0 to silence this.",
                          RuntimeWarning, stacklevel=3)
    raise TypeError(f"For 'Lamb', no backend can run these parameters with this state on {device_target} ("
                    + "; ".join(reasons) + ").")


def create(params, slots, *, decay_flags, adapt_flags, owned_flags, constants, shard_state=False,
           shard_bucket_size=sharded.DEFAULT_BUCKET, parallel_optimizer=False, name=None, quantized=None):
    """The backend Cell of the update of `params`, holding the state declared by `slots` (the one dispatch).

    `constants`: the scalars of ``contract.pack`` that are the same at every step, {name: value};
    `name`: the backend asked for (``select()``); `shard_state`: each data-parallel worker keeps 1/N of the
    state (backends/sharded.py), the chosen backend's operators running that piece, all-gathered in buckets of
    `shard_bucket_size` elements of each worker's piece; `quantized`: None, or (the 8-bit slot set, one bool per
    parameter: whether its moments are 8-bit; the others keep float32 moments in the same slots,
    ``contract.parameter_state``), instead of `slots`."""
    build_args = dict(decay_flags=decay_flags, adapt_flags=adapt_flags, owned_flags=owned_flags, constants=constants)
    eight_bit = {}
    if quantized is not None:
        slots, eight_bit = quantized[0], {"eight_bit": quantized[1]}
    kernels = select(params, slots, name=name)
    if shard_state:
        rank, world = sharded.data_parallel_group(parallel_optimizer)
        return sharded.ShardedBackend(params, slots, kernels=kernels, rank=rank, world=world,
                                      bucket=shard_bucket_size, **eight_bit, **build_args)
    return kernels(params, slots, **eight_bit, **build_args)


def sum_of_squares_cell(device_target=None):
    """A Cell computing ``grad_sq`` = sum(g^2) over a tuple of float32 gradients, from the backend ``select()`` picks
    (the loss-scale cell's overflow test and clipping use it)."""
    return select(None, device_target=device_target).SumOfSquares()
