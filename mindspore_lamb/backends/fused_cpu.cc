// The fused CPU backend of the LAMB update (docs/architecture.md), loaded with ops.Custom(func_type="aot").
//
// MindSpore's aot calling convention (CPU): int f(int nparam, void **params, int *ndims,
// int64_t **shapes, const char **dtypes, void *stream, void *extra); inputs first, then outputs.
//
// LambSumSq(g_0 .. g_{n-1}) -> float32[1]: sum of g^2 over every gradient (double accumulators).
//
// LambStep(scalars, lrs, wds, layer_codes, w_0..w_{n-1}, m_0..m_{n-1}, v_0..v_{n-1}, g_0..g_{n-1}) -> (n + 1, 3)
//   scalars: float32[kScalarCount], laid out as mindspore_lamb/backends/contract.py's `pack`; the enum
//   below is generated from it: fused_cpu.py compiles this file with -DLAMB_SCALARS(X)=X(one_minus_beta1)..
//   and a library is never built without it. A wrong length is rejected (return code 3).
//   lrs[i], wds[i]: learning rate and weight decay of parameter i (wds[i] = 0 when i is not decayed)
//   layer_codes[i]: 1 = layer-adapted, 0 = q forced to 1 (layer_adaptation=False), -1 = not updated here
//   the state slots follow the weights, slot by slot in the order of the optimizer's slots (state.Slots;
//   -DLAMB_SLOTS(X)=X(m) X(v), generated from them: kSlotCount, and the argument count, follow it);
//   w_i, v_i are float32, m_i float32, float16 or bfloat16 (all alike: Lamb's mu_dtype); w, m, v are
//   UPDATED IN PLACE (they are the Parameters' memory on CPU); a wrong count is return code 1, a wrong
//   dtype return code 2;
//   out[i] = (q, ||w||, ||u||) of parameter i; out[n] = (sum of g^2, applied, 0).
//   Built with -DLAMB_BLOCK=256 (the 8-bit slot set of optim_bits=8, -DLAMB_SLOTS(X)=X(m) X(m_scale) X(v)
//   X(v_scale)): the moments are int8 (m) and uint8 (v) codes, flat and padded to whole blocks, with float32
//   block scales; pass 1 works block by block: the moments read back from the codes, the same float32 step,
//   the block's new scales and codes, u from the moments as stored (read back from the new codes); pass 2
//   reads them back again (the same bits). 22 bytes of memory traffic per element.
//
// The arithmetic is that of mindspore_lamb/backends/composite.py, operation by operation, in float32 (no
// FMA contraction: -ffp-contract=off; -fno-math-errno lets sqrt vectorize, still correctly rounded); only
// the norms accumulate in double. m is read as float32 and rounded to nearest (ties to even) when stored in
// float16 or bfloat16; the update is computed from m as stored. 40 bytes of memory traffic per element
// (34 with a 16-bit m):
//   pass 1: m, v updated and stored; ||w||^2, ||u||^2 and ||g||^2 accumulated (read w g m v, write m v);
//           an element whose new v is not finite (g NaN/Inf, or g^2 overflowing) keeps its m and v;
//   sum of g^2 not finite: pass 2 is skipped and applied = 0 (w untouched);
//   ||w|| or ||u|| not finite (NaN/Inf already in the weights, or in the moments): that tensor is left as
//   it is, q reads NaN;
//   pass 2: u recomputed from the stored m, v and w (bit-identical to pass 1's), w -= lr q u.
// ONE OpenMP parallel region per call with a single barrier between the passes (a fork/join per tensor
// costs a scheduler time slice whenever a thread is preempted on a loaded machine). The work is cut into
// chunks of kChunk elements of one tensor, handed out dynamically. Each chunk's partial norms are summed
// in chunk order: the results do not depend on the number of threads or on the scheduling.
#include <omp.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(LAMB_SCALARS) || !defined(LAMB_GENERAL_ONLY) || !defined(LAMB_SLOTS)
#error "build this file through mindspore_lamb/backends/fused_cpu.py, which defines LAMB_SCALARS, LAMB_GENERAL_ONLY and LAMB_SLOTS"
#endif

