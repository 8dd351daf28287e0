// lmforge's CPU kernels for training: what a small model's training step spends most on outside its matrix
// products.
//
// * causal_attention(q, k, v, scale) -> (o, lse): q (B, H, T, D), k and v (B, H_kv, T, D) (grouped-query heads:
//   query head h reads key/value head h / (H / H_kv)), fp32 or bf16 (o in the same dtype; bf16 inputs are
//   computed in fp32, so no casts around the call under autocast), last dimension contiguous. For each head
//   S = scale Q K^T on and below the diagonal, P = softmax(S) by rows, O = P V; lse (B, H, T) = log sum exp of
//   each row of S, all the backward needs besides q, k, v, o (P is recomputed, never stored).
//   o is returned as (B, H, T, D) laid out as (B, T, H, D) in memory, so that concatenating the heads after it
//   is a view.
//   With cos and sin (T, D) (fp32), q and k are first rotated by RoPE (rotate-half pairs (x_c, x_{c+D/2}), as
//   models/layers.py apply_rope), inside the kernel: no rotated copies, casts or elementwise passes around it.
// * causal_attention_backward(do, q, k, v, o, lse, scale, cos, sin) -> (dq, dk, dv): with D_i = do_i . o_i,
//   dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = scale dS K, dK = scale dS^T Q (summed over the query
//   heads that share a key/value head); with RoPE, dq and dk are rotated back (the rotation's transpose).
//
// Why attention by hand: PyTorch's CPU flash-attention kernel is built for long sequences; at nanoGPT's CPU shape (12 x 4
// heads of 64 positions x 32 dimensions) its forward and backward cost ~1 ms a layer, a fifth of a bf16 training
// step, for ~40 MFLOP of arithmetic. Here a head is one task: its whole T x T score matrix lives in a scratch buffer
// that stays in L2, the products are register-blocked over 4 query rows, half the matrix (above the diagonal) is
// never computed, and exp is a vector polynomial. `python bench/train_throughput.py` measures what it gives.
//
// Written with GCC/Clang vector extensions (16 floats per vector): the compiler emits AVX-512 where the CPU has it,
// two AVX2 halves (or four SSE quarters) elsewhere -- one body for every machine, compiled with -march=native.
// With bf16 inputs on a CPU with AVX512-BF16, the score products Q K^T and dO V^T (bf16 times bf16, summed in
// fp32: exact products, as the fp32 path computes them) take its pairwise dot-product instruction, 32 products
// per instruction instead of 16.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <immintrin.h>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

constexpr int R = 4;  // query rows per register block

// The key side of S = X Y^T (Y: keys K, or values V for dP = dO V^T), prepared once per head: Yt (D, Tp) fp32,
// Y transposed; or, for bf16 with AVX512-BF16, Y2 (D / 2, Tp) 32-bit words, each a pair of Y[j, 2c], Y[j, 2c + 1]
// (the dot-product instruction's layout). Padding columns are zero.
#if defined(__AVX512BF16__)
constexpr bool BF16_DOT = true;
#else
constexpr bool BF16_DOT = false;
#endif
struct Keys {
  std::vector<float> t;     // Yt
  std::vector<uint32_t> w;  // Y2
};

template <typename T>
void prepare_keys(const T* Y, int64_t ldy, Keys& keys, int T_, int D, int Tp) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && BF16_DOT) {
    keys.w.resize(static_cast<size_t>(D / 2) * Tp);
    for (int c = 0; c < D / 2; ++c) {
      uint32_t* y2 = keys.w.data() + c * Tp;
      for (int j = 0; j < T_; ++j) std::memcpy(y2 + j, Y + j * ldy + 2 * c, 4);
      std::fill(y2 + T_, y2 + Tp, 0u);
    }
  } else {
    keys.t.resize(static_cast<size_t>(D) * Tp);
    for (int d = 0; d < D; ++d) {
      float* yt = keys.t.data() + d * Tp;
      for (int j = 0; j < T_; ++j) yt[j] = to_float(Y[j * ldy + d]);
      std::fill(yt + T_, yt + Tp, 0.f);
    }
  }
}

