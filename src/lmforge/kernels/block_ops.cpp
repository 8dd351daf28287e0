// lmforge's CPU kernels for a Transformer block's training step besides attention (train_ops.cpp): what eager
// PyTorch spends passes over memory on.
//
// * rms_norm_backward: RMSNorm's input (and weight) gradient in one pass per row; with decode_ops.cpp's
//   rms_norm as its forward (models/layers.py RMSNorm, kernels/__init__.py joins them for autograd), where
//   autograd through F.rms_norm runs six ops forward and a dozen backward (~2 ms against ~0.5 ms for SmolLM2's
//   (512, 576) rows, one thread; 61 norms per step).
//
// * silu_mul (SwiGLU's silu(gate) * up, also decoding's: models/layers.py Block._step) and silu_mul_backward: one
//   pass each, a vectorised exp (~2 ulp), where eager PyTorch's forward and backward take five passes and a
//   concatenation (~2.8 ms against ~0.8 ms for SmolLM2's (512, 3072) bf16 rows, one thread).
//
// LoRA: the adapters' dropout with PEFT's semantics (an independent mask per adapted module) for the price of a
// matmul on the unmasked input.
//
// A fused linear layer of lmforge's GPT feeds one input x (N, K) to n adapters (q, k, v: n = 3; gate, up: 2;
// o, down: 1), each with its own mask, as each of PEFT's modules draws its own (models/lora.py):
//
//     h[:, s r:(s + 1) r] = (x * m_s) A_s^T      a = [A_1; ...; A_n] (n r, K) fp32,  m_s[i, j] ~ Bernoulli(1 - p)
//
// * lora_dropout_a(x, a, n, p, seed) -> h (N, n r) in x's dtype, fp32 sums. Eager PyTorch draws the n masks,
//   writes n masked copies of x, keeps them and the masks for the backward, multiplies, and in the backward
//   masks the gradient again and sums it over the n copies: ~12 % of a bf16 LoRA step on SmolLM2. Here each
//   mask is drawn where it is used, one row of x at a time (in L1), and never stored.
// * lora_dropout_a_backward(dh, x, a, n, p, seed) -> (dx = sum_s m_s * (dh_s A_s) in x's dtype,
//   da = [dh_s^T (x * m_s)]_s fp32): the same masks drawn again from the seed.
// * dropout_keep(seed, n, rows, cols, p) -> the (n, rows, cols) keep masks (bool) those two use: the reference.
//
// The masks come from a counter-based generator, so any element can be drawn on its own, in any order, on any
// thread: element (s, i, j) is kept iff 32-bit half j % 2 of SplitMix64's output for seed + (c + 1) gamma,
// c = (s rows + i) ceil(cols / 2) + j / 2, is >= round(p 2^32): P(drop) = p to within 2^-32, every element
// independent (SplitMix64: Steele, Lea & Flood 2014, passes BigCrush). The seed is one 64-bit integer drawn
// from torch's generator (models/lora.py), so torch.manual_seed fixes the masks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

constexpr uint64_t GAMMA = 0x9e3779b97f4a7c15ULL;  // SplitMix64's increment (the golden ratio, odd)

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The keep masks of one call, drawn one row of one slice at a time into a caller's buffer of 32-bit uniforms
// (a plain loop gcc vectorises); the vector bodies below compare them with the threshold.
struct Masks {
  uint64_t seed;
  uint32_t threshold;  // element j kept iff u[j] >= threshold = round(p 2^32) (2^32 - 1 for p > 1 - 2^-33)
  int64_t rows, half;  // half = ceil(cols / 2): 64-bit draws per row

  Masks(int64_t seed_, double p, int64_t rows_, int64_t cols)
      : seed(static_cast<uint64_t>(seed_)),
        threshold(static_cast<uint32_t>(std::min(std::nearbyint(p * 4294967296.0), 4294967295.0))),
        rows(rows_), half((cols + 1) / 2) {}