namespace {

enum ScalarIndex : int {
#define LAMB_SCALAR_INDEX(name) k_##name,
  LAMB_SCALARS(LAMB_SCALAR_INDEX)
#undef LAMB_SCALAR_INDEX
  kScalarCount
};

enum SlotIndex : int {
#define LAMB_SLOT_INDEX(name) kSlot_##name,
  LAMB_SLOTS(LAMB_SLOT_INDEX)
#undef LAMB_SLOT_INDEX
  kSlotCount
};

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

struct Hyper {
  float one_minus_b1, one_minus_b2, m_grad_scale, eps, eps_root, inv_bc1, inv_bc2, gs;
};

// Per tensor: the weight decay where it goes (only one of the three is not 0/1, see LambStep).
struct Decay {
  float in_grad;    // g += in_grad w            (L2 mode)
  float in_update;  // u = r + in_update w       (decoupled, the paper)
  float decay_factor;  // w = decay_factor w - lr q u  (decoupled outside the trust ratio: 1 - lr lambda)
};

// kGeneral false: the paper's rule only (no L2 term, grad averaging, eps outside the square root, decay
// inside the update), the fastest loops; true: every option of Lamb. Both give the same bits for the
// paper's rule (every extra term is then an exact no-op). The fast loops never read the scalars of
// LAMB_GENERAL_ONLY (contract.GENERAL_ONLY); is_general() takes the general loops whenever one of them is not
// at its neutral value, so a scalar the fast loops ignore is never ignored when it matters.
template <bool kGeneral>
inline float update_u(const Hyper &h, float m, float v, float w, const Decay &d) {
  float r;
  if (kGeneral) {
    r = (m * h.inv_bc1) / (std::sqrt(v * h.inv_bc2 + h.eps_root) + h.eps);  // eps inside and/or outside
  } else {
    r = (m * h.inv_bc1) / (std::sqrt(v * h.inv_bc2) + h.eps);  // r = m^ / (sqrt(v^) + eps)
  }
  return r + d.in_update * w;                                  // u = r + lambda w
}

constexpr int64_t kChunk = 1 << 16;  // elements: 256 KiB of each array

struct Chunk {
  int tensor;
  int64_t lo, hi;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t> &len, const float *layer_codes) {
  std::vector<Chunk> chunks;
  for (int i = 0; i < static_cast<int>(len.size()); ++i) {
    if (layer_codes != nullptr && layer_codes[i] < 0.0f) continue;  // another rank updates it
    for (int64_t lo = 0; lo < len[i]; lo += kChunk) chunks.push_back({i, lo, std::min(len[i], lo + kChunk)});
  }
  return chunks;
}

// acc + x^2 in double. x^2 is exact in double (24-bit significands), so a fused multiply-add gives the very
// same sum as a multiply then an add, in one instruction: used only where the FMA is native.
inline double add_sq(double acc, float x) {
  const double d = static_cast<double>(x);
#if defined(__FP_FAST_FMA) || defined(__FMA__)
  return std::fma(d, d, acc);
#else
  return acc + d * d;
#endif
}

// The bits of a float as an int32, and back (memcpy: well defined, compiles to nothing).
inline int32_t bits_of(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float float_of(int32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// The dtypes a first moment is stored in: float, Half (IEEE binary16) and Bf16 (bfloat16, the top 16 bits of
// a float32), both as their bits. load() reads one as float32 (exact); stored<T>() rounds a float32 to T, to
// nearest with ties to even (a NaN stays a NaN). Integer operations and selects only, so the loops
// vectorize on any ISA (GCC 12 leaves loops with _Float16 conversions scalar without AVX512-FP16); the
// binary16 conversions are those of F16C, bit for bit (checked against it for every float32).
enum class Half : uint16_t {};
enum class Bf16 : uint16_t {};

inline float load(float x) { return x; }
inline float load(Half x) {
  const uint32_t h = static_cast<uint32_t>(x);
  const uint32_t magnitude = (h & 0x7fffu) << 13;                  // exponent and significand, float-aligned
  const uint32_t exponent = magnitude & (0x7c00u << 13);
  const float normal = float_of(static_cast<int32_t>(magnitude + ((127u - 15u) << 23)));
  const float special = float_of(static_cast<int32_t>(magnitude + ((255u - 31u) << 23)));    // Inf, NaN
  const float tiny = float_of(static_cast<int32_t>(magnitude + (113u << 23))) - float_of(113 << 23);  // subnormal
  const float value = exponent == 0 ? tiny : (exponent == (0x7c00u << 13) ? special : normal);
  return float_of(bits_of(value) | static_cast<int32_t>((h & 0x8000u) << 16));
}
inline float load(Bf16 x) { return float_of(static_cast<int32_t>(static_cast<uint32_t>(x) << 16)); }

template <typename T>
inline T stored(float x);
template <>
inline float stored<float>(float x) { return x; }
template <>
inline Half stored<Half>(float x) {
  const uint32_t b = static_cast<uint32_t>(bits_of(x));
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7fffffffu;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;            // NaN stays NaN; 65520 and up: Inf
  // below 2^-14, a subnormal: adding 0.5 puts its 10 bits at the bottom, rounded to nearest even by the FPU
  const uint32_t tiny = static_cast<uint32_t>(bits_of(float_of(static_cast<int32_t>(a)) + 0.5f)) - (126u << 23);
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;   // ties to even
  return static_cast<Half>((a >= (143u << 23) ? big : (a < (113u << 23) ? tiny : normal)) | sign);
}
template <>
inline Bf16 stored<Bf16>(float x) {
  const uint32_t b = static_cast<uint32_t>(bits_of(x));
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // to nearest, ties to even
  const uint32_t quiet_nan = (b >> 16) | 0x40u;                      // rounding could carry a NaN to Inf
  return static_cast<Bf16>((b & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// The storage type of a dtype name of MindSpore's aot convention.
enum class Stored { kFloat32, kFloat16, kBfloat16, kInt8, kUint8, kOther };
Stored stored_as(const char *dtype) {
  if (std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0) return Stored::kFloat32;
  if (std::strcmp(dtype, "float16") == 0) return Stored::kFloat16;
  if (std::strcmp(dtype, "bfloat16") == 0) return Stored::kBfloat16;
  if (std::strcmp(dtype, "int8") == 0) return Stored::kInt8;
  if (std::strcmp(dtype, "uint8") == 0) return Stored::kUint8;
  return Stored::kOther;
}

// The moment step of one element (pass 1 of both state formats): m, v from the moments as stored (m0, v0,
// read as float32) and the raw gradient; an element whose new v is not finite keeps m0 and v0.
template <bool kGeneral>
inline void new_moments(const Hyper &h, const Decay &d, float graw, float wj, float m0, float v0, float *m,
                        float *v) {
  float gj = graw * h.gs;  // unscale (+ NVLAMB pre-normalisation)
  float gm = gj;
  if (kGeneral) {
    gj = gj + d.in_grad * wj;    // L2 mode: g + lambda w
    gm = gj * h.m_grad_scale;    // without grad averaging: m = b1 m + g = m + (1 - b1) (g / (1 - b1) - m)
  }
  // m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, written with the exact 1 - b only
  const float mn = m0 + h.one_minus_b1 * (gm - m0);
  const float vn = v0 + h.one_minus_b2 * (gj * gj - v0);
  // g NaN/Inf (or g^2 overflowing) makes v NaN/Inf: that element keeps its moments. The sum of g^2
  // is then not finite either, so pass 2 is skipped and the call is counted as skipped.
  // The test and the select are done on the bits, and m, v are stored unconditionally. Written
  // `ok ? mn : m0`, GCC sinks the computation of mn into the `ok` branch, cannot if-convert it back (a
  // float operation may trap) and, without AVX-512's masked stores, leaves the whole loop scalar: 4-5x
  // slower with AVX2 or SSE. |vn| > FLT_MAX or NaN <=> its bits without the sign > those of FLT_MAX.
  const int32_t mask = -static_cast<int32_t>((bits_of(vn) & 0x7fffffff) > 0x7f7fffff);  // 0, or all ones
  *m = float_of((bits_of(mn) & ~mask) | (bits_of(m0) & mask));
  *v = float_of((bits_of(vn) & ~mask) | (bits_of(v0) & mask));
}

template <bool kGeneral, typename MT>
void pass1(const Hyper &hyper, const Decay &decay, const float *w, MT *m, float *v, const float *g, int64_t lo,
           int64_t hi, double *sums) {
  const Hyper h = hyper;  // a local copy: the stores to m and v cannot alias it (else reloaded every element)
  const Decay d = decay;
  double ws = 0.0, us = 0.0, grad_sq = 0.0;
#pragma omp simd reduction(+ : ws, us, grad_sq)
  for (int64_t j = lo; j < hi; ++j) {
    const float graw = g[j], wj = w[j];
    float mn, vj;
    new_moments<kGeneral>(h, d, graw, wj, load(m[j]), v[j], &mn, &vj);
    const MT ms = stored<MT>(mn);
    m[j] = ms;
    v[j] = vj;
    const float uj = update_u<kGeneral>(h, load(ms), vj, wj, d);  // from m as stored
    ws = add_sq(ws, wj);
    us = add_sq(us, uj);
    grad_sq = add_sq(grad_sq, graw);
  }
  sums[0] = ws;
  sums[1] = us;
  sums[2] = grad_sq;
}

template <bool kGeneral, typename MT>
void pass2(const Hyper &hyper, const Decay &decay, float lr_q, const float *w, const MT *m, const float *v,
           float *out, int64_t lo, int64_t hi) {  // out: w itself (in place), or a sharded piece
  const Hyper h = hyper;  // a local copy (see pass1)
  const Decay d = decay;
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    float wj = w[j];
    const float uj = update_u<kGeneral>(h, load(m[j]), v[j], wj, d);
    out[j] = (kGeneral ? d.decay_factor * wj : wj) - lr_q * uj;  // w = w - (lr q) u
  }
}

#ifdef LAMB_BLOCK
// The 8-bit state (optim_bits=8; docs/memory.md, "The 8-bit format"): each moment as one 8-bit code per
// element, flat and padded with zeros to whole blocks of kBlock, and one float32 scale per block: s = the
// largest |x| of the block, at least 2^-126 (so that r = 1 / s is finite), 0 for a block of zeros (r = 0).
// m: int8 c = sign(x) floor(127 sqrt(|x| r) + 1/2), read back s (d |d|) with d = c (1/127);
// v: uint8 c = floor(255 sqrt(sqrt(x r)) + 1/2), at least 1 where x > 0, read back s (d^2)^2 with d = c (1/255).
// Every operation a float32 one, in that order (1/127 and 1/255 are float32 constants; 127 (1/127) and
// 255 (1/255) are exactly 1). One division per block; a chunk is whole blocks.
constexpr int kBlock = LAMB_BLOCK;
static_assert(kChunk % kBlock == 0, "a chunk must be whole blocks of the 8-bit state");
constexpr float kMinScale = FLT_MIN;  // 2^-126: the smallest scale, whose reciprocal is finite

inline float read_m(int32_t c, float s) {
  const float d = static_cast<float>(c) * (1.0f / 127.0f);
  return s * (d * std::fabs(d));  // s (c/127)|c/127|
}
inline float read_v(int32_t c, float s) {
  const float d = static_cast<float>(c) * (1.0f / 255.0f);
  const float t = d * d;
  return s * (t * t);             // s ((c/255)^2)^2
}
// floor(y + 1/2) for y >= 0 (truncation is floor there)
inline int32_t code_of(float y) { return static_cast<int32_t>(y + 0.5f); }
inline int32_t m_code(float x, float r) {
  const int32_t c = code_of(std::sqrt(std::fabs(x) * r) * 127.0f);
  return x < 0.0f ? -c : c;
}
inline int32_t v_code(float x, float r) {
  const int32_t c = code_of(std::sqrt(std::sqrt(x * r)) * 255.0f);
  return std::max(c, static_cast<int32_t>(x > 0.0f));  // a positive v never reads back as 0
}
// The block's scale from its largest |x|: at least kMinScale, 0 for a block of zeros (and NaN stays NaN).
inline float block_scale(float largest) { return largest > 0.0f ? std::fmax(largest, kMinScale) : largest; }
inline float reciprocal(float scale) { return scale > 0.0f ? 1.0f / scale : 0.0f; }
// The largest |x| of x[0..count) (0 when empty), on the bits: for |x| they order as the values, and a NaN
// comes out of it, as from a max that propagates NaN.
inline float largest(const float *x, int count) {
  int32_t top = 0;
#pragma omp simd reduction(max : top)
  for (int j = 0; j < count; ++j) top = std::max(top, bits_of(x[j]) & 0x7fffffff);
  return float_of(top);
}

// u of one element from its codes (the moments as stored), with root = sqrt(s_v / bc2), one per block: the
// square root of v^ = s_v (d^2)^2 / bc2 read back as root d^2, d = c_v (1/255) (no square root an element);
// with eps inside the square root (kEpsRoot: eps_root not 0), sqrt(v^ + eps_root) of v read back.
template <bool kGeneral, bool kEpsRoot>
inline float update_from_codes(const Hyper &h, const Decay &d, int32_t cm, float sm, int32_t cv, float sv,
                               float root, float w) {
  float den;
  if (kEpsRoot) {
    den = std::sqrt(read_v(cv, sv) * h.inv_bc2 + h.eps_root);
  } else {
    const float dv = static_cast<float>(cv) * (1.0f / 255.0f);
    den = root * (dv * dv);
  }
  const float r = (read_m(cm, sm) * h.inv_bc1) / (den + h.eps);  // r = m^ / (sqrt(v^) + eps)
  return r + d.in_update * w;                                    // u = r + lambda w
}
inline float block_root(const Hyper &h, float v_scale) { return std::sqrt(v_scale * h.inv_bc2); }

// pass 1 over whole blocks [lo, hi) (hi: a block boundary or the tensor's end): the moments read back from
// the codes, the step of pass1 on them (new_moments), the block's new scales and codes, and the norms with u
// from the moments as stored (read back from the new codes).
template <bool kGeneral, bool kEpsRoot>
void pass1_blocks(const Hyper &hyper, const Decay &decay, const float *w, int8_t *mc, float *ms, uint8_t *vc,
                  float *vs, const float *g, int64_t lo, int64_t hi, double *sums) {
  const Hyper h = hyper;  // local copies: the 8-bit stores may alias anything (else reloaded every element)
  const Decay d = decay;
  alignas(64) float mb[kBlock], vb[kBlock];  // the block's new moments
  double ws = 0.0, us = 0.0, grad_sq = 0.0;
  for (int64_t base = lo; base < hi; base += kBlock) {
    const int64_t b = base / kBlock;
    const int count = static_cast<int>(std::min<int64_t>(kBlock, hi - base));  // the rest: padding
    const float m_scale = ms[b], v_scale = vs[b];
    const float *wb = w + base, *gb = g + base;
    int8_t *mcb = mc + base;
    uint8_t *vcb = vc + base;
#pragma omp simd reduction(+ : ws, grad_sq)
    for (int j = 0; j < count; ++j) {
      new_moments<kGeneral>(h, d, gb[j], wb[j], read_m(mcb[j], m_scale), read_v(vcb[j], v_scale), &mb[j], &vb[j]);
      ws = add_sq(ws, wb[j]);
      grad_sq = add_sq(grad_sq, gb[j]);
    }
    const float sm = block_scale(largest(mb, count)), sv = block_scale(largest(vb, count));
    const float rm = reciprocal(sm), rv = reciprocal(sv), root = block_root(h, sv);
    ms[b] = sm;
    vs[b] = sv;
#pragma omp simd reduction(+ : us)
    for (int j = 0; j < count; ++j) {
      const int32_t cm = m_code(mb[j], rm), cv = v_code(vb[j], rv);
      mcb[j] = static_cast<int8_t>(cm);
      vcb[j] = static_cast<uint8_t>(cv);
      us = add_sq(us, update_from_codes<kGeneral, kEpsRoot>(h, d, cm, sm, cv, sv, root, wb[j]));  // as stored
    }
    std::fill(mcb + count, mcb + kBlock, int8_t{0});  // the padding (only the last block has any)
    std::fill(vcb + count, vcb + kBlock, uint8_t{0});
  }
  sums[0] = ws;
  sums[1] = us;
  sums[2] = grad_sq;
}

// pass 2 over whole blocks [lo, hi): u from the codes (the same bits as pass 1's), w -= lr q u into `out` (w
// itself, in place, or a sharded bucket).
template <bool kGeneral, bool kEpsRoot>
void pass2_blocks(const Hyper &hyper, const Decay &decay, float lr_q, const float *w, const int8_t *mc,
                  const float *ms, const uint8_t *vc, const float *vs, float *out, int64_t lo, int64_t hi) {
  const Hyper h = hyper;
  const Decay d = decay;
  for (int64_t base = lo; base < hi; base += kBlock) {
    const int64_t b = base / kBlock;
    const int count = static_cast<int>(std::min<int64_t>(kBlock, hi - base));
    const float sm = ms[b], sv = vs[b], root = block_root(h, sv);
    const float *wb = w + base;
    float *ob = out + base;
    const int8_t *mcb = mc + base;
    const uint8_t *vcb = vc + base;
#pragma omp simd
    for (int j = 0; j < count; ++j) {
      const float wj = wb[j];
      const float uj = update_from_codes<kGeneral, kEpsRoot>(h, d, mcb[j], sm, vcb[j], sv, root, wj);
      ob[j] = (kGeneral ? d.decay_factor * wj : wj) - lr_q * uj;  // w = w - (lr q) u
    }
  }
}

// The two passes, with eps inside the square root or not (only the general loops read eps_root).
template <bool kGeneral>
void pass1_8bit(const Hyper &h, const Decay &d, const float *w, int8_t *mc, float *ms, uint8_t *vc, float *vs,
                const float *g, int64_t lo, int64_t hi, double *sums) {
  auto pass = kGeneral && h.eps_root != 0.0f ? pass1_blocks<kGeneral, true> : pass1_blocks<kGeneral, false>;
  pass(h, d, w, mc, ms, vc, vs, g, lo, hi, sums);
}
template <bool kGeneral>
void pass2_8bit(const Hyper &h, const Decay &d, float lr_q, const float *w, const int8_t *mc, const float *ms,
                const uint8_t *vc, const float *vs, float *out, int64_t lo, int64_t hi) {
  auto pass = kGeneral && h.eps_root != 0.0f ? pass2_blocks<kGeneral, true> : pass2_blocks<kGeneral, false>;
  pass(h, d, lr_q, w, mc, ms, vc, vs, out, lo, hi);
}
#endif  // LAMB_BLOCK

Hyper read_hyper(const float *hp) {
  return Hyper{hp[k_one_minus_beta1], hp[k_one_minus_beta2], hp[k_m_grad_scale], hp[k_eps], hp[k_eps_root],
               hp[k_inv_bias_c1], hp[k_inv_bias_c2], hp[k_grad_scale]};
}

// Whether a scalar that only the general loops read is away from its neutral value (LAMB_GENERAL_ONLY).
bool is_general(const float *hp) {
  bool general = false;
#define LAMB_AWAY_FROM_NEUTRAL(name, neutral) general = general || hp[k_##name] != (neutral);
  LAMB_GENERAL_ONLY(LAMB_AWAY_FROM_NEUTRAL)
#undef LAMB_AWAY_FROM_NEUTRAL
  return general;
}

// Where each tensor's weight decay lambda_i goes; decay_factor_i = 1 - lr_i lambda_i outside the trust ratio.
std::vector<Decay> decays(const float *hp, const float *lrs, const float *wds, int n) {
  std::vector<Decay> decay(n);
  for (int i = 0; i < n; ++i) {
    decay[i] = {wds[i] * hp[k_decay_in_grad], wds[i] * hp[k_decay_in_update],
                1.0f - lrs[i] * wds[i] * hp[k_decay_outside]};
  }
  return decay;
}

// The chunks of the global flat range [start, end) of tensors of lengths `len` (sharded pieces).
std::vector<Chunk> range_chunks(const std::vector<int64_t> &len, int64_t start, int64_t end,
                                std::vector<int64_t> *offset) {
  std::vector<Chunk> chunks;
  int64_t off = 0;
  for (int i = 0; i < static_cast<int>(len.size()); ++i) {
    (*offset)[i] = off;
    const int64_t a = std::max(start, off), b = std::min(end, off + len[i]);
    for (int64_t lo = a; lo < b; lo += kChunk) chunks.push_back({i, lo - off, std::min(b, lo + kChunk) - off});
    off += len[i];
  }
  return chunks;
}

// Whether dtypes[from..to) are all `want`.
bool all_stored_as(int from, int to, const char **dtypes, Stored want) {
  for (int i = from; i < to; ++i)
    if (stored_as(dtypes[i]) != want) return false;
  return true;
}
bool all_float32(int from, int to, const char **dtypes) { return all_stored_as(from, to, dtypes, Stored::kFloat32); }

// Runs body<MT>() for the storage type of dtype `mu_dtype` (the first moment's); 2 (a wrong dtype) for others.
template <typename Body>
int with_m_type(const char *mu_dtype, Body body) {
  switch (stored_as(mu_dtype)) {
    case Stored::kFloat32: return body(static_cast<float *>(nullptr));
    case Stored::kFloat16: return body(static_cast<Half *>(nullptr));
    case Stored::kBfloat16: return body(static_cast<Bf16 *>(nullptr));
    default: return 2;
  }
}

// Few elements: one thread (a parallel region costs more than it saves).
int threads_for(int64_t total) { return total < (1 << 16) ? 1 : omp_get_max_threads(); }

}  // namespace

extern "C" int LambSumSq(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  int n = nparam - 1;
  if (!all_float32(0, nparam, dtypes)) return 1;
  std::vector<int64_t> len(n);
  int64_t total_len = 0;
  for (int i = 0; i < n; ++i) total_len += (len[i] = numel(ndims[i], shapes[i]));
  std::vector<Chunk> chunks = make_chunks(len, nullptr);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> part(nc);
#pragma omp parallel for schedule(dynamic) num_threads(threads_for(total_len))
  for (int64_t c = 0; c < nc; ++c) {
    const float *g = static_cast<const float *>(params[chunks[c].tensor]);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = chunks[c].lo; j < chunks[c].hi; ++j) s += static_cast<double>(g[j]) * g[j];
    part[c] = s;
  }
  double total = 0.0;
  for (double s : part) total += s;
  *static_cast<float *>(params[nparam - 1]) = static_cast<float>(total);
  return 0;
}

namespace {

// LambStep's arguments of one state format: parameter i's weight, slot `slot` and gradient.
struct Args {
  void **params;
  int n;
  template <typename T>
  T *slot(int slot, int i) const { return static_cast<T *>(params[4 + (1 + slot) * n + i]); }
  float *w(int i) const { return static_cast<float *>(params[4 + i]); }
  const float *g(int i) const { return slot<const float>(kSlotCount, i); }
};

// The float state: m (in MT) and v (float32), one value per element.
template <typename MT>
struct FloatState : Args {
  void pass1(bool general, const Hyper &h, const Decay &d, int i, int64_t lo, int64_t hi, double *sums) const {
    auto pass = general ? ::pass1<true, MT> : ::pass1<false, MT>;
    pass(h, d, w(i), slot<MT>(kSlot_m, i), slot<float>(kSlot_v, i), g(i), lo, hi, sums);
  }
  void pass2(bool general, const Hyper &h, const Decay &d, float lr_q, int i, int64_t lo, int64_t hi) const {
    auto pass = general ? ::pass2<true, MT> : ::pass2<false, MT>;
    pass(h, d, lr_q, w(i), slot<MT>(kSlot_m, i), slot<float>(kSlot_v, i), w(i), lo, hi);
  }
};

#ifdef LAMB_BLOCK
// The 8-bit state: slots m (int8 codes), m_scale, v (uint8 codes), v_scale (float32 block scales); a tensor
// whose m slot is float32 (fewer elements than min_8bit_size) keeps float32 m and v in the m and v slots, and
// its scale slots are not read. `quantized[i]`: tensor i's m slot holds codes.
struct State8 : Args {
  const std::vector<bool> *quantized;
  void pass1(bool general, const Hyper &h, const Decay &d, int i, int64_t lo, int64_t hi, double *sums) const {
    if (!(*quantized)[i]) return FloatState<float>{{params, n}}.pass1(general, h, d, i, lo, hi, sums);
    auto pass = general ? pass1_8bit<true> : pass1_8bit<false>;
    pass(h, d, w(i), slot<int8_t>(kSlot_m, i), slot<float>(kSlot_m_scale, i), slot<uint8_t>(kSlot_v, i),
         slot<float>(kSlot_v_scale, i), g(i), lo, hi, sums);
  }
  void pass2(bool general, const Hyper &h, const Decay &d, float lr_q, int i, int64_t lo, int64_t hi) const {
    if (!(*quantized)[i]) return FloatState<float>{{params, n}}.pass2(general, h, d, lr_q, i, lo, hi);
    auto pass = general ? pass2_8bit<true> : pass2_8bit<false>;
    pass(h, d, lr_q, w(i), slot<const int8_t>(kSlot_m, i), slot<const float>(kSlot_m_scale, i),
         slot<const uint8_t>(kSlot_v, i), slot<const float>(kSlot_v_scale, i), w(i), lo, hi);
  }
};
#endif  // LAMB_BLOCK

// The body of LambStep, for the `state` of parameters `state.n` (the dtypes checked).
template <typename State>
int step(int nparam, void **params, int *ndims, int64_t **shapes, const State &state) {
  const int n = state.n;
  const float *hp = static_cast<const float *>(params[0]);
  const Hyper h = read_hyper(hp);
  const bool general = is_general(hp);
  float *stats = static_cast<float *>(params[nparam - 1]);
  for (int i = 0; i < n; ++i) {  // what a skipped call reports (the caller keeps its previous stats)
    stats[3 * i] = 1.0f; stats[3 * i + 1] = 0.0f; stats[3 * i + 2] = 0.0f;
  }
  stats[3 * n] = 0.0f; stats[3 * n + 1] = 0.0f; stats[3 * n + 2] = 0.0f;
  if (hp[k_proceed] == 0.0f) return 0;  // the caller skips this step: w, m, v untouched
  const float *lrs = static_cast<const float *>(params[1]);
  const float *wds = static_cast<const float *>(params[2]);
  const float *layer_codes = static_cast<const float *>(params[3]);

  std::vector<int64_t> len(n);
  int64_t total_len = 0;
  for (int i = 0; i < n; ++i) total_len += (len[i] = numel(ndims[4 + i], shapes[4 + i]));
  std::vector<Chunk> chunks = make_chunks(len, layer_codes);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> part(3 * nc);  // [chunk][w_sq, u_sq, grad_sq]
  std::vector<float> lr_q(n), decay_factor(n);
  const std::vector<Decay> decay = decays(hp, lrs, wds, n);
  bool applied = false;

#pragma omp parallel num_threads(threads_for(total_len))
  {
#pragma omp for schedule(dynamic)
    for (int64_t c = 0; c < nc; ++c) {  // pass 1
      const Chunk &k = chunks[c];
      state.pass1(general, h, decay[k.tensor], k.tensor, k.lo, k.hi, &part[3 * c]);
    }  // implicit barrier
#pragma omp single
    {
      std::vector<double> w_sq(n, 0.0), u_sq(n, 0.0);
      double grad_sq = 0.0;
      for (int64_t c = 0; c < nc; ++c) {  // in chunk order: deterministic
        w_sq[chunks[c].tensor] += part[3 * c];
        u_sq[chunks[c].tensor] += part[3 * c + 1];
        grad_sq += part[3 * c + 2];
      }
      const float grad_sq_f = static_cast<float>(grad_sq);
      applied = std::isfinite(grad_sq_f);  // a NaN/Inf gradient, or a norm beyond float32
      stats[3 * n] = grad_sq_f;
      stats[3 * n + 1] = applied ? 1.0f : 0.0f;
      for (int i = 0; i < n && applied; ++i) {
        if (layer_codes[i] < 0.0f) continue;
        float w_norm = std::sqrt(static_cast<float>(w_sq[i]));
        if (general) w_norm = w_norm * decay[i].decay_factor;  // the norm of decay_factor w (outside q)
        float u_norm = std::sqrt(static_cast<float>(u_sq[i]));
        const float w_used = std::fmin(w_norm, hp[k_w_norm_max]);  // ||w|| clamped (inf when off)
        float q = (w_used > 0.0f && u_norm > 0.0f) ? w_used / u_norm : 1.0f;  // q = 1 if a norm is 0
        q = std::fmin(std::fmax(q, hp[k_trust_lo]), hp[k_trust_hi]);  // clip(q, lo, hi); (0, inf) when off
        if (layer_codes[i] == 0.0f) q = 1.0f;           // layer_adaptation=False
        lr_q[i] = lrs[i] * q;
        decay_factor[i] = decay[i].decay_factor;
        if (!std::isfinite(w_norm) || !std::isfinite(u_norm)) {  // NaN/Inf in w, or in m, v (a damaged
          q = NAN;                                               // checkpoint): leave w, and say so
          lr_q[i] = 0.0f;
          decay_factor[i] = 1.0f;
        }
        stats[3 * i] = q; stats[3 * i + 1] = w_norm; stats[3 * i + 2] = u_norm;
      }
    }  // implicit barrier: applied and lr_q[] are ready
    if (applied) {
#pragma omp for schedule(dynamic)
      for (int64_t c = 0; c < nc; ++c) {  // pass 2
        const Chunk &k = chunks[c];
        // lr_q = 0, decay_factor = 1: w stays exactly as it is (also where w or u is NaN/Inf: 0 u is not 0)
        if (lr_q[k.tensor] == 0.0f && decay_factor[k.tensor] == 1.0f) continue;
        state.pass2(general, h, decay[k.tensor], lr_q[k.tensor], k.tensor, k.lo, k.hi);
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" int LambStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void *stream, void *extra) {
  constexpr int kPerParam = 2 + kSlotCount;  // w, the slots, g
  if ((nparam - 5) % kPerParam != 0) return 1;
  const int n = (nparam - 5) / kPerParam;
  auto S = [&](int slot, int i) { return 4 + (1 + slot) * n + i; };  // index of slot `slot` of parameter i
#ifdef LAMB_BLOCK
  // w, the scales, g float32; per tensor, the codes int8 (m) and uint8 (v), or m and v both float32
  if (!all_float32(0, S(kSlot_m, 0), dtypes) || !all_float32(S(kSlot_m_scale, 0), S(kSlot_m_scale, n), dtypes) ||
      !all_float32(S(kSlot_v_scale, 0), nparam, dtypes))
    return 2;
  std::vector<bool> quantized(n);
  for (int i = 0; i < n; ++i) {
    quantized[i] = stored_as(dtypes[S(kSlot_m, i)]) == Stored::kInt8;
    const Stored want_v = quantized[i] ? Stored::kUint8 : Stored::kFloat32;
    if ((!quantized[i] && stored_as(dtypes[S(kSlot_m, i)]) != Stored::kFloat32) ||
        stored_as(dtypes[S(kSlot_v, i)]) != want_v)
      return 2;
  }
  if (numel(ndims[0], shapes[0]) != kScalarCount) return 3;
  return step(nparam, params, ndims, shapes, State8{{params, n}, &quantized});
#else
  const char *mu_dtype = dtypes[S(kSlot_m, 0)];
  if (!all_float32(0, S(kSlot_m, 0), dtypes) || !all_float32(S(kSlot_m, n), nparam, dtypes) ||
      !all_stored_as(S(kSlot_m, 0), S(kSlot_m, n), dtypes, stored_as(mu_dtype)))
    return 2;
  if (numel(ndims[0], shapes[0]) != kScalarCount) return 3;
  return with_m_type(mu_dtype, [&](auto *typed) {
    using MT = std::remove_pointer_t<decltype(typed)>;
    return step(nparam, params, ndims, shapes, FloatState<MT>{{params, n}});
  });
#endif
}

namespace {

// The arguments of LambShardApplyBucket that both state formats read: (scalars, lr_qs, decay_factors, wds,
// bounds = int32 [start, end, lo], ..., w_0..w_{n-1} from index `weights`, ...) -> bucket (B,), the bucket
// [at, at + B) of the flat layout, its real part ending at `last`.
struct BucketArgs {
  const float *lr_qs, *decay_factors;
  Hyper h;
  bool general;
  std::vector<Decay> decay;
  std::vector<int64_t> len;
  float *out;
  int64_t size, start, at, last;
  BucketArgs(int nparam, void **params, int *ndims, int64_t **shapes, int n, int weights)
      : lr_qs(static_cast<const float *>(params[1])), decay_factors(static_cast<const float *>(params[2])),
        h(read_hyper(static_cast<const float *>(params[0]))), general(is_general(static_cast<const float *>(params[0]))),
        decay(decays(static_cast<const float *>(params[0]), lr_qs, static_cast<const float *>(params[3]), n)),
        len(n), out(static_cast<float *>(params[nparam - 1])), size(numel(ndims[nparam - 1], shapes[nparam - 1])) {
    const int32_t *bounds = static_cast<const int32_t *>(params[4]);
    for (int i = 0; i < n; ++i) decay[i].decay_factor = decay_factors[i];
    for (int i = 0; i < n; ++i) len[i] = numel(ndims[weights + i], shapes[weights + i]);
    start = bounds[0];
    at = start + bounds[2];
    last = std::max(at, std::min<int64_t>(bounds[1], at + size));
  }
};

}  // namespace

#ifdef LAMB_BLOCK
namespace {

// The sharded 8-bit state (backends/sharded_blocks.py): the codes of the 8-bit tensors (kinds[i] = 1), each
// padded to whole blocks as in the unsharded format and concatenated in order (the padded layout), are cut into
// the workers' pieces on block boundaries, so that no block straddles two pieces: a piece holds the codes
// (int8 m, uint8 v) of its elements and the scales of its blocks. The tensors below min_8bit_size (kinds[i] = 0)
// keep float32 m and v whole on every worker, updated redundantly (the same bits everywhere).

// How many of the n tensors keep float32 moments whole (kind 0).
int whole_count(const int32_t *kinds, int n) { return static_cast<int>(std::count(kinds, kinds + n, 0)); }

// Each tensor's extent in the padded layout: its codes (whole blocks), or 0 for a float32 tensor.
std::vector<int64_t> padded_lengths(const std::vector<int64_t> &len, const int32_t *kinds) {
  std::vector<int64_t> padded(len.size());
  for (size_t i = 0; i < len.size(); ++i) padded[i] = kinds[i] ? (len[i] + kBlock - 1) / kBlock * kBlock : 0;
  return padded;
}

// The piece's slots, shifted so that tensor i's tensor-local index j (and block j / kBlock) reads them.
struct Piece8 {
  int8_t *mc;
  float *ms;
  uint8_t *vc;
  float *vs;
  Piece8 at(int64_t shift) const {  // shift: the tensor's start in the piece (a block multiple; may be < 0)
    return {mc + shift, ms + shift / kBlock, vc + shift, vs + shift / kBlock};
  }
};
Piece8 piece8(void **params, int first) {
  return {static_cast<int8_t *>(params[first]), static_cast<float *>(params[first + 1]),
          static_cast<uint8_t *>(params[first + 2]), static_cast<float *>(params[first + 3])};
}

// LambShardSums, 8-bit: (scalars, lrs, wds, bounds, kinds, w_0..w_{n-1}, m codes, m scales, v codes, v scales,
// m_0..m_{s-1}, v_0..v_{s-1}, g_0..g_{n-1}) -> int32 (n, 4): (n, 2) float64 sums, as their bits. bounds = int32 [start, end, rank]: the piece's
// range of the padded layout (block multiples); m_k, v_k: the float32 moments of the s tensors of kind 0, in
// order. Pass 1 over the piece's blocks (codes and scales IN PLACE) and over the whole float32 tensors (IN
// PLACE, on every worker); the float32 tensors' sums are reported by rank 0 only, so that the workers' sums,
// added, count them once. The sums stay double, all-gathered as bits (MindSpore's AllReduce takes no
// float64) and added in rank order by LambShardTotal, then rounded to float32 once, as the unsharded kernel
// rounds its own.
int shard_sums_8bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam < 12) return 1;
  const int n = static_cast<int>(numel(ndims[4], shapes[4]));
  const int32_t *kinds = static_cast<const int32_t *>(params[4]);
  const int s = whole_count(kinds, n);
  if (nparam != 5 + n + 4 + 2 * s + n + 1 || numel(ndims[3], shapes[3]) != 3) return 1;
  const int first = 5 + n, floats = first + 4, grads = floats + 2 * s;
  if (numel(ndims[0], shapes[0]) != kScalarCount) return 3;
  if (stored_as(dtypes[first]) != Stored::kInt8 || stored_as(dtypes[first + 2]) != Stored::kUint8 ||
      !all_float32(first + 1, first + 2, dtypes) || !all_float32(first + 3, first + 4, dtypes) ||
      !all_float32(floats, nparam - 1, dtypes) || !all_float32(5, first, dtypes))
    return 2;
  const float *hp = static_cast<const float *>(params[0]);
  const int32_t *bounds = static_cast<const int32_t *>(params[3]);
  std::vector<double> sums(2 * n, 0.0);
  const auto out = [&] { std::memcpy(params[nparam - 1], sums.data(), sums.size() * sizeof(double)); return 0; };
  if (hp[k_proceed] == 0.0f) return out();
  const Hyper h = read_hyper(hp);
  const bool general = is_general(hp);
  const std::vector<Decay> decay = decays(hp, static_cast<const float *>(params[1]),
                                          static_cast<const float *>(params[2]), n);
  std::vector<int64_t> len(n), offset(n), whole(n, -1);  // whole[i]: tensor i's index among the float32 ones
  for (int i = 0, k = 0; i < n; ++i) {
    len[i] = numel(ndims[5 + i], shapes[5 + i]);
    if (!kinds[i]) whole[i] = k++;
  }
  const int64_t start = bounds[0];
  std::vector<Chunk> chunks = range_chunks(padded_lengths(len, kinds), start, bounds[1], &offset);
  const size_t in_piece = chunks.size();
  for (int i = 0; i < n; ++i)  // the float32 tensors, whole (after the piece's chunks)
    for (int64_t lo = 0; lo < (kinds[i] ? 0 : len[i]); lo += kChunk) chunks.push_back({i, lo, std::min(len[i], lo + kChunk)});
  const Piece8 piece = piece8(params, first);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> part(3 * nc);
  int64_t work = bounds[1] - start;
  for (int i = 0; i < n; ++i) work += kinds[i] ? 0 : len[i];
#pragma omp parallel for schedule(dynamic) num_threads(threads_for(work))
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk &k = chunks[c];
    const float *w = static_cast<const float *>(params[5 + k.tensor]);
    const float *g = static_cast<const float *>(params[grads + k.tensor]);
    if (static_cast<size_t>(c) >= in_piece) {
      float *m = static_cast<float *>(params[floats + whole[k.tensor]]);
      float *v = static_cast<float *>(params[floats + s + whole[k.tensor]]);
      auto pass = general ? pass1<true, float> : pass1<false, float>;
      pass(h, decay[k.tensor], w, m, v, g, k.lo, k.hi, &part[3 * c]);
      continue;
    }
    const Piece8 p = piece.at(offset[k.tensor] - start);
    auto pass = general ? pass1_8bit<true> : pass1_8bit<false>;
    // hi: the tensor's real elements (pass1_8bit pads its last block with zero codes)
    pass(h, decay[k.tensor], w, p.mc, p.ms, p.vc, p.vs, g, k.lo, std::min(k.hi, len[k.tensor]), &part[3 * c]);
  }
  for (int64_t c = 0; c < nc; ++c) {  // in chunk order: deterministic
    if (static_cast<size_t>(c) >= in_piece && bounds[2] != 0) break;  // the float32 tensors: rank 0's only
    sums[2 * chunks[c].tensor] += part[3 * c];
    sums[2 * chunks[c].tensor + 1] += part[3 * c + 1];
  }
  return out();
}

// LambShardTotal (8-bit only): (gathered int32 (world n, 4): each worker's LambShardSums) -> float32 (n, 2): the
// workers' double sums added in rank order, rounded to float32 once.
int shard_total(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2) return 3;
  const int64_t rows = numel(ndims[1], shapes[1]) / 2;  // the output: (n, 2)
  const int64_t gathered = numel(ndims[0], shapes[0]) / 4;
  if (rows < 1 || gathered % rows != 0) return 3;
  if (std::strcmp(dtypes[0], "int32") != 0 || !all_float32(1, 2, dtypes)) return 2;
  std::vector<double> sums(2 * gathered);
  std::memcpy(sums.data(), params[0], sums.size() * sizeof(double));
  float *total = static_cast<float *>(params[1]);
  for (int64_t j = 0; j < 2 * rows; ++j) {
    double t = 0.0;
    for (int64_t r = 0; r < gathered / rows; ++r) t += sums[2 * rows * r + j];
    total[j] = static_cast<float>(t);
  }
  return 0;
}

// LambShardApplyBucket, 8-bit: (scalars, lr_qs, decay_factors, wds, bounds, kinds, w_0..w_{n-1}, m codes,
// m scales, v codes, v scales) -> bucket (B,): pass 2 over the piece's padded-layout positions [lo, lo + B)
// (bounds = int32 [start, end, lo], B and lo block multiples); padding (a tensor's last block, past end) is 0.
int shard_apply_8bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam < 12) return 3;
  const int n = static_cast<int>(numel(ndims[5], shapes[5]));
  if (nparam != 6 + n + 4 + 1 || numel(ndims[0], shapes[0]) != kScalarCount || numel(ndims[4], shapes[4]) != 3)
    return 3;
  const int first = 6 + n;
  if (stored_as(dtypes[first]) != Stored::kInt8 || stored_as(dtypes[first + 2]) != Stored::kUint8 ||
      !all_float32(6, first, dtypes) || !all_float32(first + 1, first + 2, dtypes) ||
      !all_float32(first + 3, nparam, dtypes))
    return 2;
  const BucketArgs a(nparam, params, ndims, shapes, n, 6);
  std::vector<int64_t> offset(n);
  const std::vector<Chunk> chunks =
      range_chunks(padded_lengths(a.len, static_cast<const int32_t *>(params[5])), a.at, a.last, &offset);
  const Piece8 piece = piece8(params, first);
  std::fill(a.out, a.out + a.size, 0.0f);  // the padding
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic) num_threads(threads_for(a.last - a.at))
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk &k = chunks[c];
    const int i = k.tensor;
    const float *w = static_cast<const float *>(params[6 + i]);
    const int64_t hi = std::min(k.hi, a.len[i]), to_bucket = offset[i] - a.at;
    if (a.lr_qs[i] == 0.0f && a.decay_factors[i] == 1.0f) {  // w as it is (0 u is not 0 for NaN u)
      std::copy(w + k.lo, w + hi, a.out + to_bucket + k.lo);
      continue;
    }
    const Piece8 p = piece.at(offset[i] - a.start);
    auto pass = a.general ? pass2_8bit<true> : pass2_8bit<false>;
    pass(a.h, a.decay[i], a.lr_qs[i], w, p.mc, p.ms, p.vc, p.vs, a.out + to_bucket, k.lo, hi);
  }
  return 0;
}

