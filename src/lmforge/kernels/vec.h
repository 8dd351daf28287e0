// Vectors of W floats for lmforge's kernels, written once with GCC's vector extensions, so one body serves every
// CPU (train_ops.cpp, decode_ops.cpp): W = 16 (one AVX-512 register), 8 with AVX2 (one register), 4 otherwise.
// A vector wider than the machine's registers is no register at all for GCC: with W = 16 on AVX2 every value
// lived on the stack and moved in 16-byte pieces, and the haswell build ran the training attention 9x slower than
// the AVX-512 one (2.9 ms against 0.34 ms a forward at nanoGPT's CPU shape, one thread; docs/training.md).
// Loads and stores of fp32 or bf16 rows, horizontal sum/max, exp and log.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <utility>

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;  // floats per vector
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float)), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t)), aligned(4), may_alias));

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf splat(float x) {  // one broadcast (an element-by-element loop became 8 inserts with AVX2)
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(x));
#else
  return reinterpret_cast<vf>(_mm_set1_ps(x));
#endif
}
// Horizontal sum and maximum: a tree of half-vector shuffles (log2 W steps), not W - 1 dependent scalar operations.
// Lane i meets lane i ^ h at step h.
template <int H, int... I>
inline vi swap_mask(std::integer_sequence<int, I...>) {
  return vi{(I ^ H)...};
}
template <int H>
inline vi swap_mask() {
  return swap_mask<H>(std::make_integer_sequence<int, W>{});
}
template <typename Op>
inline float reduce(vf v, Op op) {
  if constexpr (W >= 16) v = op(v, __builtin_shuffle(v, swap_mask<8>()));
  if constexpr (W >= 8) v = op(v, __builtin_shuffle(v, swap_mask<4>()));
  v = op(v, __builtin_shuffle(v, swap_mask<2>()));
  v = op(v, __builtin_shuffle(v, swap_mask<1>()));
  return v[0];
}
inline float hsum(vf v) { return reduce(v, [](vf a, vf b) { return a + b; }); }
inline float hmax(vf v) { return reduce(v, [](vf a, vf b) { return a > b ? a : b; }); }
inline vi iota() {
  vi r;
  for (int i = 0; i < W; ++i) r[i] = i;
  return r;
}

// a * b + c in one rounding where the CPU has FMA (the kernels compile as ISO C++, where GCC does not contract
// a * b + c on its own).
inline vf fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                              reinterpret_cast<__m512>(c)));
#elif defined(__AVX__) && defined(__FMA__)
  return reinterpret_cast<vf>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                              reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// exp(x), x clamped to [-87, 88.3] (softmax scores minus their row's maximum, SwiGLU's sigmoid): 2^n exp(r),
// n = round(x / ln 2) found with the 1.5 2^23 rounding trick (its low bits are n), r = x - n ln 2 in two steps,
// exp(r) by Cephes' degree-6 polynomial (relative error ~2e-7); below -87 (where 2^n leaves the normal range) the
// result is ~1e-38, i.e. nothing, above 88.3 ~2e38.
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const vf t = fma(x, splat(1.44269504088896341f), splat(12582912.0f));
  const vf n = t - 12582912.0f;
  const vf r = fma(n, splat(2.12194440e-4f), fma(n, splat(-0.693359375f), x));
  vf p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  p = fma(p * r, r, r + 1.0f);
  const vi e = ((reinterpret_cast<const vi&>(t) - 0x4B400000) + 127) << 23;
  return p * reinterpret_cast<const vf&>(e);
}

// log(x) for x >= 1 (a softmax row's sum): x = 2^e f with f in [sqrt(1/2), sqrt(2)), log f = 2 atanh(z),
// z = (f - 1) / (f + 1), |z| < 0.172, by its series to z^11 (relative error < 1e-8 before rounding).
inline vf vlog(vf x) {
  vi bits = reinterpret_cast<const vi&>(x);
  vi e = ((bits >> 23) & 0xFF) - 127;
  vi mant = (bits & 0x7FFFFF) | 0x3F800000;  // f in [1, 2)
  vf f = reinterpret_cast<const vf&>(mant);
  const vi big = f > 1.41421356f;
  f = big ? f * 0.5f : f;
  e = big ? e + 1 : e;
  const vf z = (f - 1.0f) / (f + 1.0f), z2 = z * z;
  vf s = splat(1.0f / 11);
  s = s * z2 + 1.0f / 9;
  s = s * z2 + 1.0f / 7;
  s = s * z2 + 1.0f / 5;
  s = s * z2 + 1.0f / 3;
  s = s * z2 + 1.0f;
  return __builtin_convertvector(e, vf) * 0.693147180559945f + 2.0f * z * s;
}

// One element or 16 of an input as fp32, and back (bf16 is the upper half of an fp32; stores round to nearest
// even, NaN kept).
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t)), aligned(2), may_alias));
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline vf load_as_float(const float* p) { return load(p); }
inline vf load_as_float(const c10::BFloat16* p) {
  const vi bits = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vi) << 16;
  return reinterpret_cast<const vf&>(bits);
}
inline void store_from_float(float* p, vf v) { store(p, v); }
inline void store_from_float(c10::BFloat16* p, vf v) {
  const vi bits = reinterpret_cast<const vi&>(v);
  vi r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  r = v != v ? vi{} + 0x7FC0 : r;
  *reinterpret_cast<vh*>(p) = __builtin_convertvector(r & 0xFFFF, vh);
}

// Row sums of W vectors at once: out[k] = sum of v[k]'s W elements (v is overwritten). log2 W levels of pairwise
// "evens + odds" shuffles (45 operations for W = 16) instead of W separate reductions (64 shuffles and adds) -- the
// scores of W keys from their W partial dot products.
template <int... I>
inline vi evens_mask(std::integer_sequence<int, I...>) {
  return vi{(2 * I)...};
}
inline vf hsum_rows(vf* v) {
  const vi evens = evens_mask(std::make_integer_sequence<int, W>{});
  const vi odds = evens + 1;
  for (int n = W; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], evens) + __builtin_shuffle(v[2 * i], v[2 * i + 1], odds);
  return v[0];
}

}  // namespace