  // u[j], j < 2 half: the 32-bit uniforms of row i of slice s
  const uint32_t* draw(int64_t s, int64_t i, uint64_t* buf) const {
    const int64_t h = half;  // a local bound: gcc vectorises the loop (buf might alias a member)
    const uint64_t base = seed + (static_cast<uint64_t>(s * rows + i) * h + 1) * GAMMA;
    for (int64_t c = 0; c < h; ++c) buf[c] = mix64(base + static_cast<uint64_t>(c) * GAMMA);
    return reinterpret_cast<const uint32_t*>(buf);
  }
};

// A row of x (or of a gradient) as fp32.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// ---------------------------------------------------------------------------------------------------
// The vector bodies: vec.h's vectors (W floats: one AVX-512 or AVX2 register, or four floats), one body for every
// CPU. kept(v, u, t): v's lanes where the uniform u >= t, zero elsewhere (a select, not a product: a dropped inf
// or nan gives 0, as PyTorch's where).
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t)), may_alias));
typedef uint32_t vuu __attribute__((vector_size(W * sizeof(uint32_t)), aligned(4), may_alias));  // unaligned loads
inline vf kept(vf v, const uint32_t* u, uint32_t t) {
  const vu uv = *reinterpret_cast<const vuu*>(u);
  return uv >= t ? v : vf{};
}

// the logistic sigmoid 1 / (1 + e^-x)
inline vf vsigmoid(vf x) { return 1.f / (1.f + vexp(-x)); }

inline float kept1(float v, uint32_t u, uint32_t t) { return u >= t ? v : 0.f; }

// Rows of x taken together (each weight of a loaded once for all of them) and rows of a per pass (the
// accumulators must fit the vector registers: 32 with AVX-512, 16 with AVX2).
#if defined(__AVX512F__)
constexpr int FWD_ROWS = 2, FWD_COLS = 8, BWD_ROWS = 4;
#else
constexpr int FWD_ROWS = 2, FWD_COLS = 4, BWD_ROWS = 2;
#endif

// R rows of x (row stride K) with their uniforms (row stride us): out[q][c] = sum_j keep_q(x_q)[j] a[c][j] for C
// rows of a (row stride K), out's rows ostride apart: one pass over the masked rows.
template <int R, int C>
inline void dots(const float* x, const uint32_t* u, int64_t us, uint32_t t, const float* a, int64_t K, float* out,
                 int64_t ostride) {
  vf acc[R][C];
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[q][c] = vf{};
  int64_t j = 0;
  for (; j + W <= K; j += W) {
    vf xv[R];
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) xv[q] = kept(load(x + q * K + j), u + q * us + j, t);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const vf ac = load(a + c * K + j);
#pragma GCC unroll 4
      for (int q = 0; q < R; ++q) acc[q][c] = fma(xv[q], ac, acc[q][c]);
    }
  }
  for (int q = 0; q < R; ++q)
    for (int c = 0; c < C; ++c) {
      float sum = hsum(acc[q][c]);
      for (int64_t k = j; k < K; ++k) sum += kept1(x[q * K + k], u[q * us + k], t) * a[c * K + k];
      out[q * ostride + c] = sum;
    }
}

// out[q][0 .. r) = a[0 .. r) . keep_q(x_q) for R rows, FWD_COLS rows of a per pass
template <int R>
inline void dots_all(const float* x, const uint32_t* u, int64_t us, uint32_t t, const float* a, int64_t r, int64_t K,
                     float* out, int64_t ostride) {
  int64_t c = 0;
  for (; c + FWD_COLS <= r; c += FWD_COLS) dots<R, FWD_COLS>(x, u, us, t, a + c * K, K, out + c, ostride);
  for (; c < r; ++c) dots<R, 1>(x, u, us, t, a + c * K, K, out + c, ostride);
}