// LambShardApplyWhole (8-bit only): (scalars, lr_qs, decay_factors, wds, kinds, w_0..w_{n-1}, m_0..m_{s-1},
// v_0..v_{s-1}) -> float32 (1,) (0): pass 2 of the float32 tensors (kind 0), whole, IN PLACE, on every worker.
int shard_apply_whole(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam < 7) return 3;
  const int n = static_cast<int>(numel(ndims[4], shapes[4]));
  const int32_t *kinds = static_cast<const int32_t *>(params[4]);
  const int s = whole_count(kinds, n);
  if (nparam != 5 + n + 2 * s + 1 || numel(ndims[0], shapes[0]) != kScalarCount) return 3;
  if (!all_float32(5, nparam, dtypes)) return 2;
  const float *hp = static_cast<const float *>(params[0]);
  const float *lr_qs = static_cast<const float *>(params[1]);
  const float *decay_factors = static_cast<const float *>(params[2]);
  const Hyper h = read_hyper(hp);
  const bool general = is_general(hp);
  std::vector<Decay> decay = decays(hp, lr_qs, static_cast<const float *>(params[3]), n);
  *static_cast<float *>(params[nparam - 1]) = 0.0f;
  for (int i = 0, k = 0; i < n; ++i) {
    if (kinds[i]) continue;
    const int index = k++;
    if (lr_qs[i] == 0.0f && decay_factors[i] == 1.0f) continue;  // w as it is
    decay[i].decay_factor = decay_factors[i];
    float *w = static_cast<float *>(params[5 + i]);
    auto pass = general ? pass2<true, float> : pass2<false, float>;
    pass(h, decay[i], lr_qs[i], w, static_cast<const float *>(params[5 + n + index]),
         static_cast<const float *>(params[5 + n + s + index]), w, 0, numel(ndims[5 + i], shapes[5 + i]));
  }
  return 0;
}

}  // namespace

