"""The fused CPU kernel on the 8-bit state (optim_bits=8), called directly (ctypes, no MindSpore).

Each call is held to a float32 NumPy emulation of the same step, built on the format's definition
(tests/helpers/blockwise.py): the moments read back from the codes, the step's float32 arithmetic, the new
codes and block scales (bit for bit), and w from the moments as stored (to float32 rounding: the kernel sums
the norms in double, in its own order).
"""
import ctypes

import numpy as np
import pytest

import blockwise
from mindspore_lamb import state
from mindspore_lamb.backends import contract, fused_cpu

F = np.float32
SLOTS = state.declare({}, state.SLOTS_8BIT)
PAPER = dict(one_minus_beta1=0.1, one_minus_beta2=1e-3, m_grad_scale=1.0, eps=1e-6, eps_root=0.0,
             inv_bias_c1=10.0, inv_bias_c2=1000.0, grad_scale=1.0, decay_in_grad=0.0, decay_in_update=1.0,
             decay_outside=0.0, w_norm_max=np.inf, trust_lo=0.0, trust_hi=np.inf, proceed=1.0)
# every term of the general loop away from its neutral value
GENERAL = dict(PAPER, m_grad_scale=10.0, eps_root=1e-8, grad_scale=0.5, decay_in_grad=1.0, decay_in_update=0.0,
               w_norm_max=3.0, trust_lo=0.01, trust_hi=5.0)


@pytest.fixture(scope="module")
def lamb_step():
    return ctypes.CDLL(fused_cpu.library_path(slots=SLOTS)).LambStep


class Params:
    """w, the four 8-bit slots and g of each parameter, as the kernel takes them."""

    def __init__(self, shapes, rng):
        self.shapes = shapes
        self.w = [rng.standard_normal(s).astype(F) for s in shapes]
        self.slots = {slot.role: [np.zeros(slot.shape(s), np.dtype(contract.dtype_name(slot.dtype))) for s in shapes]
                      for slot in SLOTS}
        self.g = [np.zeros(s, F) for s in shapes]

    def copy(self):
        other = Params.__new__(Params)
        other.shapes = self.shapes
        other.w = [x.copy() for x in self.w]
        other.slots = {role: [x.copy() for x in xs] for role, xs in self.slots.items()}
        other.g = [x.copy() for x in self.g]
        return other


def call(lamb_step, params, scalars, lrs, wds, codes=None):
    """One LambStep call on `params` (updated in place); (return code, stats (n + 1, 3))."""
    n = len(params.w)
    stats = np.zeros((n + 1, 3), F)
    codes = np.ones(n, F) if codes is None else np.asarray(codes, F)
    arrays = [np.array(contract.pack(**scalars), F), np.asarray(lrs, F), np.asarray(wds, F), codes, *params.w,
              *[x for slot in SLOTS for x in params.slots[slot.role]], *params.g, stats]
    count = len(arrays)
    shapes = [np.array(a.shape, np.int64) for a in arrays]
    rc = lamb_step(ctypes.c_int(count), (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays]),
                   (ctypes.c_int * count)(*[a.ndim for a in arrays]),
                   (ctypes.POINTER(ctypes.c_int64) * count)(*[s.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
                                                              for s in shapes]),
                   (ctypes.c_char_p * count)(*[str(a.dtype).encode() for a in arrays]), None, None)
    return rc, stats


