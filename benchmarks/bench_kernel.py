"""The fused CPU kernel alone (ctypes, no MindSpore): where the time of a LAMB step goes.

Calls ``LambStep`` of ``mindspore_lamb/backends/fused_cpu.cc`` directly on NumPy arrays, interleaved call by
call with:

* ``lamb``: the shipped kernel, both passes (40 bytes an element: pass 1 reads w g m v and writes m v,
  pass 2 reads w m v and writes w);
* ``lamb pass 1``: the same kernel on gradients whose last element is NaN, so that it runs pass 1 and
  skips pass 2 (G not finite) - the cost of pass 1 alone;
* ``lamb, trivial math`` (and its pass 1): the kernel with ``r = m + v`` instead of
  ``m^ / (sqrt(v^) + eps)``, built from a patched copy of the source: the cost of the memory traffic
  alone;
* ``adam-like``: a single pass that reads w g m v and writes w m v (28 bytes an element), the same
  chunking and OpenMP structure, compiled with the same flags: what one pass of nn.Adam's kind costs;
* with ``--optim-bits 8``, also ``lamb 8-bit`` (and its pass 1): the kernel of ``Lamb(optim_bits=8)`` on the
  same tensors, its moments as int8/uint8 codes with float32 block scales (docs/memory.md, "The 8-bit format").

Run:  python benchmarks/bench_kernel.py [--elems 13700000] [--tensors 8] [--repeats 30] [--optim-bits 8]
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import cpu_header, interleave, summary  # noqa: E402
from mindspore_lamb import state  # noqa: E402
from mindspore_lamb.backends import contract, fused_cpu  # noqa: E402  (compiles and caches the kernel)

ADAM_LIKE = r"""
#include <cmath>
#include <cstdint>
#include <omp.h>
extern "C" void AdamLike(int n, float **w, float **m, float **v, const float **g, const int64_t *len) {
  const float b1 = 0.9f, b2 = 0.999f, c1 = 10.0f, c2 = 1000.0f, eps = 1e-6f, lr = 1e-7f;
  const int64_t chunk = 1 << 16;
  int64_t nc = 0;
  for (int i = 0; i < n; ++i) nc += (len[i] + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < nc; ++c) {
    int i = 0; int64_t k = c;
    while (k >= (len[i] + chunk - 1) / chunk) { k -= (len[i] + chunk - 1) / chunk; ++i; }
    int64_t lo = k * chunk, hi = lo + chunk < len[i] ? lo + chunk : len[i];
    float *W = w[i], *M = m[i], *V = v[i]; const float *G = g[i];
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      float mj = b1 * M[j] + (1.0f - b1) * G[j];
      float vj = b2 * V[j] + (1.0f - b2) * (G[j] * G[j]);
      M[j] = mj; V[j] = vj;
      W[j] = W[j] - lr * (mj * c1) / (std::sqrt(vj * c2) + eps);
    }
  }
}
"""
R_LINE = "r = (m * h.inv_bc1) / (std::sqrt(v * h.inv_bc2) + h.eps);"


def _build(tmp):
    shipped = fused_cpu.library_path()
    with open(fused_cpu.SRC) as f:
        src = f.read()
    if R_LINE not in src:
        raise SystemExit(f"bench_kernel: the line to patch ({R_LINE}) is no longer in fused_cpu.cc")
    trivial_src = os.path.join(tmp, "lamb_trivial.cc")
    with open(trivial_src, "w") as f:
        f.write(src.replace(R_LINE, "r = m + v;"))
    trivial = fused_cpu.library_path(src=trivial_src)
    adam_src = os.path.join(tmp, "adam_like.cc")
    with open(adam_src, "w") as f:
        f.write(ADAM_LIKE)
    adam = os.path.join(tmp, "adam_like.so")
    subprocess.run(["g++", *fused_cpu.FLAGS, adam_src, "-o", adam], check=True)
    return shipped, trivial, adam


class Arrays:
    def __init__(self, n_tensors, numel, nan_last=False):
        rng = np.random.default_rng(0)
        self.hyper = np.array(contract.pack(one_minus_beta1=0.1, one_minus_beta2=1e-3,
                                            m_grad_scale=1.0, eps=1e-6, eps_root=0.0, inv_bias_c1=10.0,
                                            inv_bias_c2=1000.0, grad_scale=1.0, decay_in_grad=0.0,
                                            decay_in_update=1.0, decay_outside=0.0, w_norm_max=np.inf,
                                            trust_lo=0.0, trust_hi=np.inf, proceed=1.0), np.float32)
        self.lrs = np.full(n_tensors, 1e-7, np.float32)
        self.wds = np.full(n_tensors, 0.01, np.float32)
        self.layer_codes = np.ones(n_tensors, np.float32)
        self.w = [rng.standard_normal(numel).astype(np.float32) for _ in range(n_tensors)]
        self.m = [np.zeros(numel, np.float32) for _ in range(n_tensors)]
        self.v = [np.zeros(numel, np.float32) for _ in range(n_tensors)]
        self.g = [rng.standard_normal(numel).astype(np.float32) * 1e-3 for _ in range(n_tensors)]
        self.g_nan = [x.copy() for x in self.g]
        self.g_nan[-1][-1] = np.nan
        self.stats = np.zeros((n_tensors + 1, 3), np.float32)

    def lamb_args(self, nan, eight_bit=False):
        if eight_bit:       # the 8-bit slots, in state.SLOTS_8BIT's order: m codes, m scales, v codes, v scales
            blocks = -(-self.w[0].size // state.BLOCK)
            codes = lambda dtype: [np.zeros(blocks * state.BLOCK, dtype) for _ in self.w]  # noqa: E731
            scales = lambda: [np.zeros(blocks, np.float32) for _ in self.w]  # noqa: E731
            slots = [codes(np.int8), scales(), codes(np.uint8), scales()]
        else:
            slots = [self.m, self.v]
        arrs = [self.hyper, self.lrs, self.wds, self.layer_codes, *self.w, *(x for slot in slots for x in slot),
                *(self.g_nan if nan else self.g), self.stats]
        n = len(arrs)
        shapes = [np.array(a.shape, np.int64) for a in arrs]
        dtypes = [str(a.dtype).encode() for a in arrs]
        args = (ctypes.c_int(n), (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrs]),
                (ctypes.c_int * n)(*[a.ndim for a in arrs]),
                (ctypes.POINTER(ctypes.c_int64) * n)(*[s.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
                                                        for s in shapes]),
                (ctypes.c_char_p * n)(*dtypes), None, None)
        return args, (shapes, arrs)  # keep them alive while `args` is used

    def adam_args(self):
        n = len(self.w)
        ptrs = lambda xs: (ctypes.POINTER(ctypes.c_float) * n)(  # noqa: E731
            *[x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for x in xs])
        lens = np.array([x.size for x in self.w], np.int64)
        return (ctypes.c_int(n), ptrs(self.w), ptrs(self.m), ptrs(self.v), ptrs(self.g),
                lens.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))), lens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elems", type=int, default=13_700_000, help="elements per tensor")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--optim-bits", type=int, choices=(32, 8), default=32,
                    help="8: also time the kernel of Lamb(optim_bits=8) on the same tensors")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shipped, trivial, adam = _build(tmp)
        arrays = Arrays(a.tensors, a.elems)
        kernels = {}
        keep = []
        for name, path in (("lamb", shipped), ("lamb, trivial math", trivial)):
            f = ctypes.CDLL(path).LambStep
            for suffix, nan in (("", False), (" pass 1", True)):
                args, shapes = arrays.lamb_args(nan)
                keep.append(shapes)
                kernels[name + suffix] = (f, args)
        if a.optim_bits == 8:
            f = ctypes.CDLL(fused_cpu.library_path(slots=state.Slots(state.SLOTS_8BIT))).LambStep
            for suffix, nan in (("", False), (" pass 1", True)):
                args, kept = arrays.lamb_args(nan, eight_bit=True)
                keep.append(kept)
                kernels["lamb 8-bit" + suffix] = (f, args)
        args, lens = arrays.adam_args()
        keep.append(lens)
        kernels["adam-like"] = (ctypes.CDLL(adam).AdamLike, args)

        for f, args in kernels.values():
            f(*args)
        times = interleave({k: (lambda f=f, args=args: f(*args)) for k, (f, args) in kernels.items()}, a.repeats)
    total = a.tensors * a.elems
    print(cpu_header())
    print(f"{a.tensors} x {a.elems} float32 elements, {a.repeats} interleaved calls each, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'kernel':<26}{'median ms':>10}{'min ms':>9}{'ns/elem':>9}{'x adam-like':>12}")
    for k, med, low, ratio in summary(times, "adam-like"):
        print(f"{k:<26}{med:>10.2f}{low:>9.2f}{med / total * 1e6:>9.3f}{ratio:>12.2f}")


if __name__ == "__main__":
    main()