extern "C" int LambShardTotal(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  return shard_total(nparam, params, ndims, shapes, dtypes);
}

extern "C" int LambShardApplyWhole(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  return shard_apply_whole(nparam, params, ndims, shapes, dtypes);
}
#endif  // LAMB_BLOCK

// The sharded backend's first kernel (backends/sharded.py), over one worker's piece [start, end) of the
// parameters flattened and concatenated in order; m and v are the piece's slots, in LAMB_SLOTS order (end -
// start used; m float32, float16 or bfloat16, v float32). The second pass is LambShardApplyBucket, below.
//
// LambShardSums(scalars, lrs, wds, bounds, w_0..w_{n-1}, m, v, g_0..g_{n-1}) -> (n, 2): pass 1 over the
//   piece (m, v updated IN PLACE), and per tensor (||w||^2, ||u||^2) over the piece, summed in double in
//   chunk order. bounds = int32 [start, end). proceed = 0: nothing touched, zeros returned.
extern "C" int LambShardSums(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
#ifdef LAMB_BLOCK
  return shard_sums_8bit(nparam, params, ndims, shapes, dtypes);
#endif
  if ((nparam - 5 - kSlotCount) % 2 != 0) return 1;
  const int n = (nparam - 5 - kSlotCount) / 2;
  const int slots = 4 + n;  // index of the first slot's piece
  if (!all_float32(slots + kSlot_v, slots + kSlot_v + 1, dtypes)) return 2;
  if (numel(ndims[0], shapes[0]) != kScalarCount) return 3;
  return with_m_type(dtypes[slots + kSlot_m], [&](auto *typed) {
    using MT = std::remove_pointer_t<decltype(typed)>;
    const float *hp = static_cast<const float *>(params[0]);
    const int32_t *bounds = static_cast<const int32_t *>(params[3]);
    float *sums = static_cast<float *>(params[nparam - 1]);
    std::fill(sums, sums + 2 * n, 0.0f);
    if (hp[k_proceed] == 0.0f) return 0;
    const Hyper h = read_hyper(hp);
    const bool general = is_general(hp);
    const std::vector<Decay> decay = decays(hp, static_cast<const float *>(params[1]),
                                            static_cast<const float *>(params[2]), n);
    std::vector<int64_t> len(n), offset(n);
    for (int i = 0; i < n; ++i) len[i] = numel(ndims[4 + i], shapes[4 + i]);
    const int64_t start = bounds[0];
    const std::vector<Chunk> chunks = range_chunks(len, start, bounds[1], &offset);
    MT *m = static_cast<MT *>(params[slots + kSlot_m]);
    float *v = static_cast<float *>(params[slots + kSlot_v]);
    const int64_t nc = static_cast<int64_t>(chunks.size());
    std::vector<double> part(3 * nc);
#pragma omp parallel for schedule(dynamic) num_threads(threads_for(bounds[1] - start))
    for (int64_t c = 0; c < nc; ++c) {
      const Chunk &k = chunks[c];
      const int64_t shift = offset[k.tensor] - start;  // tensor-local j -> piece index j + shift
      auto pass = general ? pass1<true, MT> : pass1<false, MT>;
      pass(h, decay[k.tensor], static_cast<const float *>(params[4 + k.tensor]), m + shift, v + shift,
           static_cast<const float *>(params[slots + kSlotCount + k.tensor]), k.lo, k.hi, &part[3 * c]);
    }
    std::vector<double> w_sq(n, 0.0), u_sq(n, 0.0);
    for (int64_t c = 0; c < nc; ++c) {  // in chunk order: deterministic
      w_sq[chunks[c].tensor] += part[3 * c];
      u_sq[chunks[c].tensor] += part[3 * c + 1];
    }
    for (int i = 0; i < n; ++i) {
      sums[2 * i] = static_cast<float>(w_sq[i]);
      sums[2 * i + 1] = static_cast<float>(u_sq[i]);
    }
    return 0;
  });
}