def emulate(params, scalars, lrs, wds):
    """The step in float32 NumPy: (the new Params, stats)."""
    s = {name: F(value) for name, value in scalars.items()}
    out = params.copy()
    stats = np.zeros((len(params.w) + 1, 3), F)
    stats[:, 0] = 1.0
    if not s["proceed"]:
        return out, stats
    us, w_sq, u_sq = [], [], []
    grad_sq = 0.0
    for i, w in enumerate(params.w):
        w = w.reshape(-1)
        count = w.size
        m0 = blockwise.dequantize_signed(params.slots["m"][i], params.slots["m_scale"][i], count)
        v0 = blockwise.dequantize_unsigned(params.slots["v"][i], params.slots["v_scale"][i], count)
        graw = params.g[i].reshape(-1)
        wd = F(wds[i])
        g = graw * s["grad_scale"] + wd * s["decay_in_grad"] * w
        gm = g * s["m_grad_scale"]
        mn = m0 + s["one_minus_beta1"] * (gm - m0)
        with np.errstate(over="ignore", invalid="ignore"):
            vn = v0 + s["one_minus_beta2"] * (g * g - v0)
        ok = np.abs(vn) <= np.finfo(F).max
        m, v = np.where(ok, mn, m0), np.where(ok, vn, v0)
        mc, msc = blockwise.quantize_signed(m)
        vc, vsc = blockwise.quantize_unsigned(v)
        out.slots["m"][i], out.slots["m_scale"][i], out.slots["v"][i], out.slots["v_scale"][i] = mc, msc, vc, vsc
        m_st, v_st = blockwise.dequantize_signed(mc, msc, count), blockwise.dequantize_unsigned(vc, vsc, count)
        if s["eps_root"]:                          # eps inside the square root: sqrt(v^ + eps_root) an element
            den = np.sqrt(v_st * s["inv_bias_c2"] + s["eps_root"])
        else:                                      # sqrt(v^) as the format reads it back (a root per block)
            den = blockwise.root_unsigned(vc, vsc, count, s["inv_bias_c2"])
        r = (m_st * s["inv_bias_c1"]) / (den + s["eps"])
        u = r + wd * s["decay_in_update"] * w
        us.append(u)
        w_sq.append(np.sum(w.astype(np.float64) ** 2))
        u_sq.append(np.sum(u.astype(np.float64) ** 2))
        grad_sq += np.sum(graw.astype(np.float64) ** 2)
    stats[-1, 0] = F(grad_sq)
    if not np.isfinite(stats[-1, 0]):
        return out, stats
    stats[-1, 1] = 1.0
    for i, w in enumerate(params.w):
        decay_factor = F(1) - F(lrs[i]) * F(wds[i]) * s["decay_outside"]
        w_norm, u_norm = np.sqrt(F(w_sq[i])) * decay_factor, np.sqrt(F(u_sq[i]))
        w_used = min(w_norm, s["w_norm_max"])
        q = w_used / u_norm if w_used > 0 and u_norm > 0 else F(1)
        q = F(min(max(q, s["trust_lo"]), s["trust_hi"]))
        out.w[i] = (decay_factor * w - (F(lrs[i]) * q) * us[i].reshape(w.shape)).astype(F)
        stats[i] = q, w_norm, u_norm
    return out, stats


def assert_step(lamb_step, params, scalars, lrs, wds):
    """One kernel call against the emulation: codes and scales bit for bit, w and stats to float32 rounding."""
    want, want_stats = emulate(params, scalars, lrs, wds)
    rc, stats = call(lamb_step, params, scalars, lrs, wds)
    assert rc == 0
    for slot in SLOTS:
        for got, expected in zip(params.slots[slot.role], want.slots[slot.role]):
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected, err_msg=slot.role)
    for got, expected in zip(params.w, want.w):
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(stats, want_stats, rtol=2e-6)
    return stats


# N a multiple of the block, not one, one block, less than one, and more than one chunk (1 << 16) with a tail
SHAPES = [(4, 256), (3, 100), (256,), (7,), (2, 65536 + 300)]


@pytest.mark.parametrize("scalars", [PAPER, GENERAL], ids=["paper", "general"])
def test_steps_match_the_format_bit_for_bit(lamb_step, scalars):
    rng = np.random.default_rng(0)
    params = Params(SHAPES, rng)
    lrs, wds = [0.1, 0.01, 0.2, 0.05, 0.1], [0.01, 0.0, 0.1, 0.01, 0.01]
    for _ in range(4):            # from the zero state, then from codes and scales the kernel wrote
        for g in params.g:
            g[...] = rng.standard_normal(g.shape).astype(F) * F(rng.choice([1e-3, 1.0, 30.0]))
        assert_step(lamb_step, params, scalars, lrs, wds)
    assert all(np.count_nonzero(c) > 0.9 * c.size for c in params.slots["v"][:1])  # the codes are used