// S[i, j] = sum_d X[i, d] Y[j, d] for i < T and the key vectors j / W <= i / W (on and below the diagonal's
// vector block). X rows at stride ldx, S (T, Tp) contiguous, Tp a multiple of W. Register blocks of R rows by two
// key vectors.
template <typename T>
void lower_nt(const T* X, int64_t ldx, const Keys& keys, float* S, int T_, int D, int Tp) {
  for (int i0 = 0; i0 < T_; i0 += R) {
    const int rows = std::min(R, T_ - i0);
    const int nb = (std::min(i0 + R, T_) - 1) / W + 1;  // key vectors the block's last row needs
    const T* x[R];
    for (int r = 0; r < R; ++r) x[r] = X + (i0 + std::min(r, rows - 1)) * ldx;
    for (int jb = 0; jb < nb; jb += 2) {
      const bool two = jb + 1 < nb;
      vf a0[R] = {}, a1[R] = {};
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        __m512 b0[R], b1[R];
        for (int r = 0; r < R; ++r) b0[r] = b1[r] = _mm512_setzero_ps();
        for (int c = 0; c < D / 2; ++c) {
          const uint32_t* y2 = keys.w.data() + c * Tp + jb * W;
          const __m512bh y0 = (__m512bh)_mm512_loadu_si512(y2);
          const __m512bh y1 = two ? (__m512bh)_mm512_loadu_si512(y2 + W) : y0;
          for (int r = 0; r < R; ++r) {
            int32_t pair;
            std::memcpy(&pair, x[r] + 2 * c, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            b0[r] = _mm512_dpbf16_ps(b0[r], xv, y0);
            if (two) b1[r] = _mm512_dpbf16_ps(b1[r], xv, y1);
          }
        }
        for (int r = 0; r < R; ++r) {
          a0[r] = reinterpret_cast<vf>(b0[r]);
          a1[r] = reinterpret_cast<vf>(b1[r]);
        }
      } else
#endif
      {
        for (int d = 0; d < D; ++d) {
          const float* yt = keys.t.data() + d * Tp + jb * W;
          const vf y0 = load(yt), y1 = two ? load(yt + W) : y0;
          for (int r = 0; r < R; ++r) {
            const vf xv = splat(to_float(x[r][d]));
            a0[r] += xv * y0;
            if (two) a1[r] += xv * y1;
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        store(S + (i0 + r) * Tp + jb * W, a0[r]);
        if (two) store(S + (i0 + r) * Tp + (jb + 1) * W, a1[r]);
      }
    }
  }
}

// Z[i, :] (+)= sum_j M(i, j) Y[j, :] over j in [lo(i0), hi(i0)) for blocks of R rows: lower (M zero above the
// diagonal): j < i0 + R; upper (M zero below it): j >= i0. M(i, j) = M[i * mi + j * mj] (a matrix or, with the
// strides swapped, its transpose: P^T and dS^T are read in place, 4 adjacent elements per j); Y, Z rows at strides
// ldy, ldz; D = DV vectors; with row_scale, row i of the sum is multiplied by row_scale[i]. Sums in fp32.
template <int DV, typename TY, typename TZ>
void rows_times(const float* M, int64_t mi, int64_t mj, const TY* Y, int64_t ldy, TZ* Z, int64_t ldz, int T_,
                bool lower, bool accumulate, const float* row_scale) {
  for (int i0 = 0; i0 < T_; i0 += R) {
    const int rows = std::min(R, T_ - i0);
    vf acc[R][DV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < DV; ++v)
        acc[r][v] = accumulate && r < rows ? load_as_float(Z + (i0 + r) * ldz + v * W) : vf{};
    const int lo = lower ? 0 : i0, hi = lower ? std::min(i0 + R, T_) : T_;
    const float* m[R];
    for (int r = 0; r < R; ++r) m[r] = M + (i0 + std::min(r, rows - 1)) * mi;
    for (int j = lo; j < hi; ++j) {
      vf y[DV];
      for (int v = 0; v < DV; ++v) y[v] = load_as_float(Y + j * ldy + v * W);
      for (int r = 0; r < R; ++r) {
        const vf mv = splat(m[r][j * mj]);
        for (int v = 0; v < DV; ++v) acc[r][v] += mv * y[v];
      }
    }
    for (int r = 0; r < rows; ++r) {
      const vf sc = splat(row_scale != nullptr ? row_scale[i0 + r] : 1.0f);
      for (int v = 0; v < DV; ++v) store_from_float(Z + (i0 + r) * ldz + v * W, acc[r][v] * sc);
    }
  }
}

template <typename TY, typename TZ>
using RowsTimes = void (*)(const float*, int64_t, int64_t, const TY*, int64_t, TZ*, int64_t, int, bool, bool,
                           const float*);
template <typename TY, typename TZ>
RowsTimes<TY, TZ> rows_times_for(int D) {
  switch (D) {
    case 16: return rows_times<16 / W, TY, TZ>;
    case 32: return rows_times<32 / W, TY, TZ>;
    case 64: return rows_times<64 / W, TY, TZ>;
    case 128: return rows_times<128 / W, TY, TZ>;
    default: return nullptr;
  }
}

// Columns of row i that the products read: up to the end of its block of R rows (rows_times reads a block's rows
// up to its last row's diagonal), in whole vectors.
inline int vectors_read(int i, int T_) { return std::min(i | (R - 1), T_ - 1) / W + 1; }

// P = exp(scale S - lse) by rows on and below the diagonal, zero above it (in the columns the products read).
// With lse_in null, the forward's: P unnormalised, exp(scale S - max), and lse and 1 / sum(P) written per row
// (both need Tp floats of room: they are finished a vector at a time).
void softmax_rows(float* S, int T_, int Tp, float scale, float* lse, float* inv_sum, const float* lse_in) {
  const vi lane = iota();
  for (int i = 0; i < T_; ++i) {
    float* s = S + i * Tp;
    const int nb = i / W + 1;  // vectors holding columns 0..i
    float shift;
    if (lse_in == nullptr) {
      vf m = splat(-INFINITY);
      for (int b = 0; b < nb; ++b) {
        vf v = load(s + b * W);
        if (b == nb - 1) v = (lane + b * W) <= i ? v : splat(-INFINITY);
        m = v > m ? v : m;
      }
      shift = hmax(m) * scale;
    } else {
      shift = lse_in[i];
    }
    vf sum = {};
    for (int b = 0; b < nb; ++b) {
      vf p = vexp(load(s + b * W) * scale - shift);
      if (b == nb - 1) p = (lane + b * W) <= i ? p : vf{};
      sum += p;
      store(s + b * W, p);
    }
    std::fill(s + nb * W, s + vectors_read(i, T_) * W, 0.f);
    if (lse_in == nullptr) {
      lse[i] = shift;  // + log(sum), below: one vector log per 16 rows
      inv_sum[i] = hsum(sum);
    }
  }
  if (lse_in == nullptr)
    for (int i = 0; i < T_; i += W) {
      const vf l = load(inv_sum + i);
      store(lse + i, load(lse + i) + vlog(l));
      store(inv_sum + i, 1.0f / l);
    }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_attention: q, k, v must be (B, H, T, D)");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "causal_attention: q, k, v all fp32 or all bf16");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
                  q.size(1) % k.size(1) == 0,
              "causal_attention: q (B, H, T, D), k and v (B, H_kv, T, D) with H a multiple of H_kv");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 16 || D == 32 || D == 64 || D == 128, "causal_attention: head size 16, 32, 64 or 128");
}