// The sharded backend's all-gather, bucket by bucket (backends/sharded.py): each worker's piece (L elements,
// worker r's starting at r L in the flat parameters) is cut into buckets of B elements at the same offsets on
// every worker (the last one may reach past L: that part is padding).
//
// LambShardApplyBucket(scalars, lr_qs, decay_factors, wds, bounds, w_0..w_{n-1}, m, v) -> bucket (B,): pass 2
//   over the piece's elements [lo, lo + B) into the output, decay_factors[i] w - lr_qs[i] u for each element
//   (lr_qs[i] = lr_i q_i; decay_factors[i] as in Decay: 1 unless decay is outside the trust ratio). bounds = int32
//   [start, end, lo]: the worker's real range [start, end) of the flat parameters and the bucket's offset in
//   the piece; elements past end are padding (0).
// LambShardWrite(gathered, layout, w_0..w_{n-1}) -> float32 (1,) (0): the all-gathered bucket (world x B, worker
//   r's B elements at r B) written IN PLACE into the parameters: element j of worker r's part is flat position
//   r L + lo + j (padding, dropped: lo + j >= L, or past the last parameter). layout = int32 [L, lo, world].
extern "C" int LambShardApplyBucket(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
#ifdef LAMB_BLOCK
  return shard_apply_8bit(nparam, params, ndims, shapes, dtypes);
#endif
  const int n = nparam - 6 - kSlotCount;
  if (n < 1 || numel(ndims[0], shapes[0]) != kScalarCount || numel(ndims[4], shapes[4]) != 3) return 3;
  const int slots = 5 + n;  // index of the first slot's piece
  if (!all_float32(slots + kSlot_v, slots + kSlot_v + 1, dtypes)) return 2;
  return with_m_type(dtypes[slots + kSlot_m], [&](auto *typed) {
    using MT = std::remove_pointer_t<decltype(typed)>;
    const BucketArgs a(nparam, params, ndims, shapes, n, 5);
    const float *lr_qs = a.lr_qs, *decay_factors = a.decay_factors;
    const Hyper h = a.h;
    const bool general = a.general;
    const std::vector<Decay> &decay = a.decay;
    float *out = a.out;
    const int64_t size = a.size, start = a.start, first = a.at, last = a.last;  // the bucket: [first, first + size)
    std::vector<int64_t> offset(n);
    const std::vector<Chunk> chunks = range_chunks(a.len, first, last, &offset);
    const MT *m = static_cast<const MT *>(params[slots + kSlot_m]);
    const float *v = static_cast<const float *>(params[slots + kSlot_v]);
    std::fill(out + (last - first), out + size, 0.0f);  // the padding
    const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic) num_threads(threads_for(last - first))
    for (int64_t c = 0; c < nc; ++c) {
      const Chunk &k = chunks[c];
      const float *w = static_cast<const float *>(params[5 + k.tensor]);
      // tensor-local j: piece index j + offset - start, bucket index j + offset - first
      const int64_t to_piece = offset[k.tensor] - start, to_bucket = offset[k.tensor] - first;
      if (lr_qs[k.tensor] == 0.0f && decay_factors[k.tensor] == 1.0f) {  // w as it is (0 u is not 0 for NaN u)
        std::copy(w + k.lo, w + k.hi, out + to_bucket + k.lo);
        continue;
      }
      auto pass = general ? pass2<true, MT> : pass2<false, MT>;
      // pass2 indexes w, m, v and out alike: shift m, v to the piece and out to the bucket
      pass(h, decay[k.tensor], lr_qs[k.tensor], w, m + to_piece, v + to_piece, out + to_bucket, k.lo, k.hi);
    }
    return 0;
  });
}