// R rows and one slice of the backward: ga[c] += sum_q dh_q[c] keep_q(x_q) (c < r: the slice's rows of da) and
// dx_q += keep_q(sum_c dh_q[c] a[c]) (the slice's term of dx_q), one pass over the rows; dh's rows ds apart.
template <int R>
inline void backward_rows(const float* x, const uint32_t* u, int64_t us, uint32_t t, const float* dh, int64_t ds,
                          const float* a, int64_t r, int64_t K, float* ga, float* dx) {
  int64_t j = 0;
  for (; j + W <= K; j += W) {
    vf xv[R], g[R];
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) xv[q] = kept(load(x + q * K + j), u + q * us + j, t), g[q] = vf{};
    for (int64_t c = 0; c < r; ++c) {
      const vf ac = load(a + c * K + j);
      vf gac = load(ga + c * K + j);
#pragma GCC unroll 4
      for (int q = 0; q < R; ++q) {
        const vf d = splat(dh[q * ds + c]);
        gac = fma(d, xv[q], gac);
        g[q] = fma(d, ac, g[q]);
      }
      store(ga + c * K + j, gac);
    }
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) store(dx + q * K + j, load(dx + q * K + j) + kept(g[q], u + q * us + j, t));
  }
  for (; j < K; ++j)
    for (int q = 0; q < R; ++q) {
      const float xv = kept1(x[q * K + j], u[q * us + j], t);
      float g = 0.f;
      for (int64_t c = 0; c < r; ++c) {
        ga[c * K + j] += dh[q * ds + c] * xv;
        g += dh[q * ds + c] * a[c * K + j];
      }
      dx[q * K + j] += kept1(g, u[q * us + j], t);
    }
}

// Rows at a time per task: enough work to amortise a task, few enough to share N = 512 rows between threads.
constexpr int64_t GRAIN = 16;

void check(const at::Tensor& x, const at::Tensor& a, int64_t n, double p, const at::Tensor& seed, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && a.dim() == 2 && a.is_contiguous(), op,
              ": x (N, K) and a (n r, K) contiguous");
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.size(1) == x.size(1) && n >= 1 && a.size(0) % n == 0, op,
              ": a (n r, K) fp32 with K = x's columns");
  TORCH_CHECK(0.0 <= p && p < 1.0, op, ": p in [0, 1)");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, op, ": seed is one int64");
}

// The uniforms of R consecutive rows of slice s, row q at u + q us (us = 2 half)
inline const uint32_t* draw_rows(const Masks& m, int64_t s, int64_t i, int R, uint64_t* buf) {
  for (int q = 0; q < R; ++q) m.draw(s, i + q, buf + q * m.half);
  return reinterpret_cast<const uint32_t*>(buf);
}

template <typename T>
void forward_impl(const T* x, const float* a, T* h, int64_t N, int64_t K, int64_t n, int64_t r, const Masks& m) {
  at::parallel_for(0, N, GRAIN, [&](int64_t i0, int64_t i1) {
    constexpr int R = FWD_ROWS;
    std::vector<float> xf(R * K), out(R * n * r);
    std::vector<uint64_t> buf(R * m.half);
    const int64_t us = 2 * m.half, nr = n * r;
    for (int64_t i = i0; i < i1; i += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, i1 - i));
      to_float(x + i * K, xf.data(), rows * K);
      for (int64_t s = 0; s < n; ++s) {
        const uint32_t* u = draw_rows(m, s, i, rows, buf.data());
        if (rows == R)
          dots_all<R>(xf.data(), u, us, m.threshold, a + s * r * K, r, K, out.data() + s * r, nr);
        else
          for (int q = 0; q < rows; ++q)
            dots_all<1>(xf.data() + q * K, u + q * us, us, m.threshold, a + s * r * K, r, K,
                        out.data() + q * nr + s * r, nr);
      }
      for (int64_t c = 0; c < rows * nr; ++c) h[i * nr + c] = static_cast<T>(out[c]);
    }
  });
}

