"""Backends of the LAMB update of all parameters, behind one contract (contract.py, docs/architecture.md).

:func:`select` picks the backend once, when the optimizer is built: the first of :data:`BACKENDS` that
can run the parameters. Adding a backend (a GPU or Ascend kernel) is one module with a class like
``CompositeBackend`` and one entry in :data:`BACKENDS`.

``MINDSPORE_LAMB_FUSED`` (case and surrounding spaces ignored): ``0``, ``false``, ``off`` or ``no`` never
uses the fused CPU backend; ``1``, ``true``, ``on``, ``yes``, empty or unset (the default) uses it where it
can and says once, as a warning, why it could not; ``require`` raises instead of falling back when it
cannot be used (for benchmarks); any other value is a ``ValueError`` naming the variable and the value.
"""
import os
import warnings

import mindspore as ms

from . import composite, fused_cpu

BACKENDS = (fused_cpu.FusedCpuBackend, composite.CompositeBackend)
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


def select(params, device_target=None):
    """The backend class for `params` (None: float32 gradients only) on `device_target` (default: the
    context's). A backend that is not there for a reason the user can fix (no compiler) is named in a
    warning, once."""
    device_target = device_target or ms.get_context("device_target")
    for backend in BACKENDS:
        wanted = _wanted(backend)
        if not wanted:
            continue
        reason, loud = backend.unavailable(params, device_target)
        if reason is None:
            return backend
        if wanted == "require":
            raise RuntimeError(f"mindspore_lamb: MINDSPORE_LAMB_FUSED=require, but the {backend.name} backend "
                               f"cannot be used: {reason}.")
        if loud and backend.name not in _warned:
            _warned.add(backend.name)
            warnings.warn(f"mindspore_lamb: the {backend.name} backend is not used ({reason}); Lamb takes the "
                          f"composite graph, about 8-14x slower per optimizer step on CPU. Install g++ with "
                          f"OpenMP to get it, or set MINDSPORE_LAMB_FUSED=0 to silence this.",
                          RuntimeWarning, stacklevel=3)
    raise RuntimeError("mindspore_lamb: no backend can run these parameters")  # composite always can


def sum_of_squares(device_target=None):
    """A Cell computing sum(g^2) over a tuple of float32 gradients, from the backend :func:`select` picks
    (the loss-scale cell's overflow test and clipping use it)."""
    return select(None, device_target).SumOfSquares()
