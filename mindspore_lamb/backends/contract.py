"""The update contract: what every backend of "the LAMB update of all parameters" takes and returns.

A backend is a Cell built once per optimizer with the static facts of each parameter, and called once per
step, inside the optimizer's graph::

    backend = Backend(params, decay_flags=..., adapt_flags=..., owned_flags=...)
    layer_stats, grad_sq, applied = backend(scalars, lr, weight_decay, params, moments1, moments2,
                                            gradients, grad_sq)

Inputs (the optimizer computes every one of them first; a backend computes no hyper-parameter):

* ``scalars``: a tuple of float32 0-D Tensors made by :func:`pack` (names in :data:`SCALARS`); ``proceed`` is
  a bool 0-D Tensor.
* ``lr``, ``weight_decay``: one float32 scalar shared by every parameter, or a tuple with one scalar per
  parameter (parameter groups). A parameter whose ``decay_flags`` entry is False is never decayed.
* ``params``, ``moments1``, ``moments2``: the optimizer's ParameterTuples (``w``, ``m``, ``v``), updated
  in place; ``gradients``: the raw gradients, float32 for float32 parameters (multiplied by
  ``grad_scale`` inside).
* ``grad_sq``: the sum of squares of every element of every (raw) gradient when the optimizer computed
  it before the update (with ``max_grad_norm``, an exact skip, or the parallel optimizer), passed in as a
  named scalar, apex-style; ``None`` lets the backend take it from its own pass over the gradients.

Semantics (identical for every backend; docs/architecture.md):

* ``proceed`` False: nothing changes (the caller knows the step is skipped).
* Else the moments of every element whose new ``v`` is finite take this step's gradient (the others keep
  theirs); the weights are updated only when ``grad_sq`` is finite. ``applied`` says whether they were.
* A parameter whose ``||w||`` is not finite (a NaN/Inf already inside the weights) is left as it is, and
  its trust ratio reads NaN in ``layer_stats``.

Outputs:

* ``layer_stats``: float32 (n, 3), ``(q, ||w||, ||u||)`` of each parameter (``||w||`` before the step);
  ``(1, 0, 0)`` for parameters another rank updates and for every parameter of a call not applied.
* ``grad_sq``: the float32 sum of squares used for the decision (for ``global_grad_norm``).
* ``applied``: bool 0-D Tensor.
"""

import inspect


def pack(*, beta1, beta2, one_minus_beta1, one_minus_beta2, m_grad_scale, eps, eps_root, inv_bias_c1,
         inv_bias_c2, grad_scale, decay_in_grad, decay_in_update, decay_outside, w_norm_max, trust_lo, trust_hi,
         proceed):
    """The `scalars` tuple, in the order of this signature (the one definition of the layout).

    beta1, beta2: kept for backends that want them (the moments use only 1 - beta, which is exact);
    one_minus_beta1/2: 1 - beta computed in float64 and rounded once to float32;
    m_grad_scale: 1, or 1 / (1 - beta1) without gradient averaging (m = b1 m + g);
    eps, eps_root: r = m^ / (sqrt(v^ + eps_root) + eps);
    inv_bias_c1/2: 1 / (1 - beta^t), or 1 without bias correction;
    grad_scale: (1 / loss_scale) * min(1, max_grad_norm / G);
    decay_in_grad, decay_in_update, decay_outside: 0 or 1, where a parameter's weight decay lambda goes:
    added to the gradient (L2), to the update u = r + lambda w (the paper), or applied outside the trust
    ratio, w = (1 - lr lambda) w - lr q u;
    w_norm_max: ||w|| is clamped to it in the trust ratio (inf when off);
    trust_lo, trust_hi: clip bounds of q (0 and inf when off);
    proceed: bool, False when the step is skipped (nothing changes).
    """
    return (beta1, beta2, one_minus_beta1, one_minus_beta2, m_grad_scale, eps, eps_root, inv_bias_c1, inv_bias_c2,
            grad_scale, decay_in_grad, decay_in_update, decay_outside, w_norm_max, trust_lo, trust_hi, proceed)


# The names, in order: the float32 array handed to a compiled kernel follows it (backends/fused_cpu.py
# generates the C++ enum from it), and composite backends index the tuple with INDEX.
SCALARS = tuple(inspect.signature(pack).parameters)
INDEX = {name: i for i, name in enumerate(SCALARS)}