template <typename T>
void backward_impl(const T* dh, const T* x, const float* a, T* dx, float* ga_parts, int64_t N, int64_t K, int64_t n,
                   int64_t r, const Masks& m) {
  at::parallel_for(0, N, GRAIN, [&](int64_t i0, int64_t i1) {
    constexpr int R = BWD_ROWS;
    float* ga = ga_parts + at::get_thread_num() * n * r * K;  // this thread's share of da, summed after
    std::vector<float> xf(R * K), dxf(R * K), dhf(R * n * r);
    std::vector<uint64_t> buf(R * m.half);
    const int64_t us = 2 * m.half, nr = n * r;
    for (int64_t i = i0; i < i1; i += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, i1 - i));
      to_float(x + i * K, xf.data(), rows * K);
      to_float(dh + i * nr, dhf.data(), rows * nr);
      std::fill(dxf.begin(), dxf.end(), 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const uint32_t* u = draw_rows(m, s, i, rows, buf.data());
        const float* as = a + s * r * K;
        if (rows == R)
          backward_rows<R>(xf.data(), u, us, m.threshold, dhf.data() + s * r, nr, as, r, K, ga + s * r * K, dxf.data());
        else
          for (int q = 0; q < rows; ++q)
            backward_rows<1>(xf.data() + q * K, u + q * us, us, m.threshold, dhf.data() + q * nr + s * r, nr, as, r, K,
                             ga + s * r * K, dxf.data() + q * K);
      }
      for (int64_t c = 0; c < rows * K; ++c) dx[i * K + c] = static_cast<T>(dxf[c]);
    }
  });
}

// RMSNorm's backward, y = x r w with r = 1 / sqrt(mean(x^2) + eps) per row of n:
//   dx = r (dy w) - x r^3 sum_j(dy_j w_j x_j) / n,    dw = sum over rows of dy x r
// fp32 sums, dx in x's dtype, dw fp32 (one share per thread, summed after).
template <typename T>
void rms_norm_backward_impl(const T* dy, const T* x, const T* w, T* dx, float* dw_parts, int64_t rows, int64_t n,
                            double eps, bool weight_grad) {
  at::parallel_for(0, rows, GRAIN, [&](int64_t i0, int64_t i1) {
    float* dw = dw_parts + at::get_thread_num() * n;
    std::vector<float> xf(n), gf(n), wf(n);
    to_float(w, wf.data(), n);
    for (int64_t i = i0; i < i1; ++i) {
      to_float(x + i * n, xf.data(), n);
      to_float(dy + i * n, gf.data(), n);
      vf ss{}, dot{};
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        const vf xv = load(xf.data() + j);
        ss = fma(xv, xv, ss);
        dot = fma(load(gf.data() + j) * load(wf.data() + j), xv, dot);
      }
      float s2 = hsum(ss), d = hsum(dot);
      for (; j < n; ++j) s2 += xf[j] * xf[j], d += gf[j] * wf[j] * xf[j];
      const float r = 1.0f / std::sqrt(s2 / static_cast<float>(n) + static_cast<float>(eps));
      const float c = r * r * r * d / static_cast<float>(n);
      for (int64_t k = 0; k < n; ++k) {
        dx[i * n + k] = static_cast<T>(r * gf[k] * wf[k] - c * xf[k]);
        if (weight_grad) dw[k] += gf[k] * xf[k] * r;
      }
    }
  });
}

// SwiGLU's elementwise half, x = [gate | up] (rows, 2 h): y = silu(g) u = g s u with s = sigmoid(g), and its
// backward dg = dy u s (1 + g (1 - s)), du = dy g s; fp32 inside, in x's dtype.
// One row's silu(g) * u for outputs [c0, c1) (c0 a multiple of W: every output goes through the same vector or tail
// code whatever the range; decode_stack_fused splits a row between threads).
template <typename T>
void silu_mul_cols(const T* x, T* y, int64_t h, int64_t c0, int64_t c1, float* gu) {
  const int64_t n = c1 - c0;
  to_float(x + c0, gu, n);
  to_float(x + h + c0, gu + n, n);
  const float *g = gu, *u = gu + n;
  float* yf = gu + 2 * n;
  const int64_t vec_end = std::min(c1, h - h % W);  // outputs below it go through vectors from 0
  int64_t j = c0;
  for (; j + W <= vec_end; j += W) {
    const vf gv = load(g + j - c0);
    store(yf + j - c0, gv * vsigmoid(gv) * load(u + j - c0));
  }
  for (; j < c1; ++j) yf[j - c0] = g[j - c0] / (1.f + std::exp(-g[j - c0])) * u[j - c0];
  for (int64_t k = 0; k < n; ++k) y[c0 + k] = static_cast<T>(yf[k]);
}

