"""The operators whose functional names MindSpore 2.10 deprecates, as the primitives behind them.

``ops.assign``, ``assign_add``, ``assign_sub``, ``cast``, ``fill`` and ``unstack`` "will be removed after
version 2.9.0", and ``ops.select`` / ``ops.gather`` will change their semantics then (their 2.10 docstrings).
The primitives ``Assign``, ``AssignAdd``, ``AssignSub``, ``Cast``, ``Select`` (where-style), ``Gather`` and
``Unstack`` are not deprecated and are the same in MindSpore 2.7.1 and 2.10, so the graphs call these: the same
operators in the compiled graph (docs/operators.md), one name on every supported version. ``Lerp`` is here
for the same reason (a primitive, in 2.7.1 and 2.10 alike), with ``NanToNum`` (Ascend's graph:
backends/composite.py).
"""
from mindspore import ops
from mindspore.ops import operations as P

assign = P.Assign()            # variable = value
assign_add = P.AssignAdd()     # variable += value
assign_sub = P.AssignSub()     # variable -= value
cast = P.Cast()                # cast(x, dtype)
where = P.Select()             # where(condition, x, y), broadcasting: x where condition, else y
gather = P.Gather()            # gather(x, indices, axis)
Unstack = P.Unstack            # Unstack(axis=0)(x): the tuple of slices along `axis`
lerp = P.Lerp()                # lerp(x, end, weight) = x + weight (end - x)
nan_to_zero = P.NanToNum(nan=0.0)   # NaN -> 0 (and +-Inf -> the largest finite float32)
broadcast_to = ops.broadcast_to  # broadcast_to(x, shape)