def test_every_code_reads_back_exactly(lamb_step):
    """1 - beta = 0 keeps the moments as read back, and with q = 1 (no layer adaptation), lr = 1 and w = 0 the
    step writes w = -u exactly: every code of both moments, read back, is checked to the last bit (the second
    moment's square root read back as the format says: sqrt(s / bc2) per block, times (c/255)^2)."""
    rng = np.random.default_rng(6)
    params = Params([(2, 256)], rng)
    params.w[0][...] = 0.0
    params.slots["m"][0][...] = np.resize(np.arange(-127, 128), 512)
    params.slots["v"][0][...] = np.concatenate([np.arange(256), rng.integers(1, 256, 256)])
    params.slots["m_scale"][0][...] = [0.37, 3.1e-5]
    params.slots["v_scale"][0][...] = [2.5e-3, 7.0]
    scalars = dict(PAPER, one_minus_beta1=0.0, one_minus_beta2=0.0)
    want, _ = emulate(params, scalars, [1.0], [0.0])
    rc, _ = call(lamb_step, params, scalars, [1.0], [0.0], codes=[0.0])
    assert rc == 0
    m = blockwise.dequantize_signed(want.slots["m"][0], want.slots["m_scale"][0], 512)
    root_v = blockwise.root_unsigned(want.slots["v"][0], want.slots["v_scale"][0], 512, 1000.0)   # sqrt(v^)
    u = (m * F(10.0)) / (root_v + F(1e-6))
    np.testing.assert_array_equal(params.w[0].reshape(-1), -u)
    for role in SLOTS.roles:
        np.testing.assert_array_equal(params.slots[role][0], want.slots[role][0])


def _near(x, ulps=3):
    """float32 `x` > 0 and its neighbours up to `ulps` units in the last place away."""
    bits = np.asarray(x, F).view(np.int32)
    return np.concatenate([(bits + k).view(F) for k in range(-ulps, ulps + 1)])


def test_codes_at_their_rounding_boundaries(lamb_step):
    """From the zero state with 1 - beta = 1, m = g and v = g^2 exactly: values on and next to the points where a
    code rounds up (block scales that are not powers of 2), quantized bit for bit as the format says."""
    k = np.arange(1, 128, dtype=np.float64)
    m_scale, v_scale = 0.7, 0.3
    m_values = _near(m_scale * ((k - 0.5) / 127) ** 2)
    g_v = _near(np.sqrt(v_scale * ((np.arange(1, 256) - 0.5) / 255) ** 4))
    blocks = []
    for values, top in ((m_values, m_scale), (-m_values, m_scale), (g_v, np.sqrt(v_scale))):
        values = values[values < top]
        for lo in range(0, values.size, 255):
            block = np.zeros(256, F)
            block[0] = top                                       # the block's largest
            block[1:1 + values[lo:lo + 255].size] = values[lo:lo + 255]
            blocks.append(block)
    g = np.concatenate(blocks)
    params = Params([g.shape], np.random.default_rng(7))
    params.g[0][...] = g
    assert_step(lamb_step, params, dict(PAPER, one_minus_beta1=1.0, one_minus_beta2=1.0), [0.1], [0.01])


def test_a_zero_block_and_a_block_with_one_huge_value(lamb_step):
    rng = np.random.default_rng(1)
    params = Params([(4 * 256,)], rng)
    for _ in range(3):
        g = rng.standard_normal(4 * 256).astype(F) * F(1e-2)
        g[256:512] = 0.0                  # block 1: zero moments, scale 0, codes 0
        g[600] = 1e6                      # block 2: one huge value, the others round to small codes
        params.g[0][...] = g
        assert_step(lamb_step, params, PAPER, [0.1], [0.01])
    m, v = params.slots["m"][0].reshape(4, 256), params.slots["v"][0].reshape(4, 256)
    assert not m[1].any() and not v[1].any()
    assert params.slots["m_scale"][0][1] == 0.0 and params.slots["v_scale"][0][1] == 0.0
    assert np.abs(m[2]).max() == 127 and np.count_nonzero(m[2]) < 256        # the small m read back as 0
    assert v[2].max() == 255 and v[2].min() >= 1                             # each v > 0 reads back > 0