template <typename T>
void silu_mul_impl(const T* x, T* y, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, GRAIN, [&](int64_t i0, int64_t i1) {
    std::vector<float> gu(3 * h);
    for (int64_t i = i0; i < i1; ++i) silu_mul_cols(x + i * 2 * h, y + i * h, h, 0, h, gu.data());
  });
}

template <typename T>
void silu_mul_backward_impl(const T* dy, const T* x, T* dx, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, GRAIN, [&](int64_t i0, int64_t i1) {
    std::vector<float> gu(2 * h), d(h), out(2 * h);
    for (int64_t i = i0; i < i1; ++i) {
      to_float(x + i * 2 * h, gu.data(), 2 * h);
      to_float(dy + i * h, d.data(), h);
      const float *g = gu.data(), *u = gu.data() + h;
      int64_t j = 0;
      for (; j + W <= h; j += W) {
        const vf gv = load(g + j), s = vsigmoid(gv), dv = load(d.data() + j);
        const vf dsilu = s * fma(gv, 1.f - s, splat(1.f));  // s (1 + g (1 - s))
        store(out.data() + j, dv * load(u + j) * dsilu);
        store(out.data() + h + j, dv * gv * s);
      }
      for (; j < h; ++j) {
        const float s = 1.f / (1.f + std::exp(-g[j]));
        out[j] = d[j] * u[j] * s * (1.f + g[j] * (1.f - s));
        out[h + j] = d[j] * g[j] * s;
      }
      for (int64_t k = 0; k < 2 * h; ++k) dx[i * 2 * h + k] = static_cast<T>(out[k]);
    }
  });
}

template <typename F>
void dispatch(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": x in fp32, bf16 or fp16");
  }
}