// (B, H, T, D) with rows of D contiguous (the strides of B, H, T are free); else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// A (B, H, T, D) tensor laid out as (B, T, H, D).
at::Tensor empty_bthd(int64_t B, int64_t H, int64_t T, int64_t D, at::ScalarType dtype) {
  return at::empty({B, T, H, D}, at::TensorOptions().dtype(dtype)).transpose(1, 2);
}

template <typename T>
const T* head(const at::Tensor& t, int64_t b, int64_t h) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1);
}
template <typename T>
T* head_mut(at::Tensor& t, int64_t b, int64_t h) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1);
}

// RoPE on T rows of D: out[t] = R_t x[t], the rotate-half pairs (c, c + D/2) turned by the angles whose cos and
// sin (T, D) hold: out_c = x_c cos_c - x_{c+h} sin_c, out_{c+h} = x_{c+h} cos_{c+h} + x_c sin_{c+h}; with
// transpose, R_t^T (the backward's map: dx = R^T d(Rx)). Sums in fp32, out rounded to TO.
template <typename TI, typename TO>
void rope_rows(const TI* x, int64_t ldx, TO* out, int64_t ldo, const float* cos, const float* sin, int T_, int D,
               bool transpose) {
  const int h = D / 2;
  const float sg = transpose ? -1.f : 1.f;
  for (int t = 0; t < T_; ++t) {
    const TI* xr = x + t * ldx;
    TO* yr = out + t * ldo;
    const float *c = cos + t * D, *sn = sin + t * D;
    if (h % W == 0) {
      for (int i = 0; i < h; i += W) {
        const vf x1 = load_as_float(xr + i), x2 = load_as_float(xr + h + i);
        // forward: y1 = c1 x1 - s1 x2, y2 = c2 x2 + s2 x1; transpose: y1 = c1 x1 + s2 x2, y2 = c2 x2 - s1 x1
        const vf s_for_1 = transpose ? load(sn + h + i) : load(sn + i), s_for_2 = transpose ? load(sn + i) : load(sn + h + i);
        store_from_float(yr + i, x1 * load(c + i) - sg * x2 * s_for_1);
        store_from_float(yr + h + i, x2 * load(c + h + i) + sg * x1 * s_for_2);
      }
    } else {
      for (int i = 0; i < h; ++i) {
        const float x1 = to_float(xr[i]), x2 = to_float(xr[h + i]);
        const float s1 = transpose ? sn[h + i] : sn[i], s2 = transpose ? sn[i] : sn[h + i];
        yr[i] = static_cast<TO>(x1 * c[i] - sg * x2 * s1);
        yr[h + i] = static_cast<TO>(x2 * c[h + i] + sg * x1 * s2);
      }
    }
  }
}