extern "C" int LambShardWrite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
#ifdef LAMB_BLOCK
  const int lead = 3;  // gathered, layout, kinds: the 8-bit tensors' positions in the padded layout
#else
  const int lead = 2;  // gathered, layout
#endif
  const int n = nparam - lead - 1;
  if (n < 1 || numel(ndims[1], shapes[1]) != 3) return 3;
  if (!all_float32(0, 1, dtypes) || !all_float32(lead, nparam, dtypes)) return 2;
  const int32_t *layout = static_cast<const int32_t *>(params[1]);
  const int64_t width = layout[0], lo = layout[1], world = layout[2];
  const int64_t gathered = numel(ndims[0], shapes[0]);
  if (world < 1 || gathered % world != 0) return 3;
  const int64_t size = gathered / world;
  std::vector<int64_t> len(n), offset(n);
  for (int i = 0; i < n; ++i) len[i] = numel(ndims[lead + i], shapes[lead + i]);
#ifdef LAMB_BLOCK
  if (numel(ndims[2], shapes[2]) != n) return 3;
  const std::vector<int64_t> extent = padded_lengths(len, static_cast<const int32_t *>(params[2]));
#else
  const std::vector<int64_t> &extent = len;
#endif
  std::vector<Chunk> chunks;
  std::vector<int64_t> source;  // per chunk: gathered index of its tensor-local element 0
  for (int64_t r = 0; r < world; ++r) {
    const int64_t first = r * width + lo;  // worker r's part: flat positions [first, first + size), in its piece
    for (const Chunk &k : range_chunks(extent, first, first + std::min(size, width - lo), &offset)) {
      if (k.lo >= len[k.tensor]) continue;  // a tensor's padding (8-bit layout)
      chunks.push_back({k.tensor, k.lo, std::min(k.hi, len[k.tensor])});
      source.push_back(r * size + offset[k.tensor] - first);
    }
  }
  const float *from = static_cast<const float *>(params[0]);
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic) num_threads(threads_for(gathered))
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk &k = chunks[c];
    float *w = static_cast<float *>(params[lead + k.tensor]);
    std::copy(from + source[c] + k.lo, from + source[c] + k.hi, w + k.lo);
  }
  *static_cast<float *>(params[nparam - 1]) = 0.0f;
  return 0;
}
