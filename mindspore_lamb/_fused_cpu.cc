// Fused CPU kernels for mindspore_lamb (issue 7), loaded with ops.Custom(func_type="aot").
//
// MindSpore's aot calling convention (CPU): int f(int nparam, void **params, int *ndims,
// int64_t **shapes, const char **dtypes, void *stream, void *extra); inputs first, then outputs.
//
// LambSumSq(g_0 .. g_{n-1}) -> float32[1]: sum of g^2 over every gradient (double accumulators).
//
// LambStep(hyper, lrs, wds, flags, w_0..w_{n-1}, m_0..m_{n-1}, v_0..v_{n-1}, g_0..g_{n-1}) -> stats (n, 3)
//   hyper = float32[8]: beta1, beta2, eps, bias_c1, bias_c2, grad_scale, trust_lo, trust_hi
//   lrs[i], wds[i]: learning rate and weight decay of parameter i (wds[i] = 0 when i is not decayed)
//   flags[i]: 1 = layer-adapted, 0 = q forced to 1 (layer_adaptation=False), -1 = not updated here
//   w_i, m_i, v_i are float32 and are UPDATED IN PLACE (they are the Parameters' memory on CPU);
//   stats[i] = (q, ||w||, ||u||), as the composite update returns.
// The arithmetic is that of mindspore_lamb/_update.py, operation by operation, in float32
// (no FMA contraction: -ffp-contract=off; -fno-math-errno lets sqrt vectorize, still correctly rounded);
// only the norms accumulate in double.
// Two passes per parameter: (1) m, v updated and stored, ||w||^2 and ||u||^2 accumulated;
// (2) u recomputed from the stored m, v and w, w -= lr q u. 40 bytes of traffic per element.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <vector>

namespace {

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

constexpr int64_t kParallelMin = 1 << 15;  // below this many elements a tensor is done by one thread

struct Hyper {
  float b1, b2, eps, bc1, bc2, gs, lo, hi;
  float one_minus_b1, one_minus_b2;
};

inline float update_u(const Hyper &h, float m, float v, float w, float wd) {
  float r = (m / h.bc1) / (std::sqrt(v / h.bc2) + h.eps);
  return r + wd * w;
}

// u_out: where to keep u for pass 2 (nullptr: pass 2 recomputes it from m, v, w)
void pass1(const Hyper &h, float wd, float *w, float *m, float *v, const float *g, int64_t n,
           double *w_sq, double *u_sq, float *u_out) {
  double ws = 0.0, us = 0.0;
#pragma omp parallel for simd reduction(+ : ws, us) schedule(static) if (n >= kParallelMin)
  for (int64_t j = 0; j < n; ++j) {
    float gj = g[j] * h.gs;
    float mj = h.b1 * m[j] + h.one_minus_b1 * gj;
    float vj = h.b2 * v[j] + h.one_minus_b2 * (gj * gj);
    m[j] = mj;
    v[j] = vj;
    float wj = w[j];
    float uj = update_u(h, mj, vj, wj, wd);
    if (u_out) u_out[j] = uj;
    ws += static_cast<double>(wj) * wj;
    us += static_cast<double>(uj) * uj;
  }
  *w_sq = ws;
  *u_sq = us;
}

void pass2_stored(float step, float *w, const float *u, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t j = 0; j < n; ++j) w[j] = w[j] - step * u[j];
}

void pass2(const Hyper &h, float wd, float step, float *w, const float *m, const float *v, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t j = 0; j < n; ++j) {
    float wj = w[j];
    w[j] = wj - step * update_u(h, m[j], v[j], wj, wd);
  }
}

float *scratch(int64_t n) {  // one persistent buffer, grown to the largest parameter
  static std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

#ifdef LAMB_RECOMPUTE_U
constexpr bool use_scratch = false;
#else
constexpr bool use_scratch = true;
#endif

bool all_float32(int from, int to, const char **dtypes) {
  for (int i = from; i < to; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

}  // namespace

extern "C" int LambSumSq(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  int n = nparam - 1;
  if (!all_float32(0, nparam, dtypes)) return 1;
  double total = 0.0;
  for (int i = 0; i < n; ++i) {
    const float *g = static_cast<const float *>(params[i]);
    int64_t len = numel(ndims[i], shapes[i]);
    double s = 0.0;
#pragma omp parallel for simd reduction(+ : s) schedule(static) if (len >= kParallelMin)
    for (int64_t j = 0; j < len; ++j) s += static_cast<double>(g[j]) * g[j];
    total += s;
  }
  *static_cast<float *>(params[nparam - 1]) = static_cast<float>(total);
  return 0;
}

extern "C" int LambStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void *stream, void *extra) {
  if ((nparam - 5) % 4 != 0) return 1;
  int n = (nparam - 5) / 4;
  if (!all_float32(0, nparam, dtypes)) return 2;
  const float *hp = static_cast<const float *>(params[0]);
  Hyper h{hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7], 1.0f - hp[0], 1.0f - hp[1]};
  const float *lrs = static_cast<const float *>(params[1]);
  const float *wds = static_cast<const float *>(params[2]);
  const float *flags = static_cast<const float *>(params[3]);
  float *stats = static_cast<float *>(params[nparam - 1]);
  for (int i = 0; i < n; ++i) {
    int k = 4 + i;
    float *w = static_cast<float *>(params[k]);
    float *m = static_cast<float *>(params[k + n]);
    float *v = static_cast<float *>(params[k + 2 * n]);
    const float *g = static_cast<const float *>(params[k + 3 * n]);
    int64_t len = numel(ndims[k], shapes[k]);
    if (flags[i] < 0.0f) {  // updated by another rank (parallel optimizer)
      stats[3 * i] = 1.0f; stats[3 * i + 1] = 0.0f; stats[3 * i + 2] = 0.0f;
      continue;
    }
    double w_sq, u_sq;
    float *u_buf = use_scratch ? scratch(len) : nullptr;
    pass1(h, wds[i], w, m, v, g, len, &w_sq, &u_sq, u_buf);
    float w_norm = std::sqrt(static_cast<float>(w_sq));
    float u_norm = std::sqrt(static_cast<float>(u_sq));
    float q = (w_norm > 0.0f && u_norm > 0.0f) ? w_norm / u_norm : 1.0f;
    q = std::fmin(std::fmax(q, h.lo), h.hi);   // lo = 0, hi = inf when clipping is off
    if (flags[i] == 0.0f) q = 1.0f;
    if (u_buf) pass2_stored(lrs[i] * q, w, u_buf, len);
    else pass2(h, wds[i], lrs[i] * q, w, m, v, len);
    stats[3 * i] = q; stats[3 * i + 1] = w_norm; stats[3 * i + 2] = u_norm;
  }
  return 0;
}