struct Rope {
  const float* cos = nullptr;  // (T, D), or null: no rotation
  const float* sin = nullptr;
};

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& lse,
                  float scale, Rope rope) {
  const int64_t B = q.size(0), H = q.size(1), G = H / k.size(1);
  const int T_ = static_cast<int>(q.size(2)), D = static_cast<int>(q.size(3)), Tp = (T_ + W - 1) / W * W;
  const RowsTimes<T, T> times = rows_times_for<T, T>(D);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Keys keys;
    std::vector<float> s(static_cast<size_t>(T_) * Tp), inv_sum(Tp, 1.f), lse_row(Tp);
    std::vector<T> q_rot(rope.cos ? static_cast<size_t>(T_) * D : 0), k_rot(q_rot.size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const T *qh = head<T>(q, b, h), *kh = head<T>(k, b, h / G);
      int64_t ldq = q.stride(2), ldk = k.stride(2);
      if (rope.cos != nullptr) {
        rope_rows(qh, ldq, q_rot.data(), D, rope.cos, rope.sin, T_, D, false);
        rope_rows(kh, ldk, k_rot.data(), D, rope.cos, rope.sin, T_, D, false);
        qh = q_rot.data(), kh = k_rot.data(), ldq = ldk = D;
      }
      prepare_keys(kh, ldk, keys, T_, D, Tp);
      lower_nt(qh, ldq, keys, s.data(), T_, D, Tp);
      softmax_rows(s.data(), T_, Tp, scale, lse_row.data(), inv_sum.data(), nullptr);
      std::copy(lse_row.begin(), lse_row.begin() + T_, lse.data_ptr<float>() + (b * H + h) * T_);
      times(s.data(), Tp, 1, head<T>(v, b, h / G), v.stride(2), head_mut<T>(o, b, h), o.stride(2), T_, true, false,
            inv_sum.data());  // O = P V / sum(P)
    }
  });
}

