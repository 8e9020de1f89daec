"""An independent float64 NumPy implementation of the LAMB update rule (docs/api/lamb.md, "Update rule").

Written from the paper's formula (arXiv:1904.00962, Algorithm 2), not from the Cell's code: plain loops over
parameters, float64 everywhere, bias corrections as 1 - beta**t.
"""
import numpy as np

import blockwise


def round_to(x, dtype):
    """Round float64 values to a storage dtype and back: float32, float16 or 'bfloat16'."""
    if dtype == "bfloat16":
        bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16      # round to nearest even
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.asarray(x).astype(dtype).astype(np.float64)


class LambReference:
    """State (w, m, v, s) and one `step` per optimizer call.

    Args:
        weights: list of arrays (initial parameter values, already in their storage precision).
        beta1, beta2, eps: as documented for Lamb (docs/api/lamb.md).
        loss_scale, max_grad_norm, trust_ratio_clip, bias_correction, weight_decay_mode ("decoupled":
            u = r + lambda w; "l2": g + lambda w before the moments; "decoupled_outside": w is first
            multiplied by 1 - lr lambda, and q uses the norm of that), grad_averaging (False:
            m = beta1 m + g), eps_inside_sqrt (r = m^ / sqrt(v^ + eps)), weight_norm_clip (||w|| is
            clamped to it in q): as documented for Lamb.
        exact_skip: as documented for Lamb (docs/api/lamb.md, "Non-finite gradients"): a call whose
            global norm G is not finite never changes w or s; with exact_skip or max_grad_norm it changes
            nothing, else each moment element whose gradient and its square are finite in float32 takes
            it and the others keep theirs.
        param_dtype: storage dtype of the parameters ('float32', 'float16', 'bfloat16');
            w is rounded to it after each step (Lamb writes it back in its own dtype).
        mu_dtype: storage dtype of the first moment ('float32', 'float16', 'bfloat16'), or None (kept in
            float64, as the exact rule): each new m is rounded to it, to nearest, and the step uses m as stored.
        optim_bits, min_8bit_size: 8 stores both moments of each parameter of at least `min_8bit_size` elements in
            the 8-bit format (helpers/blockwise.py); the step uses them as stored.
    """

    def __init__(self, weights, beta1=0.9, beta2=0.999, eps=1e-6, loss_scale=1.0,
                 max_grad_norm=None, trust_ratio_clip=None, param_dtype="float32", exact_skip=False,
                 bias_correction=True, weight_decay_mode="decoupled", grad_averaging=True, eps_inside_sqrt=False,
                 weight_norm_clip=None, mu_dtype=None, optim_bits=32, min_8bit_size=4096):
        self.w = [np.array(w, dtype=np.float64) for w in weights]
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.s = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.loss_scale = loss_scale
        self.max_grad_norm = max_grad_norm
        self.trust_ratio_clip = trust_ratio_clip
        self.param_dtype = param_dtype
        self.exact_skip = exact_skip
        self.bias_correction = bias_correction
        self.weight_decay_mode = weight_decay_mode
        self.grad_averaging = grad_averaging
        self.eps_inside_sqrt = eps_inside_sqrt
        self.weight_norm_clip = weight_norm_clip
        self.mu_dtype = mu_dtype
        self.quantized = [optim_bits == 8 and w.size >= min_8bit_size for w in self.w]
        self.trust_ratios = [None] * len(self.w)

    def _stored_m(self, m, i):
        """The first moment of parameter i as stored: 8-bit, or rounded to mu_dtype (None: exact)."""
        if self.quantized[i]:
            return blockwise.stored_signed(m)
        return m if self.mu_dtype is None else round_to(m, self.mu_dtype)

    def _stored_v(self, v, i):
        """The second moment of parameter i as stored: 8-bit, or exact."""
        return blockwise.stored_unsigned(v) if self.quantized[i] else v

    def step(self, grads, lr, weight_decay, decay=None, layer_adaptation=None, centralize=None):
        """One call. `lr` and `weight_decay` are functions of the step s (or numbers, or per-parameter lists
        of those); `decay[i]` says whether parameter i is decayed; `centralize[i]` applies gradient
        centralization to parameter i."""
        n = len(self.w)
        decay = decay or [True] * n
        layer_adaptation = layer_adaptation or [True] * n
        centralize = centralize or [False] * n
        s = self.s
        t = s + 1
        g = [np.array(x, dtype=np.float64) for x in grads]
        for i in range(n):
            if centralize[i] and g[i].ndim > 1:
                g[i] = g[i] - g[i].mean(axis=tuple(range(1, g[i].ndim)), keepdims=True)
        g = [x / self.loss_scale for x in g]
        with np.errstate(invalid="ignore", over="ignore"):
            grad_sq = sum(float(np.sum(x * x)) for x in g)
            big_g = np.sqrt(grad_sq)
            # the Cell sums the squares of the gradients as received (before unscaling) in float32 range:
            # beyond it, as for a NaN/Inf element, the call is skipped
            if not np.isfinite(np.float32(grad_sq * self.loss_scale ** 2)):
                if not (self.exact_skip or self.max_grad_norm is not None):
                    for i in range(n):         # moments take the call's gradient where they stay finite
                        m = self.beta1 * self.m[i] + (1 - self.beta1) * g[i]
                        v = self.beta2 * self.v[i] + (1 - self.beta2) * g[i] ** 2
                        ok = np.isfinite(np.float32(g[i] ** 2)) & np.isfinite(np.float32(v))  # float32 g^2, v
                        self.m[i] = self._stored_m(np.where(ok, m, self.m[i]), i)
                        self.v[i] = self._stored_v(np.where(ok, v, self.v[i]), i)
                return False                   # w and s never change
        if self.max_grad_norm is not None and big_g > 0:
            g = [x * min(1.0, self.max_grad_norm / big_g) for x in g]
        for i in range(n):
            lr_i = _value_at(_pick(lr, i), s)
            wd_i = _value_at(_pick(weight_decay, i), s) if decay[i] else 0.0
            mode = self.weight_decay_mode
            g_i = g[i] + wd_i * self.w[i] if mode == "l2" else g[i]
            m_coef = (1 - self.beta1) if self.grad_averaging else 1.0
            self.m[i] = self._stored_m(self.beta1 * self.m[i] + m_coef * g_i, i)
            self.v[i] = self._stored_v(self.beta2 * self.v[i] + (1 - self.beta2) * g_i ** 2, i)
            corrected = self.bias_correction is True
            m_hat = self.m[i] / (1 - self.beta1 ** t) if corrected else self.m[i]
            v_hat = self.v[i] / (1 - self.beta2 ** t) if corrected else self.v[i]
            if self.bias_correction == "step_size":        # DeepSpeed: the correction moves into the step
                lr_i = lr_i * np.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)
            if self.eps_inside_sqrt:
                r = m_hat / np.sqrt(v_hat + self.eps)
            else:
                r = m_hat / (np.sqrt(v_hat) + self.eps)
            u = r + wd_i * self.w[i] if mode == "decoupled" else r
            w = self.w[i] * (1 - lr_i * wd_i) if mode == "decoupled_outside" else self.w[i]
            w_norm = np.linalg.norm(w)
            if self.weight_norm_clip is not None:
                w_norm = min(w_norm, self.weight_norm_clip)
            u_norm = np.linalg.norm(u)
            q = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
            if self.trust_ratio_clip is not None:
                q = min(max(q, self.trust_ratio_clip[0]), self.trust_ratio_clip[1])
            if not layer_adaptation[i]:
                q = 1.0
            self.trust_ratios[i] = q
            self.w[i] = round_to(w - lr_i * q * u, self.param_dtype)
        self.s += 1
        return True


def _pick(value, i):
    return value[i] if isinstance(value, (list, tuple)) else value


def _value_at(value, s):
    return float(value(s)) if callable(value) else float(value)