def test_padding_is_zero_and_never_counts(lamb_step):
    """The codes past the last element are written 0, whatever they held, and read as nothing."""
    rng = np.random.default_rng(2)
    params = Params([(300,)], rng)
    params.g[0][...] = rng.standard_normal(300).astype(F)
    assert_step(lamb_step, params, PAPER, [0.1], [0.01])
    params.slots["m"][0][300:] = 77
    params.slots["v"][0][300:] = 200
    params.g[0][...] = rng.standard_normal(300).astype(F)
    emulated, _ = emulate(params, PAPER, [0.1], [0.01])      # reads the first 300 codes only
    rc, _ = call(lamb_step, params, PAPER, [0.1], [0.01])
    assert rc == 0
    assert not params.slots["m"][0][300:].any() and not params.slots["v"][0][300:].any()
    np.testing.assert_array_equal(params.slots["m_scale"][0], emulated.slots["m_scale"][0])
    np.testing.assert_allclose(params.w[0], emulated.w[0], rtol=2e-6)


def test_nan_gradient_element_keeps_its_moments_and_skips_the_weights(lamb_step):
    rng = np.random.default_rng(3)
    params = Params([(2, 256)], rng)
    params.g[0][...] = rng.standard_normal((2, 256)).astype(F)
    assert_step(lamb_step, params, PAPER, [0.1], [0.01])
    w_before = params.w[0].copy()
    params.g[0][...] = rng.standard_normal((2, 256)).astype(F)
    params.g[0][1, 5] = np.nan
    stats = assert_step(lamb_step, params, PAPER, [0.1], [0.01])   # the other elements' moments move
    assert np.isnan(stats[-1, 0]) and stats[-1, 1] == 0.0
    np.testing.assert_array_equal(params.w[0], w_before)


def test_skipped_step_touches_nothing(lamb_step):
    rng = np.random.default_rng(4)
    params = Params([(3, 100), (256,)], rng)
    for g in params.g:
        g[...] = rng.standard_normal(g.shape).astype(F)
    assert_step(lamb_step, params, PAPER, [0.1, 0.1], [0.01, 0.01])
    before = params.copy()
    rc, stats = call(lamb_step, params, dict(PAPER, proceed=0.0), [0.1, 0.1], [0.01, 0.01])
    assert rc == 0
    np.testing.assert_array_equal(stats, [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    for got, want in zip(params.w, before.w):
        np.testing.assert_array_equal(got, want)
    for role in SLOTS.roles:
        for got, want in zip(params.slots[role], before.slots[role]):
            np.testing.assert_array_equal(got, want)


def test_the_8bit_library_and_its_wrong_dtypes(lamb_step):
    assert fused_cpu.slot_defines(SLOTS)[-1] == f"-DLAMB_BLOCK={state.BLOCK}"
    assert not any("LAMB_BLOCK" in flag for flag in fused_cpu.FLAGS)     # the float32 library as it was
    params = Params([(256,)], np.random.default_rng(5))
    params.slots["v"] = [x.view(np.int8) for x in params.slots["v"]]     # v codes must be uint8
    assert call(lamb_step, params, PAPER, [0.1], [0.01])[0] == 2
    library = ctypes.CDLL(fused_cpu.library_path(slots=SLOTS))
    # the sharded 8-bit kernels (tests/test_optim_bits_sharded.py) refuse a wrong argument count
    for name in ("LambShardSums", "LambShardApplyBucket", "LambShardTotal", "LambShardApplyWhole"):
        assert getattr(library, name)(ctypes.c_int(0), None, None, None, None, None, None) in (1, 3)