// cos and sin as (T, D) fp32 contiguous tables (or undefined tensors when there is no rotation).
std::tuple<at::Tensor, at::Tensor> rope_tables(const at::Tensor& q, const std::optional<at::Tensor>& cos,
                                               const std::optional<at::Tensor>& sin) {
  if (!cos.has_value()) return {at::Tensor(), at::Tensor()};
  TORCH_CHECK(sin.has_value() && cos->dim() == 2 && cos->size(0) == q.size(2) && cos->size(1) == q.size(3) &&
                  sin->sizes() == cos->sizes(),
              "causal_attention: cos and sin must both be (T, D)");
  return {cos->to(at::kFloat).contiguous(), sin->to(at::kFloat).contiguous()};
}

Rope rope_of(const at::Tensor& cos, const at::Tensor& sin) {
  return cos.defined() ? Rope{cos.data_ptr<float>(), sin.data_ptr<float>()} : Rope{};
}

std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                    double scale, const std::optional<at::Tensor>& cos_,
                                                    const std::optional<at::Tensor>& sin_) {
  check_inputs(q_, k_, v_);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const auto [cos, sin] = rope_tables(q, cos_, sin_);
  at::Tensor o = empty_bthd(q.size(0), q.size(1), q.size(2), q.size(3), q.scalar_type());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.scalar_type() == at::kFloat)
    forward_impl<float>(q, k, v, o, lse, static_cast<float>(scale), rope_of(cos, sin));
  else
    forward_impl<c10::BFloat16>(q, k, v, o, lse, static_cast<float>(scale), rope_of(cos, sin));
  return {o, lse};
}