at::Tensor lora_dropout_a(const at::Tensor& x, const at::Tensor& a, int64_t n, double p, const at::Tensor& seed) {
  check(x, a, n, p, seed, "lora_dropout_a");
  const int64_t N = x.size(0), K = x.size(1), r = a.size(0) / n;
  const Masks m(seed.item<int64_t>(), p, N, K);
  at::Tensor h = at::empty({N, n * r}, x.options());
  dispatch(x.scalar_type(), "lora_dropout_a", [&](auto t) {
    using T = decltype(t);
    forward_impl<T>(x.data_ptr<T>(), a.data_ptr<float>(), h.data_ptr<T>(), N, K, n, r, m);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> lora_dropout_a_backward(const at::Tensor& dh_, const at::Tensor& x,
                                                           const at::Tensor& a, int64_t n, double p,
                                                           const at::Tensor& seed) {
  check(x, a, n, p, seed, "lora_dropout_a_backward");
  const int64_t N = x.size(0), K = x.size(1), r = a.size(0) / n;
  const at::Tensor dh = dh_.to(x.scalar_type()).contiguous();
  TORCH_CHECK(dh.dim() == 2 && dh.size(0) == N && dh.size(1) == n * r, "lora_dropout_a_backward: dh (N, n r)");
  const Masks m(seed.item<int64_t>(), p, N, K);
  at::Tensor dx = at::empty_like(x);
  at::Tensor parts = at::zeros({at::get_num_threads(), n * r, K}, a.options());  // one share of da per thread
  dispatch(x.scalar_type(), "lora_dropout_a_backward", [&](auto t) {
    using T = decltype(t);
    backward_impl<T>(dh.data_ptr<T>(), x.data_ptr<T>(), a.data_ptr<float>(), dx.data_ptr<T>(),
                     parts.data_ptr<float>(), N, K, n, r, m);
  });
  return {dx, parts.size(0) == 1 ? parts[0] : parts.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& w,
                                                     double eps, bool weight_grad) {
  const int64_t n = w.numel();
  TORCH_CHECK(x.is_contiguous() && x.size(-1) == n && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm_backward: x (..., n) and w (n,) contiguous, one dtype");
  const at::Tensor dy = dy_.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor parts = at::zeros({weight_grad ? at::get_num_threads() : 1, n}, w.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), "rms_norm_backward", [&](auto t) {
    using T = decltype(t);
    rms_norm_backward_impl<T>(dy.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), dx.data_ptr<T>(),
                              parts.data_ptr<float>(), x.numel() / n, n, eps, weight_grad);
  });
  return {dx, (parts.size(0) == 1 ? parts[0] : parts.sum(0)).to(w.scalar_type())};
}

at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0, "silu_mul: x must be contiguous (..., 2 h)");
  const int64_t h = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = h;
  at::Tensor y = at::empty(shape, x.options());
  dispatch(x.scalar_type(), "silu_mul", [&](auto t) {
    using T = decltype(t);
    silu_mul_impl<T>(x.data_ptr<T>(), y.data_ptr<T>(), x.numel() / (2 * h), h);
  });
  return y;
}

at::Tensor silu_mul_backward(const at::Tensor& dy_, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0, "silu_mul_backward: x must be contiguous (..., 2 h)");
  const int64_t h = x.size(-1) / 2;
  const at::Tensor dy = dy_.to(x.scalar_type()).contiguous();
  TORCH_CHECK(dy.numel() * 2 == x.numel(), "silu_mul_backward: dy (..., h) for x (..., 2 h)");
  at::Tensor dx = at::empty_like(x);
  dispatch(x.scalar_type(), "silu_mul_backward", [&](auto t) {
    using T = decltype(t);
    silu_mul_backward_impl<T>(dy.data_ptr<T>(), x.data_ptr<T>(), dx.data_ptr<T>(), x.numel() / (2 * h), h);
  });
  return dx;
}

at::Tensor dropout_keep(const at::Tensor& seed, int64_t n, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(0.0 <= p && p < 1.0 && seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "dropout_keep: p in [0, 1), seed one int64");
  const Masks m(seed.item<int64_t>(), p, rows, cols);
  at::Tensor keep = at::empty({n, rows, cols}, seed.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, n * rows, GRAIN, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> buf(m.half);
    const uint32_t t = m.threshold;
    for (int64_t b = b0; b < b1; ++b) {
      const uint32_t* u = m.draw(b / rows, b % rows, buf.data());
      bool* o = out + b * cols;
      for (int64_t j = 0; j < cols; ++j) o[j] = u[j] >= t;
    }
  });
  return keep;
}

}  // namespace


// decode_stack_fused (decode_ops.cpp): silu_mul on outputs [c0, c1) of one (2 h) bf16 row, from a thread of its
// parallel region.
void lmforge_silu_mul_cols(const c10::BFloat16* x, c10::BFloat16* y, int64_t h, int64_t c0, int64_t c1) {
  thread_local std::vector<float> gu;
  gu.resize(3 * (c1 - c0));
  silu_mul_cols(x, y, h, c0, c1, gu.data());
}

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("lora_dropout_a(Tensor x, Tensor a, int n, float p, Tensor seed) -> Tensor");
  m.def("lora_dropout_a_backward(Tensor dh, Tensor x, Tensor a, int n, float p, Tensor seed) -> (Tensor, Tensor)");
  m.def("dropout_keep(Tensor seed, int n, int rows, int cols, float p) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("silu_mul_backward(Tensor dy, Tensor x) -> Tensor");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor w, float eps, bool weight_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("lora_dropout_a", &lora_dropout_a);
  m.impl("lora_dropout_a_backward", &lora_dropout_a_backward);
  m.impl("dropout_keep", &dropout_keep);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("silu_mul", &silu_mul);
  m.impl("silu_mul_backward", &silu_mul_backward);
}