// A gradient summed in fp32 (T, D) into its output rows, rotated back by RoPE's transpose where q and k were rotated.
template <typename T>
void store_rows(const float* sum, T* out, int64_t ldo, int T_, int D, Rope rope) {
  if (rope.cos != nullptr) {
    rope_rows(sum, D, out, ldo, rope.cos, rope.sin, T_, D, true);
    return;
  }
  for (int j = 0; j < T_; ++j)
    for (int c = 0; c < D; c += W) store_from_float(out + j * ldo + c, load(sum + j * D + c));
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& o, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   float sc, Rope rope) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), G = H / Hkv;
  const int T_ = static_cast<int>(q.size(2)), D = static_cast<int>(q.size(3)), Tp = (T_ + W - 1) / W * W;
  const RowsTimes<T, float> times_sum = rows_times_for<T, float>(D);
  // One task per key/value head: the G query heads that read it run in turn, summing into its dK and dV (fp32).
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    const size_t sq = static_cast<size_t>(T_) * Tp, sd = static_cast<size_t>(T_) * D;
    Keys kkeys, vkeys;
    std::vector<float> p(sq), ds(sq), rowdot(T_), dq_sum(sd), dk_sum(sd), dv_sum(sd);
    std::vector<T> q_rot(rope.cos ? sd : 0), k_rot(q_rot.size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const T* kh = head<T>(k, b, g);
      int64_t ldk = k.stride(2);
      if (rope.cos != nullptr) {
        rope_rows(kh, ldk, k_rot.data(), D, rope.cos, rope.sin, T_, D, false);
        kh = k_rot.data(), ldk = D;
      }
      prepare_keys(kh, ldk, kkeys, T_, D, Tp);
      prepare_keys(head<T>(v, b, g), v.stride(2), vkeys, T_, D, Tp);
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const T* qh = head<T>(q, b, h);
        int64_t ldq = q.stride(2);
        if (rope.cos != nullptr) {
          rope_rows(qh, ldq, q_rot.data(), D, rope.cos, rope.sin, T_, D, false);
          qh = q_rot.data(), ldq = D;
        }
        const T* doh = head<T>(dout, b, h);
        const T* oh = head<T>(o, b, h);
        const bool first = h == g * G;
        for (int i = 0; i < T_; ++i) {  // D_i = do_i . o_i
          vf a = {};
          for (int c = 0; c < D; c += W)
            a += load_as_float(doh + i * dout.stride(2) + c) * load_as_float(oh + i * o.stride(2) + c);
          rowdot[i] = hsum(a);
        }
        lower_nt(qh, ldq, kkeys, p.data(), T_, D, Tp);  // S, then P = exp(scale S - lse)
        softmax_rows(p.data(), T_, Tp, sc, nullptr, nullptr, lse.data_ptr<float>() + (b * H + h) * T_);
        lower_nt(doh, dout.stride(2), vkeys, ds.data(), T_, D, Tp);  // dP = dO V^T
        for (int i = 0; i < T_; ++i) {  // dS = scale P (dP - D_i), zero above the diagonal (P is)
          float* dsr = ds.data() + i * Tp;
          const float* pr = p.data() + i * Tp;
          const int nb = i / W + 1;
          const vf di = splat(rowdot[i]);
          for (int c = 0; c < nb; ++c) store(dsr + c * W, load(pr + c * W) * (load(dsr + c * W) - di) * sc);
          std::fill(dsr + nb * W, dsr + vectors_read(i, T_) * W, 0.f);
        }
        times_sum(ds.data(), Tp, 1, kh, ldk, dq_sum.data(), D, T_, true, false, nullptr);              // dQ = dS K
        times_sum(p.data(), 1, Tp, doh, dout.stride(2), dv_sum.data(), D, T_, false, !first, nullptr);  // dV += P^T dO
        times_sum(ds.data(), 1, Tp, qh, ldq, dk_sum.data(), D, T_, false, !first, nullptr);             // dK += dS^T Q
        store_rows(dq_sum.data(), head_mut<T>(dq, b, h), dq.stride(2), T_, D, rope);
      }
      store_rows(dk_sum.data(), head_mut<T>(dk, b, g), dk.stride(2), T_, D, rope);
      store_rows(dv_sum.data(), head_mut<T>(dv, b, g), dv.stride(2), T_, D, Rope{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(const at::Tensor& do_, const at::Tensor& q_,
                                                                         const at::Tensor& k_, const at::Tensor& v_,
                                                                         const at::Tensor& o_, const at::Tensor& lse_,
                                                                         double scale,
                                                                         const std::optional<at::Tensor>& cos_,
                                                                         const std::optional<at::Tensor>& sin_) {
  check_inputs(q_, k_, v_);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const auto [cos, sin] = rope_tables(q, cos_, sin_);
  const at::Tensor dout = rows_contiguous(do_.to(q.scalar_type())), o = rows_contiguous(o_.to(q.scalar_type()));
  const at::Tensor lse = lse_.contiguous();
  TORCH_CHECK(dout.sizes() == q.sizes() && o.sizes() == q.sizes(), "causal_attention_backward: do and o like q");
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), T_ = q.size(2), D = q.size(3);
  const at::ScalarType dt = q.scalar_type();
  at::Tensor dq = empty_bthd(B, H, T_, D, dt), dk = empty_bthd(B, Hkv, T_, D, dt), dv = empty_bthd(B, Hkv, T_, D, dt);
  if (dt == at::kFloat)
    backward_impl<float>(dout, q, k, v, o, lse, dq, dk, dv, static_cast<float>(scale), rope_of(cos, sin));
  else
    backward_impl<c10::BFloat16>(dout, q, k, v, o, lse, dq, dk, dv, static_cast<float>(scale), rope_of(cos, sin));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? cos, Tensor? sin) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale, "
        "Tensor? cos, Tensor? sin) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
}
