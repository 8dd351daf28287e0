// lmforge's CPU kernels for decoding: what one new token per row costs most in eager PyTorch.
//
// * tiled_linear: the same loop over fp32 or bf16 weights in the same tiles: the fp32 and bf16 layouts' product
//   (`bench/int8_rows.py --layout fp32`: 1.3x PyTorch's matrix product at one row and one thread, 1.9x at two).
// * int8_linear: y (M, N) = x (M, K) W^T with W weight-only int8, M small (1-8 rows: a decoding step, a
//   speculative verify pass, a small batch). W[n, k] = scale[n] * q[n, k], scale (N,) fp32, q int8 stored in
//   tiles of 4 channels (below; models/quant.py builds it). Decoding reads every weight once per token, so
//   what counts is how fast the weights stream: `python bench/int8_rows.py` (SmolLM2's int8 matrices from
//   memory, one thread of an AMD EPYC): 1 row ~15 GB/s, 2.2-2.5x PyTorch 2.13's _weight_int8pack_mm; 4 rows
//   cost ~1.4x one row, 8 rows ~2.3x. Each weight is read once per call, converted once, and multiplied into
//   every row of x (register blocking over rows and output channels); sums in fp32, the output in x's dtype.
// * attend_one, rms_norm, silu_mul (block_ops.cpp, which has its backward too): a Transformer block's small
//   operations for one token per row, one call each instead of the ~10 (attention), 6 (RMSNorm) and 3 (SwiGLU)
//   that eager PyTorch dispatches, which at batch 1 cost more than they compute (models/layers.py, Block._step).
//
// Compiled on the user's machine with -march=native (lmforge/kernels/__init__.py): AVX-512 or AVX2 bodies
// where the CPU has them, plain C++ otherwise.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ATen.h>  // the ops decode_stack calls (at::linear, at::mm, ...)
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "vec.h"

// int4_ops.cpp's kernel (another translation unit of this library), called without the dispatcher, and its pieces
// for decode_stack_fused; block_ops.cpp's silu_mul on part of a row.
at::Tensor lmforge_int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t group);
void lmforge_int4_quantise_row(const c10::BFloat16* x, int64_t K, int64_t group, int8_t* xq, float* xs, int32_t* xc,
                               float* xsum);
void lmforge_int4_tile(const uint8_t* packed, const at::Half* dm, int64_t K, int64_t group, int64_t t, int R,
                       const int8_t* const* xq, const float* const* xs, const int32_t* const* xc,
                       const float* const* xsum, float* const* out);
void lmforge_silu_mul_cols(const c10::BFloat16* x, c10::BFloat16* y, int64_t h, int64_t c0, int64_t c1);

namespace {

constexpr int MAX_ROWS = 8;  // rows of x per pass over the weights; more rows take several passes
// The int8 layout: channels in tiles of TILE_N, each tile's weights interleaved in chunks of CHUNK inputs,
// q[n / TILE_N][k / CHUNK][n % TILE_N][k % CHUNK] (models/quant.py builds it), so that a pass over a tile reads one
// contiguous run of TILE_N * K bytes -- one stream the hardware prefetcher follows, helped by a prefetch 1 KB
// ahead into L2. One thread of an AMD EPYC over SmolLM2's int8 matrices (from memory; side-by-side builds timed
// with ad-hoc scripts, not kept): 1.3x the rate of the row-major layout read as 4 short streams with prefetches
// 8 KB ahead (which was 1.6x 2 KB ahead into L1); bench/int8_rows.py gives the kernel's rate as it stands.
constexpr int TILE_N = 4;
constexpr int64_t CHUNK = 32;
constexpr int64_t PREFETCH_BYTES = 1024;
// Channels of a tile taken together for R rows of x: R x J accumulators must fit the vector registers (32 with
// AVX-512, 16 with AVX2); the rest of the tile follows from L1.
template <int R>
constexpr int channels_per_pass() {
#if defined(__AVX512F__)
  return R <= 4 ? 4 : 2;
#else
  return R <= 2 ? 4 : (R <= 4 ? 2 : 1);
#endif
}

// Weight (n0 + j, k) of the tile starting at channel n0 is chunk(q, K, n0, k)[j * CHUNK + k % CHUNK].
template <typename Wt>
inline const Wt* chunk(const Wt* q, int64_t K, int64_t n0, int64_t k) {
  return q + n0 * K + (k / CHUNK) * CHUNK * TILE_N;
}

// The lines of the next PREFETCH_BYTES x sizeof(Wt) of the tile's stream, prefetched into L2: called every 64 inputs,
// when the tile has consumed 256 x sizeof(Wt) bytes (an fp32 tile streams 4x the bytes of an int8 one).
template <typename Wt>
inline void prefetch_ahead(const Wt* p) {
  const char* c = reinterpret_cast<const char*>(p) + PREFETCH_BYTES * sizeof(Wt);
  for (size_t l = 0; l < 2 * sizeof(Wt); ++l) _mm_prefetch(c + 64 * l, _MM_HINT_T2);
}

// 16 (AVX-512) or 8 (AVX2) weights of a tile as fp32.
#if defined(__AVX512F__)
inline __m512 load_w16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline __m512 load_w16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w16(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the upper half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 load_w8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

// ---------------------------------------------------------------------------------------------------
// int8 or fp32 weights, fp32 activations: out[r][j0 + j] = sum_k x[r, k] * q[n0 + j0 + j, k] for R rows and J
// channels of the tile starting at channel n0.
template <int R, int J, typename Wt>
inline void weight_tile(const float* x, int64_t K, const Wt* q, int64_t n0, int j0, float (*out)[TILE_N]) {
#if defined(__AVX512F__)
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const Wt* c = chunk(q, K, n0, k) + j0 * CHUNK + k % CHUNK;
    if ((k & 63) == 0 && j0 == 0) prefetch_ahead(c);
    __m512 w[J];
    for (int j = 0; j < J; ++j) w[j] = load_w16(c + j * CHUNK);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(w[j], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) out[r][j0 + j] = _mm512_reduce_add_ps(acc[r][j]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const Wt* c = chunk(q, K, n0, k) + j0 * CHUNK + k % CHUNK;
    if ((k & 63) == 0 && j0 == 0) prefetch_ahead(c);
    __m256 w[J];
    for (int j = 0; j < J; ++j) w[j] = load_w8(c + j * CHUNK);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(w[j], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][j]), _mm256_extractf128_ps(acc[r][j], 1));
      s = _mm_hadd_ps(s, s);
      s = _mm_hadd_ps(s, s);
      out[r][j0 + j] = _mm_cvtss_f32(s);
    }
#else
  for (int r = 0; r < R; ++r)
    for (int j = j0; j < j0 + J; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * static_cast<float>(chunk(q, K, n0, k)[j * CHUNK + k % CHUNK]);
      out[r][j] = s;
    }
#endif
}

// What the driver calls: out[r][j0 + j] = x[r0 + r] . W[n0 + j0 + j] for R rows and J channels of the tile at
// n0, the scale applied (int8; fp32 weights have none).
template <typename Wt>
struct WeightTile {
  const Wt* q;
  const float* scale;  // nullptr: none
  const float* x;      // (M, K) fp32
  template <int R, int J>
  void compute(int64_t K, int64_t n0, int j0, int64_t r0, float (*out)[TILE_N]) const {
    weight_tile<R, J>(x + r0 * K, K, q, n0, j0, out);
    if (scale != nullptr)
      for (int r = 0; r < R; ++r)
        for (int j = j0; j < j0 + J; ++j) out[r][j] *= scale[n0 + j];
  }
};

#if defined(__AVX512BF16__)
// The same product by bf16 dot products (AVX512-BF16) for bf16 activations: q in [-127, 127] is exact in bf16,
// so every product q * x is exact in fp32 and vdpbf16ps sums pairs of them in fp32 -- the fp32 tile's result up
// to summation order, with half its multiply instructions per extra row of x (speculative verify passes, small
// batches). Used for every row count, so a row's result never depends on how many rows came with it.
struct Int8Bf16Tile {
  const int8_t* q;
  const float* scale;
  const c10::BFloat16* x;  // (M, K) bf16
  template <int R, int J>
  void compute(int64_t K, int64_t n0, int j0, int64_t r0, float (*out)[TILE_N]) const {
    __m512 acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += CHUNK) {
      const int8_t* c = chunk(q, K, n0, k) + j0 * CHUNK;
      if ((k & 63) == 0 && j0 == 0) prefetch_ahead(c);
      __m512bh w[J];
      for (int j = 0; j < J; ++j) {
        const int8_t* p = c + j * CHUNK;
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
        w[j] = _mm512_cvtne2ps_pbh(hi, lo);  // weights k .. k + 31 in order, exact
      }
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + (r0 + r) * K + k));
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[j], xv);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) out[r][j0 + j] = _mm512_reduce_add_ps(acc[r][j]) * scale[n0 + j0 + j];
  }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---------------------------------------------------------------------------------------------------
// int8 by integer dot products (AVX512-VNNI): vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds
// each four products into a 32-bit lane -- 64 multiply-adds per instruction against vdpbf16ps's 32, and the
// weights need no conversion at all. The activations are quantised on the fly, per row and group of VNNI_GROUP
// inputs: xq = round(x / s), s = absmax / 127 (llama.cpp quantises them likewise, per 32, for its Q8_0 and Q4
// dot products; SmolLM2's perplexity moved by <= 0.01 nats, docs/hub.md). The weights are stored biased,
// u = q + 128 in [1, 255] (vpdpbusd's unsigned operand), so per group
//   sum_k q x = s * (sum_k u xq - 128 sum_k xq),
// the correction an integer per row and group that starts the group's int32 chain. Layout (models/quant.py:
// int8_vnni_layout): channels in tiles of 16, inputs in fours, u[n / 16][k / 4][n % 16][k % 4] -- one 64-byte
// load is 16 channels x 4 inputs, a tile one contiguous stream of 16 K bytes. One thread of an AMD EPYC (Zen 4),
// SmolLM2's matrices (bench/int8_rows.py): the bf16 tiles' speed at one row (both stream ~17 GB/s), 1.3x at 4
// rows, 1.7x at 16, 1.9x at 64-170, where it also beats the bf16 GEMM of the dequantised weight.
constexpr int64_t VNNI_TILE = 16;
constexpr int64_t VNNI_GROUP = 64;

// One row of x quantised: xq (K) int8, and per group its scale s and -128 * sum(xq).
inline void quantize_row(const float* x, const c10::BFloat16* xb, int64_t K, int8_t* xq, float* s, int32_t* corr) {
  for (int64_t g = 0; g < K / VNNI_GROUP; ++g) {
    __m512 v[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t o = g * VNNI_GROUP + 16 * i;
      v[i] = xb != nullptr ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(xb + o))), 16))
                           : _mm512_loadu_ps(x + o);
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                                                          _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3]))));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i c = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      const __m512i t = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));  // round to nearest even
      c = _mm512_add_epi32(c, t);
      _mm_storeu_si128((__m128i*)(xq + g * VNNI_GROUP + 16 * i), _mm512_cvtepi32_epi8(t));
    }
    s[g] = amax / 127.f;
    corr[g] = -128 * _mm512_reduce_add_epi32(c);
  }
}

// R rows against one tile of 16 channels, group by group; C int32 chains per row hide vpdpbusd's latency when
// few rows give few independent sums. Every row has its own chains, so its result does not depend on R.
template <int R>
inline void vnni_tile(const uint8_t* p, int64_t K, const int8_t* const* xq, const float* const* s,
                      const int32_t* const* corr, const float* scale, float* const* out) {
  constexpr int C = R == 1 ? 4 : (R == 2 ? 2 : 1);
  constexpr int64_t QUADS = VNNI_GROUP / 4;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / VNNI_GROUP; ++g) {
    __m512i it[R][C];
    for (int r = 0; r < R; ++r) {
      it[r][0] = _mm512_set1_epi32(corr[r][g]);
      for (int c = 1; c < C; ++c) it[r][c] = _mm512_setzero_si512();
    }
    const int64_t k0 = g * VNNI_GROUP;
    for (int64_t qd = 0; qd < QUADS; qd += C)
      for (int c = 0; c < C; ++c) {
        const uint8_t* pc = p + (k0 / 4 + qd + c) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(pc) + PREFETCH_BYTES, _MM_HINT_T2);
        const __m512i w = _mm512_loadu_si512(pc);
        for (int r = 0; r < R; ++r) {
          const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq[r] + k0 + 4 * (qd + c)));
          it[r][c] = _mm512_dpbusd_epi32(it[r][c], w, xb);
        }
      }
    for (int r = 0; r < R; ++r) {
      __m512i t = it[r][0];
      for (int c = 1; c < C; ++c) t = _mm512_add_epi32(t, it[r][c]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(s[r][g]), acc[r]);
    }
  }
  const __m512 sc = _mm512_loadu_ps(scale);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], _mm512_mul_ps(acc[r], sc));
}

// vnni_tile for a run-time row count R (1 .. MAX_ROWS).
inline void vnni_rows(int R, const uint8_t* p, int64_t K, const int8_t* const* xq, const float* const* s,
                      const int32_t* const* corr, const float* scale, float* const* out) {
  switch (R) {
    case 1: vnni_tile<1>(p, K, xq, s, corr, scale, out); break;
    case 2: vnni_tile<2>(p, K, xq, s, corr, scale, out); break;
    case 3: vnni_tile<3>(p, K, xq, s, corr, scale, out); break;
    case 4: vnni_tile<4>(p, K, xq, s, corr, scale, out); break;
    case 5: vnni_tile<5>(p, K, xq, s, corr, scale, out); break;
    case 6: vnni_tile<6>(p, K, xq, s, corr, scale, out); break;
    case 7: vnni_tile<7>(p, K, xq, s, corr, scale, out); break;
    default: vnni_tile<8>(p, K, xq, s, corr, scale, out); break;
  }
}

// y (M, N) = x W^T for u (N, K) uint8 in the layout above: x quantised once per call, then every tile against all
// rows, MAX_ROWS at a time, tiles spread over threads.
at::Tensor int8_vnni_linear(const at::Tensor& x_in, const at::Tensor& u, const at::Tensor& scale, at::Tensor& y) {
  const int64_t N = u.size(0), K = u.size(1), M = x_in.size(0), G = K / VNNI_GROUP;
  const at::Tensor x = x_in.contiguous();
  // the quantised rows: buffers kept by the calling thread between calls (the workers below see them through
  // these pointers: a thread_local named inside a worker would be the worker's own)
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> xs_buf;
  thread_local std::vector<int32_t> xc_buf;
  xq_buf.resize(M * K), xs_buf.resize(M * G), xc_buf.resize(M * G);
  int8_t* const xq = xq_buf.data();
  float* const xs = xs_buf.data();
  int32_t* const xc = xc_buf.data();
  const bool bf = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, M, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(bf ? nullptr : x.data_ptr<float>() + r * K, bf ? x.data_ptr<c10::BFloat16>() + r * K : nullptr, K,
                   xq + r * K, xs + r * G, xc + r * G);
  });
  const uint8_t* up = u.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  auto rows = [&](auto* yp) {
    at::parallel_for(0, N / VNNI_TILE, 4, [&](int64_t t0, int64_t t1) {
      float out[MAX_ROWS][VNNI_TILE];
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* p = up + t * VNNI_TILE * K;
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
          const int R = static_cast<int>(std::min<int64_t>(MAX_ROWS, M - r0));
          const int8_t* xr[MAX_ROWS];
          const float* sr[MAX_ROWS];
          const int32_t* cr[MAX_ROWS];
          float* o[MAX_ROWS];
          for (int r = 0; r < R; ++r)
            xr[r] = xq + (r0 + r) * K, sr[r] = xs + (r0 + r) * G, cr[r] = xc + (r0 + r) * G,
            o[r] = out[r];
          vnni_rows(R, p, K, xr, sr, cr, sp + t * VNNI_TILE, o);
          for (int r = 0; r < R; ++r)
            for (int64_t c = 0; c < VNNI_TILE; ++c)
              yp[(r0 + r) * N + t * VNNI_TILE + c] = static_cast<std::remove_pointer_t<decltype(yp)>>(out[r][c]);
        }
      }
    });
  };
  if (y.scalar_type() == at::kFloat)
    rows(y.data_ptr<float>());
  else
    rows(y.data_ptr<c10::BFloat16>());
  return y;
}
#endif

// ---------------------------------------------------------------------------------------------------
// Driver: every tile of channels against all M rows of x, MAX_ROWS rows at a time and J channels of the tile per
// pass (the rest of the tile, and the tile for the next rows, follow from L1), tiles spread over threads: each
// weight comes from memory once whatever M is. Outputs are written in y's dtype (O: fp32 or bf16) straight from
// the fp32 sums.
template <int R, typename O, typename Tile>
inline void tile_rows(int64_t K, int64_t N, int64_t b, int64_t r0, O* y, const Tile& tile) {
  float out[R][TILE_N];
  constexpr int J = channels_per_pass<R>();
  for (int j0 = 0; j0 < TILE_N; j0 += J) tile.template compute<R, J>(K, b * TILE_N, j0, r0, out);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < TILE_N; ++j) y[(r0 + r) * N + b * TILE_N + j] = static_cast<O>(out[r][j]);
}

template <typename Tile>
void run(int64_t M, int64_t K, int64_t N, at::Tensor& y, const Tile& tile) {
  auto rows = [&](auto* yp) {
    at::parallel_for(0, N / TILE_N, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
          switch (std::min<int64_t>(M - r0, MAX_ROWS)) {
            case 1: tile_rows<1>(K, N, b, r0, yp, tile); break;
            case 2: tile_rows<2>(K, N, b, r0, yp, tile); break;
            case 3: tile_rows<3>(K, N, b, r0, yp, tile); break;
            case 4: tile_rows<4>(K, N, b, r0, yp, tile); break;
            case 5: tile_rows<5>(K, N, b, r0, yp, tile); break;
            case 6: tile_rows<6>(K, N, b, r0, yp, tile); break;
            case 7: tile_rows<7>(K, N, b, r0, yp, tile); break;
            default: tile_rows<8>(K, N, b, r0, yp, tile); break;
          }
        }
    });
  };
  if (y.scalar_type() == at::kFloat)
    rows(y.data_ptr<float>());
  else
    rows(y.data_ptr<c10::BFloat16>());
}

at::Tensor as_float(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous(); }

void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x must be fp32 or bf16");
}

// y in x's dtype, or out_dtype (fp32 logits from bf16 activations: the sums are fp32 anyway).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       std::optional<at::ScalarType> out_dtype) {
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "int8_linear: scale must be (N,) fp32");
  if (q.scalar_type() == at::kByte) {  // the VNNI layout (int8_vnni())
    TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && N % 16 == 0 && K % 64 == 0,
                "int8_linear: a uint8 q must be (N, K) in the VNNI layout, N a multiple of 16 and K of 64");
    check_x(x, K, "int8_linear");
    at::Tensor y = at::empty({M, N}, x.options().dtype(out_dtype.value_or(x.scalar_type())));
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return int8_vnni_linear(x, q, scale, y);
#else
    TORCH_CHECK(false, "int8_linear: this build has no AVX512-VNNI body for the uint8 layout");
#endif
  }
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "int8_linear: q must be (N, K) int8");
  TORCH_CHECK(N % TILE_N == 0 && K % CHUNK == 0, "int8_linear: N must be a multiple of ", TILE_N, " and K of ", CHUNK,
              " (the tiled layout)");
  check_x(x, K, "int8_linear");
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_dtype.value_or(x.scalar_type())));
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) {
    const at::Tensor xb = x.contiguous();
    run(M, K, N, y, Int8Bf16Tile{q.data_ptr<int8_t>(), scale.data_ptr<float>(), xb.data_ptr<c10::BFloat16>()});
    return y;
  }
#endif
  at::Tensor xf = as_float(x);
  run(M, K, N, y, WeightTile<int8_t>{q.data_ptr<int8_t>(), scale.data_ptr<float>(), xf.data_ptr<float>()});
  return y;
}

// y (M, N) = x (M, K) W^T with W fp32 or bf16 in the same tiled layout (models/quant.py's fp32 and bf16 layouts
// with lmforge's kernels): the int8 kernel's loop with the weights' own conversion, so 1-8 rows stream them once.
// Sums in fp32; y in x's dtype.
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& w, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && w.is_contiguous(),
              "tiled_linear: w must be (N, K) fp32 or bf16");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  TORCH_CHECK(N % TILE_N == 0 && K % CHUNK == 0, "tiled_linear: N must be a multiple of ", TILE_N, " and K of ", CHUNK,
              " (the tiled layout)");
  check_x(x, K, "tiled_linear");
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_dtype.value_or(x.scalar_type())));
  const at::Tensor xf = as_float(x);
  if (w.scalar_type() == at::kFloat)
    run(M, K, N, y, WeightTile<float>{w.data_ptr<float>(), nullptr, xf.data_ptr<float>()});
  else
    run(M, K, N, y, WeightTile<c10::BFloat16>{w.data_ptr<c10::BFloat16>(), nullptr, xf.data_ptr<float>()});
  return y;
}

// s[j] = scale * sum(part(j)) for the n keys, part(j) a vector of partial sums of key j's dot product: 16 keys at a
// time reduced together (hsum_rows) rather than one horizontal sum per key.
template <typename Part>
inline void key_scores(float* s, int64_t n, float scale, Part part) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vf parts[W];
    for (int u = 0; u < W; ++u) parts[u] = part(j + u);
    store(s + j, hsum_rows(parts) * scale);
  }
  for (; j < n; ++j) s[j] = hsum(part(j)) * scale;
}

// A row of n scores -> exp(s - max(s)) in place (the unnormalised softmax); returns their sum.
inline float softmax_row(float* s, int64_t n) {
  int64_t j = 0;
  vf m = splat(-INFINITY);
  for (; j + W <= n; j += W) m = m > load(s + j) ? m : load(s + j);
  float mx = hmax(m);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  vf sum = splat(0.f);
  for (j = 0; j + W <= n; j += W) {
    const vf e = vexp(load(s + j) - mx);
    store(s + j, e);
    sum += e;
  }
  float total = hsum(sum);
  for (; j < n; ++j) total += (s[j] = std::exp(s[j] - mx));
  return total;
}

// attend_one's scores and weighted values for one group of G query heads (qf: G x D fp32, rotated) over n cached
// positions of K, V, in fp32: acc (G x D) gets sum_j P[j] V[j], total (G) the sums of the unnormalised P. With D a
// multiple of 16 (vec.h's vectors), the scores of 16 keys at a time (key_scores) and each value row read once for
// all G heads.
template <typename T>
void attend_generic(const float* qf, const T* K, const T* V, int64_t n, int64_t D, int64_t G, int64_t L, float scale,
                    float* score, float* acc, float* total) {
  const bool vec = D % W == 0 && D <= 16 * W;
  auto dot = [&](const float* q, const T* k) {  // partial sums of q . k, D a multiple of W
    vf a = load(q) * load_as_float(k);
    for (int64_t d = W; d < D; d += W) a += load(q + d) * load_as_float(k + d);
    return a;
  };
  for (int64_t h = 0; h < G; ++h) {
    const float* q = qf + h * D;
    float* s = score + h * L;
    if (vec) {
      key_scores(s, n, scale, [&](int64_t j) { return dot(q, K + j * D); });
    } else {
      for (int64_t j = 0; j < n; ++j) {
        float d = 0.f;
        for (int64_t i = 0; i < D; ++i) d += q[i] * static_cast<float>(K[j * D + i]);
        s[j] = d * scale;
      }
    }
    total[h] = softmax_row(s, n);
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const T* v = V + j * D;
    if (vec) {
      vf vv[16];
      for (int64_t c = 0; c < D / W; ++c) vv[c] = load_as_float(v + c * W);
      for (int64_t h = 0; h < G; ++h) {
        const vf pj = splat(score[h * L + j]);
        float* ah = acc + h * D;
        for (int64_t c = 0; c < D / W; ++c) store(ah + c * W, load(ah + c * W) + pj * vv[c]);
      }
    } else {
      for (int64_t h = 0; h < G; ++h)
        for (int64_t i = 0; i < D; ++i) acc[h * D + i] += score[h * L + j] * static_cast<float>(v[i]);
    }
  }
}

#if defined(__AVX512BF16__)
// attend_one's scores and weighted values for one group of G query heads (qf: G x D fp32, rotated) over n cached
// positions of K, V (bf16, D a multiple of 32) with vdpbf16ps: q rounded to bf16 for Q K^T (16 keys at a time,
// their partial sums reduced together), the softmax in fp32, P rounded to bf16 for P V over pairs of keys (the
// two value rows interleaved, each pair read once for all G heads). acc (G x D) gets sum_j P[j] V[j] and total (G)
// the fp32 sums of the unrounded P.
inline uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(c10::BFloat16(lo).x) | static_cast<uint32_t>(c10::BFloat16(hi).x) << 16;
}

void attend_bf16(const float* qf, const c10::BFloat16* K, const c10::BFloat16* V, int64_t n, int64_t D, int64_t G,
                 int64_t L, float scale, float* score, std::vector<uint32_t>& qb, std::vector<uint32_t>& pb,
                 float* acc, float* total) {
  const int64_t C = D / 32;  // 32-value chunks of a row
  // (qf[2 i], qf[2 i + 1]) as a pair of bf16 is qf rounded to bf16 in memory order: 16 values per vcvtneps2bf16
  // (round to nearest even, as c10::BFloat16)
  for (int64_t i = 0; i < G * D; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb.data()) + i / 16, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(qf + i)));
  auto dot = [&](const uint32_t* q, const c10::BFloat16* k) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(k + 32 * c), (__m512bh)_mm512_loadu_si512(q + 16 * c));
    return reinterpret_cast<const vf&>(a);
  };
  const int64_t np = (n + 1) / 2;  // key pairs
  for (int64_t h = 0; h < G; ++h) {
    const uint32_t* q = qb.data() + h * D / 2;
    float* s = score + h * L;
    key_scores(s, n, scale, [&](int64_t j) { return dot(q, K + j * D); });
    total[h] = softmax_row(s, n);
    uint32_t* ph = pb.data() + h * np;
    // 16 pairs (32 scores) per vcvtne2ps2bf16, in memory order as bf16_pair packs them; the scalar tail pads an odd
    // last key with 0
    int64_t i = 0;
    for (; 2 * i + 32 <= n; i += 16)
      _mm512_storeu_si512(ph + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 2 * i + 16), _mm512_loadu_ps(s + 2 * i)));
    for (; i < np; ++i) ph[i] = bf16_pair(s[2 * i], 2 * i + 1 < n ? s[2 * i + 1] : 0.f);
  }
  // P V: per pair of keys and 32-value chunk, unpack interleaves the two rows into the (value, pair) words that
  // vdpbf16ps takes; lane l of the low half holds values 8 l .. 8 l + 3, of the high half 8 l + 4 .. 8 l + 7
  __m512 lo[4][8], hi[4][8];  // [head][chunk], G <= 4 and C <= 8 here
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < C; ++c) lo[h][c] = hi[h][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < np; ++i) {
    const c10::BFloat16* v0 = V + 2 * i * D;
    const c10::BFloat16* v1 = 2 * i + 1 < n ? v0 + D : v0;  // an odd last key pairs with itself, weight 0
    for (int64_t c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + 32 * c), bb = _mm512_loadu_si512(v1 + 32 * c);
      const __m512bh wl = (__m512bh)_mm512_unpacklo_epi16(a, bb), wh = (__m512bh)_mm512_unpackhi_epi16(a, bb);
      for (int64_t h = 0; h < G; ++h) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[h * np + i]));
        lo[h][c] = _mm512_dpbf16_ps(lo[h][c], wl, pp);
        hi[h][c] = _mm512_dpbf16_ps(hi[h][c], wh, pp);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t h = 0; h < G; ++h)
    for (int64_t c = 0; c < C; ++c) {
      _mm512_storeu_ps(acc + h * D + 32 * c, _mm512_permutex2var_ps(lo[h][c], first, hi[h][c]));
      _mm512_storeu_ps(acc + h * D + 32 * c + 16, _mm512_permutex2var_ps(lo[h][c], second, hi[h][c]));
    }
}
#endif

// ---------------------------------------------------------------------------------------------------
// One decoding step's attention for one new token per row, everything between the QKV and output projections
// in one call (eager PyTorch spends ~10 small ops on it, each costing more to dispatch than to compute):
//   q, k, v = split(qkv);  q, k = rope(q), rope(k) (when cos/sin are given);  cache[b, :, p_b] = k, v
//   y[h] = softmax(q[h] . K[g]^T / sqrt(D)) V[g]  over positions 0..p_b, g = h / (H / H_kv)
// with p_b = pos (+ row_pos[b] when given: continuous batching, every row at its own length).
// RoPE rotates pairs (x_i, x_{i+D/2}): x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; cos/sin
// hold row b's angles in row b (a row stride of 0 shares one row). Sums in fp32; keys/values are stored in
// the cache's dtype, as the eager path stores them.
// The scores and weighted values: attend_bf16 (bf16 cache, AVX512-BF16) or attend_generic. One thread of an AMD
// EPYC, SmolLM2's shape (9 heads over 3, D = 64, bf16 cache), a call at 64 / 250 / 500 positions: 10 / 20 / 32 us
// (the fp32 per-key version before them: 11 / 30 / 57).
//
// Tn new tokens per row (a verify pass, a prompt: decode_stack) go through one call: qkv and y hold (B, Tn) rows,
// token t of row b at position p_b + t, its RoPE angles at cos + b rope_stride + t t_stride. Each task (a row and
// a key/value head) writes its tokens' keys and values, then each (row, head, token) attends over positions
// 0 .. p_b + t exactly as a one-token call would, so the results are those of Tn calls, bit for bit, without Tn
// calls' dispatch, allocations and thread hand-offs.
// One call's attention, task by task: write(b, g, tok) puts token tok of row b's key (rotated) and value for key/value
// head g into the cache; attend(b, g, tok) computes that token's G query heads over positions 0 .. p. Used by
// attend_one_impl (ATen threads) and decode_stack_fused (its own parallel region): the same arithmetic either way.
template <typename T>
struct Attention {
  const T* in;  // qkv rows (B, Tn, (H + 2 Hkv) D)
  T *kp, *vp, *out;
  int64_t pos;
  const int64_t* row_pos;
  const T *cos, *sin;
  int64_t rope_stride, t_stride, B, Tn, H, Hkv, L, D;

  int64_t G() const { return H / Hkv; }
  int64_t width() const { return (H + 2 * Hkv) * D; }
  int64_t position(int64_t b, int64_t tok) const { return pos + tok + (row_pos != nullptr ? row_pos[b] : 0); }

  // per-thread buffers of attend()
  struct Scratch {
    std::vector<float> qf, kf, score, acc, total;
    std::vector<uint32_t> qb, pb;  // bf16 pairs: rounded q, rounded P
    explicit Scratch(const Attention& a)
        : qf(a.G() * a.D), kf(a.D), score(a.G() * a.L), acc(a.G() * a.D), total(a.G()), qb(a.G() * a.D / 2),
          pb(a.G() * (a.L / 2 + 1)) {}
  };

  void rope(const T* x, float* r, int64_t b, int64_t t) const {
    for (int64_t i = 0; i < D; ++i) r[i] = static_cast<float>(x[i]);
    if (cos == nullptr) return;
    const T* c = cos + b * rope_stride + t * t_stride;
    const T* s = sin + b * rope_stride + t * t_stride;
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = r[i], x2 = r[i + half];
      r[i] = x1 * static_cast<float>(c[i]) - x2 * static_cast<float>(s[i]);
      r[i + half] = x2 * static_cast<float>(c[i + half]) + x1 * static_cast<float>(s[i + half]);
    }
  }

  void write(int64_t b, int64_t g, int64_t tok, float* kf) const {
    const int64_t p = position(b, tok);
    const T* row = in + (b * Tn + tok) * width();
    T* K = kp + (b * Hkv + g) * L * D;
    T* V = vp + (b * Hkv + g) * L * D;
    rope(row + (H + g) * D, kf, b, tok);
    for (int64_t i = 0; i < D; ++i) {
      K[p * D + i] = static_cast<T>(kf[i]);
      V[p * D + i] = row[(H + Hkv + g) * D + i];
    }
  }

  void attend(int64_t b, int64_t g, int64_t tok, Scratch& w) const {
    const int64_t Gq = G(), n = position(b, tok) + 1;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const T* row = in + (b * Tn + tok) * width();
    const T* K = kp + (b * Hkv + g) * L * D;
    const T* V = vp + (b * Hkv + g) * L * D;
    for (int64_t h = 0; h < Gq; ++h) rope(row + (g * Gq + h) * D, w.qf.data() + h * D, b, tok);
    bool done = false;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (D % 32 == 0 && D <= 256 && Gq <= 4) {  // bf16 dot products, as PyTorch's bf16 attention does
        attend_bf16(w.qf.data(), K, V, n, D, Gq, L, scale, w.score.data(), w.qb, w.pb, w.acc.data(), w.total.data());
        done = true;
      }
    }
#endif
    if (!done) attend_generic(w.qf.data(), K, V, n, D, Gq, L, scale, w.score.data(), w.acc.data(), w.total.data());
    for (int64_t h = 0; h < Gq; ++h) {
      T* o = out + (b * Tn + tok) * H * D + (g * Gq + h) * D;
      int64_t i = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>)  // the same division, rounded to nearest even
        for (; i + 16 <= D; i += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), (__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(
                                  _mm512_loadu_ps(w.acc.data() + h * D + i), _mm512_set1_ps(w.total[h]))));
#endif
      for (; i < D; ++i) o[i] = static_cast<T>(w.acc[h * D + i] / w.total[h]);
    }
  }
};

template <typename T>
void attend_one_impl(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc, int64_t pos, const int64_t* row_pos,
                     const T* cos, const T* sin, int64_t rope_stride, int64_t H, int64_t Hkv, at::Tensor& y,
                     int64_t Tn = 1, int64_t t_stride = 0) {
  const Attention<T> a{qkv.data_ptr<T>(), kc.data_ptr<T>(), vc.data_ptr<T>(), y.data_ptr<T>(), pos, row_pos, cos, sin,
                       rope_stride, t_stride, kc.size(0), Tn, H, Hkv, kc.size(2), kc.size(3)};
  const int64_t B = a.B;
  // Several tokens: every key and value first, then one task per (row, key/value head, token) -- token t reads
  // positions 0 .. p + t only, so it sees what it would after its own write, and a verify pass of 8 tokens spreads
  // over the threads as 24 tasks rather than SmolLM2's 3 key/value heads. One token: one task per (row, head).
  const bool split = Tn > 1;
  if (split)
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> kf(a.D);
      for (int64_t task = t0; task < t1; ++task)
        for (int64_t tok = 0; tok < Tn; ++tok) a.write(task / Hkv, task % Hkv, tok, kf.data());
    });
  at::parallel_for(0, B * Hkv * Tn, 1, [&](int64_t t0, int64_t t1) {
    typename Attention<T>::Scratch w(a);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (Hkv * Tn), g = task / Tn % Hkv, tok = task % Tn;
      if (!split) a.write(b, g, tok, w.kf.data());
      a.attend(b, g, tok, w);
    }
  });
}


// The checks of an attention call's positions and RoPE angles (attend_tokens and decode_stack_fused): row b's
// positions pos + row_pos[b] .. + T - 1 inside the cache of L; cos/sin (T, D) shared by the rows or (B, ..., T, D)
// one per row, rows of D contiguous values in the activations' dtype. sb, st: their row and token strides.
struct AttendArgs {
  at::Tensor rows;  // row_pos as int64 (kept alive for rp)
  const int64_t* rp = nullptr;
  int64_t sb = 0, st = 0;
  AttendArgs(int64_t B, int64_t T, int64_t L, int64_t D, at::ScalarType dtype, int64_t pos,
             const std::optional<at::Tensor>& row_pos, const std::optional<at::Tensor>& cos,
             const std::optional<at::Tensor>& sin) {
    if (row_pos.has_value()) {
      rows = row_pos->to(at::kLong).contiguous();
      TORCH_CHECK(rows.numel() == B, "attend: row_pos must hold one position per row");
      rp = rows.data_ptr<int64_t>();
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = pos + (rp != nullptr ? rp[b] : 0);
      TORCH_CHECK(0 <= p && p + T <= L, "attend: positions ", p, "..", p + T - 1, " outside the cache (", L, ")");
    }
    if (cos.has_value()) {
      TORCH_CHECK(sin.has_value() && cos->sizes() == sin->sizes() && cos->strides() == sin->strides() &&
                      cos->size(-1) == D && cos->stride(-1) == 1 && cos->size(-2) == T && cos->scalar_type() == dtype,
                  "attend: cos/sin (T, D) or (B, ..., T, D) rows of D contiguous values in qkv's dtype");
      st = cos->stride(-2);
      sb = cos->dim() >= 3 && cos->size(0) == B ? cos->stride(0) : 0;
    }
  }
};

// attend_one for T new tokens per row in one call (decode_stack: a step, a verify pass, a prompt): qkv (B, T, W),
// token t of row b at position pos + t (+ row_pos[b]); cos/sin (T, D) shared by the rows or (B, ..., T, D) per row,
// in qkv's dtype. The same per-token arithmetic as T calls of attend_one (attend_one_impl), so the same bits.
at::Tensor attend_tokens(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc, int64_t pos,
                         const std::optional<at::Tensor>& row_pos, const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin, int64_t n_head, int64_t n_kv_head) {
  TORCH_CHECK(qkv.dim() == 3 && kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(1) == n_kv_head &&
                  n_head % n_kv_head == 0, "attend: qkv (B, T, (H + 2 H_kv) D), caches (B, H_kv, L, D)");
  const int64_t B = qkv.size(0), T = qkv.size(1), L = kc.size(2), D = kc.size(3);
  TORCH_CHECK(qkv.is_contiguous() && kc.is_contiguous() && vc.is_contiguous() && kc.size(0) == B &&
                  qkv.size(2) == (n_head + 2 * n_kv_head) * D && qkv.scalar_type() == kc.scalar_type(),
              "attend: qkv (B, T, (H + 2 H_kv) D) and contiguous caches in its dtype");
  const AttendArgs args(B, T, L, D, qkv.scalar_type(), pos, row_pos, cos, sin);
  const int64_t* rp = args.rp;
  const int64_t sb = args.sb, st = args.st;
  at::Tensor y = at::empty({B, T, n_head * D}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    attend_one_impl<float>(qkv, kc, vc, pos, rp, cos.has_value() ? cos->data_ptr<float>() : nullptr,
                           cos.has_value() ? sin->data_ptr<float>() : nullptr, sb, n_head, n_kv_head, y, T, st);
  } else {
    using B16 = c10::BFloat16;
    TORCH_CHECK(qkv.scalar_type() == at::kBFloat16, "attend: fp32 or bf16 only");
    attend_one_impl<B16>(qkv, kc, vc, pos, rp, cos.has_value() ? cos->data_ptr<B16>() : nullptr,
                         cos.has_value() ? sin->data_ptr<B16>() : nullptr, sb, n_head, n_kv_head, y, T, st);
  }
  return y;
}

// The ops. attend_rows: attend_tokens for Block._step (models without decode_stack, e.g. LoRA-wrapped ones),
// qkv (B, T, W). attend_one: one token per row, qkv (B, W), cos/sin (D,), (1, D) shared or (B, D) one row each.
at::Tensor attend_rows(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, int64_t pos,
                       const std::optional<at::Tensor>& row_pos, const std::optional<at::Tensor>& cos,
                       const std::optional<at::Tensor>& sin, int64_t n_head, int64_t n_kv_head) {
  return attend_tokens(qkv.contiguous(), k_cache, v_cache, pos, row_pos, cos, sin, n_head, n_kv_head);
}

at::Tensor attend_one(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, int64_t pos,
                      const std::optional<at::Tensor>& row_pos, const std::optional<at::Tensor>& cos,
                      const std::optional<at::Tensor>& sin, int64_t n_head, int64_t n_kv_head) {
  TORCH_CHECK(qkv.dim() == 2, "attend_one: qkv must be (B, (H + 2 H_kv) D)");
  const int64_t B = qkv.size(0);
  auto one = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {  // as (..., T = 1, D)
    if (!t.has_value()) return t;
    TORCH_CHECK(t->dim() == 1 || (t->dim() == 2 && (t->size(0) == B || t->size(0) == 1)),
                "attend_one: cos/sin must be (D,), (1, D) or (B, D)");
    return t->dim() == 2 && t->size(0) > 1 ? t->unsqueeze(-2) : t->reshape({1, -1});
  };
  return attend_tokens(qkv.contiguous().view({B, 1, -1}), k_cache, v_cache, pos, row_pos, one(cos), one(sin),
                       n_head, n_kv_head).view({B, -1});
}

// y = x / sqrt(mean(x^2) + eps) * w over the last dimension, fp32 sums, in x's dtype (one op instead of the
// composite's six).
template <typename T>
float rms_inv(const T* x, int64_t n, double eps) {  // 1 / sqrt(mean(x^2) + eps), summed in order
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  return 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
}

template <typename T>
void rms_scale(const T* x, const T* w, T* y, float inv, int64_t i0, int64_t i1) {  // y[i0:i1] of one row
  for (int64_t i = i0; i < i1; ++i) y[i] = static_cast<T>(static_cast<float>(x[i]) * inv * static_cast<float>(w[i]));
}

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t n, double eps) {
  for (int64_t r = 0; r < rows; ++r) rms_scale(x + r * n, w, y + r * n, rms_inv(x + r * n, n, eps), 0, n);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = w.numel();
  TORCH_CHECK(x.is_contiguous() && x.size(-1) == n && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm: x (..., n) and w (n,) contiguous, one dtype");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.numel() / n, n, eps);
  else if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                  x.numel() / n, n, eps);
  else
    TORCH_CHECK(false, "rms_norm: fp32 or bf16 only");
  return y;
}

// ---------------------------------------------------------------------------------------------------
// A decoding step (or a speculative verify pass) through a whole stack of pre-norm blocks in one call: at batch 1
// a token of a 135M model spends ~3 ms of ~11 in Python and the dispatcher between ~25 small calls per block
// (models/layers.py, Block._step); here the same calls, in the same order on the same tensors, run from C++, so
// the results are Block._step's bit for bit. Per block l (params[16 l ..], spec[10 l ..]):
//   x = x + proj(attend(qkv(norm(x, ln_1))))      attend: attend_one per new token (RoPE, cache write)
//   x = x + down(act(fc(norm(x, ln_2))))
// params: ln_1 (weight, bias), ln_2 (weight, bias), then (t1, t2, bias) for each of qkv, proj, fc, down;
// spec: norm kind, MLP kind, then (kind, group) for each of the four linears. The kinds are models/gpt.py's
// STACK_NORMS (0 lmforge's rms_norm, bias unused; 1 at::layer_norm with an optional bias, as F.layer_norm),
// STACK_MLPS (0 SwiGLU by silu_mul on [gate | up]; 1 exact GELU; 2 GPT-2's tanh GELU; 3 relu(u)^2, as
// MLP.act) and STACK_KINDS for a linear: 0 F.linear(x, t1) (nn.Linear, a bf16 QuantLinear), 1 x @ t1 (fp32
// QuantLinear, t1 = W^T), 2 lmforge's int8 (t1 = tiled q, t2 = scale), 3 PyTorch's int8, 4 lmforge's int4
// (t1 = packed, t2 = [d, m]), 5 PyTorch's int4 (t2 = scales/zeros), 6 lmforge's fp32 or bf16 (t1 = W in int8's
// tiles).
enum StackKind : int64_t {
  LINEAR = 0, FP32_T = 1, INT8_OWN = 2, INT8_TORCH = 3, INT4_OWN = 4, INT4_TORCH = 5, TILED_OWN = 6
};
enum StackNorm : int64_t { RMS_NORM = 0, LAYER_NORM = 1 };
enum StackMlp : int64_t { SWIGLU = 0, GELU = 1, GELU_TANH = 2, RELU2 = 3 };
constexpr int64_t STACK_PARAMS = 16, STACK_SPEC = 10;  // per block

at::Tensor stack_linear(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params, int64_t i,
                        int64_t kind, int64_t group) {
  const at::Tensor t1 = *params.get(i);
  const std::optional<at::Tensor> t2 = params.get(i + 1), bias = params.get(i + 2);
  if (kind == LINEAR) return at::linear(x, t1, bias);
  at::Tensor y;
  switch (kind) {
    case FP32_T: y = at::mm(x.to(at::kFloat), t1); break;
    case TILED_OWN: y = tiled_linear(x, t1, std::nullopt); break;
    case INT8_OWN: y = int8_linear(x.to(at::kBFloat16), t1, *t2, std::nullopt); break;
    case INT8_TORCH: y = at::_weight_int8pack_mm(x.to(at::kBFloat16), t1, *t2); break;
    case INT4_OWN: y = lmforge_int4_linear(x.to(at::kBFloat16), t1, *t2, group); break;  // int4_ops.cpp
    case INT4_TORCH: y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), t1, group, *t2); break;
    default: TORCH_CHECK(false, "decode_stack: unknown linear kind ", kind);
  }
  return bias.has_value() ? y + *bias : y;
}

// A block's norm of x (B, T, C), as Block._step's _norm_step: params i, i + 1 are (weight, bias).
at::Tensor stack_norm(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params, int64_t i,
                      int64_t kind, double eps) {
  if (kind == RMS_NORM) return rms_norm(x, *params.get(i), eps);
  TORCH_CHECK(kind == LAYER_NORM, "decode_stack: unknown norm kind ", kind);
  return at::layer_norm(x, {x.size(-1)}, params.get(i), params.get(i + 1), eps);
}

// The MLP's nonlinearity on fc's output u (rows, hidden; SwiGLU: 2 hidden), as MLP.act.
at::Tensor stack_act(const at::Tensor& u, int64_t kind) {
  static const auto silu_mul = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("lmforge::silu_mul", "")
                                   .typed<at::Tensor(const at::Tensor&)>();
  switch (kind) {
    // straight to the CPU kernel: silu_mul's autograd formula is registered from Python, and going through the
    // Autograd key would call back into Python once per block (~20 us each)
    case SWIGLU: return silu_mul.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), u);
    case GELU: return at::gelu(u, "none");
    case GELU_TANH: return at::gelu(u, "tanh");
    case RELU2: return at::relu(u).square();
    default: TORCH_CHECK(false, "decode_stack: unknown MLP kind ", kind);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---------------------------------------------------------------------------------------------------
// decode_stack for the layouts a batch-1 step spends most of its overhead on -- Llama blocks (RMSNorm, SwiGLU, no
// biases) with every linear in lmforge's int8 VNNI or int4 layout, bf16 activations -- in ONE parallel region per
// call: the threads split each product's tiles, each pass's rows (norms, activation quantisation, SwiGLU) and the
// attention tasks between barriers, where decode_stack makes ~6 ATen parallel regions, ~12 tensors and ~20
// dispatched ops per block (on 2 threads the second one waited ~35% of a step). The same kernels on the same
// numbers in the same order per output (the residual adds round the product to bf16 first, as x.add_(y) does), so
// the bits are decode_stack's (tests/test_kernels.py).
struct FusedLinear {
  bool int4;
  const uint8_t* q;     // int8: u (N, K) in the VNNI layout; int4: packed (N, K / 2)
  const float* scale;   // int8: (N,)
  const at::Half* dm;   // int4: (N / 16, K / group, 2, 16)
  int64_t N, K, group;
};

// The quantised rows of a product's input: xq (row stride K), per-32-input block scale xs and correction xc and
// per-group sum xsum (row stride K / 32; int8 uses its K / 64 entries).
struct FusedRows {
  int8_t* xq;
  float* xs;
  int32_t* xc;
  float* xsum;
  int64_t K;
  // row r's inputs [c0, c1) (whole groups of the kernel's quantisation: `unit`); groups are independent
  void quantise(const FusedLinear& lin, const c10::BFloat16* x, int64_t r, int64_t c0, int64_t c1) const {
    const int64_t S = K / 32;
    const c10::BFloat16* xr = x + r * lin.K;
    if (lin.int4)
      lmforge_int4_quantise_row(xr + c0, c1 - c0, lin.group, xq + r * K + c0, xs + r * S + c0 / 32,
                                xc + r * S + c0 / 32, xsum + r * S + c0 / lin.group);
    else
      quantize_row(nullptr, xr + c0, c1 - c0, xq + r * K + c0, xs + r * S + c0 / VNNI_GROUP,
                   xc + r * S + c0 / VNNI_GROUP);
  }
  static int64_t unit(const FusedLinear& lin) { return lin.int4 ? lin.group : VNNI_GROUP; }
};

// Tiles [t0, t1) of `lin` against the M quantised rows: y[r][n] = bf16(sum), or with `add` the residual update
// y[r][n] = bf16(y[r][n] + bf16(sum)).
void fused_tiles(const FusedLinear& lin, const FusedRows& x, int64_t M, int64_t t0, int64_t t1, c10::BFloat16* y,
                 bool add) {
  const int64_t K = lin.K, N = lin.N, S = x.K / 32;
  float out[MAX_ROWS][VNNI_TILE];
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
      const int R = static_cast<int>(std::min<int64_t>(MAX_ROWS, M - r0));
      const int8_t* xr[MAX_ROWS];
      const float *sr[MAX_ROWS], *sumr[MAX_ROWS];
      const int32_t* cr[MAX_ROWS];
      float* o[MAX_ROWS];
      for (int r = 0; r < R; ++r)
        xr[r] = x.xq + (r0 + r) * x.K, sr[r] = x.xs + (r0 + r) * S, cr[r] = x.xc + (r0 + r) * S,
        sumr[r] = x.xsum + (r0 + r) * S, o[r] = out[r];
      if (lin.int4) {
        lmforge_int4_tile(lin.q, lin.dm, K, lin.group, t, R, xr, sr, cr, sumr, o);
      } else {
        vnni_rows(R, lin.q + t * VNNI_TILE * K, K, xr, sr, cr, lin.scale + t * VNNI_TILE, o);
      }
      for (int r = 0; r < R; ++r) {
        c10::BFloat16* yr = y + (r0 + r) * N + t * VNNI_TILE;
#if defined(__AVX512BF16__)
        // round to bf16 (nearest even, as c10::BFloat16), then the residual add in fp32 and round again
        const auto widen = [](__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); };
        __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out[r]));
        if (add) v = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(widen(_mm256_loadu_si256((const __m256i*)yr)), widen(v)));
        _mm256_storeu_si256((__m256i*)yr, v);
#else
        for (int64_t c = 0; c < VNNI_TILE; ++c) {
          const c10::BFloat16 v(out[r][c]);
          yr[c] = add ? c10::BFloat16(static_cast<float>(yr[c]) + static_cast<float>(v)) : v;
        }
#endif
      }
    }
}

// A barrier that spins (then yields) instead of sleeping: libgomp's makes a futex syscall at every barrier, and
// decode_stack_fused passes ~10 per block (~300 per SmolLM2 step, each a microsecond or more under a hypervisor).
struct SpinBarrier {
  std::atomic<int> arrived{0}, generation{0};
  int n = 1;
  void wait() {
    const int g = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      generation.store(g + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == g; ++spins) {
      if (spins < (1 << 16))
        _mm_pause();
      else
        std::this_thread::yield();  // more threads than free cores: let the others run
    }
  }
};

// The four linears of every block as decode_stack_fused takes them; empty where it cannot (decode_stack then runs).
std::vector<FusedLinear> fused_linears(const c10::List<std::optional<at::Tensor>>& params, at::IntArrayRef spec,
                                       int64_t n_layer, const at::Tensor& x, const at::Tensor& k_all, int64_t n_head,
                                       int64_t n_kv_head) {
  const int64_t C = x.size(2);
  if (x.scalar_type() != at::kBFloat16 || k_all.scalar_type() != at::kBFloat16 || !k_all.is_contiguous() ||
      k_all.dim() != 5 || C % n_head != 0 || k_all.size(4) != C / n_head || k_all.size(2) != n_kv_head)
    return {};
  const int64_t D = C / n_head;
  std::vector<FusedLinear> lins;
  int64_t hidden = -1;
  for (int64_t l = 0; l < n_layer; ++l) {
    const int64_t p = STACK_PARAMS * l;
    const int64_t* sp = spec.data() + STACK_SPEC * l;
    if (sp[0] != RMS_NORM || sp[1] != SWIGLU) return {};
    for (int64_t i : {p, p + 2}) {
      const std::optional<at::Tensor> w = params.get(i);
      if (!w.has_value() || w->scalar_type() != at::kBFloat16 || !w->is_contiguous() || w->numel() != C) return {};
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t kind = sp[2 + 2 * j], group = sp[3 + 2 * j];
      const std::optional<at::Tensor> t1 = params.get(p + 4 + 3 * j), t2 = params.get(p + 5 + 3 * j),
                                      bias = params.get(p + 6 + 3 * j);
      if (bias.has_value() || !t1.has_value() || !t2.has_value() || t1->scalar_type() != at::kByte ||
          !t1->is_contiguous() || t1->dim() != 2 || !t2->is_contiguous())
        return {};
      FusedLinear f{kind == INT4_OWN, t1->data_ptr<uint8_t>(), nullptr, nullptr, t1->size(0), 0, group};
      if (kind == INT8_OWN && t2->scalar_type() == at::kFloat && t2->numel() == f.N) {
        f.K = t1->size(1), f.scale = t2->data_ptr<float>();
        if (f.K % VNNI_GROUP != 0) return {};
      } else if (kind == INT4_OWN && t2->scalar_type() == at::kHalf && group > 0 && group % 32 == 0) {
        f.K = t1->size(1) * 2, f.dm = t2->data_ptr<at::Half>();
        if (f.K % group != 0 || t2->numel() != f.N * (f.K / group) * 2) return {};
      } else {
        return {};
      }
      if (f.N % VNNI_TILE != 0) return {};
      lins.push_back(f);
    }
    const FusedLinear* b = lins.data() + 4 * l;
    if (hidden < 0) hidden = b[2].N / 2;
    if (b[0].K != C || b[0].N != (n_head + 2 * n_kv_head) * D || b[1].K != n_head * D || b[1].N != C ||
        b[2].K != C || b[2].N != 2 * hidden || b[3].K != hidden || b[3].N != C)
      return {};
  }
  return lins;
}

// Positions, RoPE angles and row positions are checked by the caller (decode_stack, as attend_tokens checks them).
at::Tensor decode_stack_fused(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& params,
                              const std::vector<FusedLinear>& lins, at::Tensor& k_all, at::Tensor& v_all,
                              int64_t row0, int64_t pos, const int64_t* row_pos, const c10::BFloat16* cos,
                              const c10::BFloat16* sin, int64_t rope_stride, int64_t t_stride, int64_t n_head,
                              int64_t n_kv_head, double eps) {
  using BF = c10::BFloat16;
  const int64_t n_layer = static_cast<int64_t>(lins.size()) / 4;
  const int64_t B = x_in.size(0), T = x_in.size(1), C = x_in.size(2), M = B * T, Hkv = n_kv_head;
  const int64_t Bc = k_all.size(1), Lc = k_all.size(3), D = k_all.size(4);
  const int64_t Wqkv = lins[0].N, hidden = lins[2].N / 2;
  int64_t Kmax = 0;
  for (const FusedLinear& f : lins) Kmax = std::max(Kmax, f.K);
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);
  BF* xp = x.data_ptr<BF>();
  // activations, kept by the calling thread between calls (the region's threads see them through these pointers)
  thread_local std::vector<BF> h_buf, qkv_buf, y_buf, u_buf, a_buf;
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> xs_buf, xsum_buf;
  thread_local std::vector<int32_t> xc_buf;
  h_buf.resize(M * C), qkv_buf.resize(M * Wqkv), y_buf.resize(M * C), u_buf.resize(M * 2 * hidden);
  a_buf.resize(M * hidden), xq_buf.resize(M * Kmax), xs_buf.resize(M * Kmax / 32), xc_buf.resize(M * Kmax / 32);
  xsum_buf.resize(M * Kmax / 32);
  BF *h = h_buf.data(), *qkv = qkv_buf.data(), *y = y_buf.data(), *u = u_buf.data(), *a = a_buf.data();
  const FusedRows rows{xq_buf.data(), xs_buf.data(), xc_buf.data(), xsum_buf.data(), Kmax};
  BF* kbase = k_all.data_ptr<BF>();
  BF* vbase = v_all.data_ptr<BF>();
  const Attention<BF> att0{qkv, kbase, vbase, y, pos, row_pos, cos, sin, rope_stride, t_stride, B, T, n_head, Hkv, Lc,
                           D};
  const int nt = std::max(1, at::get_num_threads());
  SpinBarrier bar;
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#pragma omp single
    bar.n = static_cast<int>(nth);  // (the team may be smaller than asked for; single ends in a barrier)
    auto barrier = [&] { bar.wait(); };
    auto share = [&](int64_t n, int64_t& b, int64_t& e) { b = n * tid / nth, e = n * (tid + 1) / nth; };
    typename Attention<BF>::Scratch w(att0);
    int64_t t0, t1, a0, a1;
    // a row-wise step fn(r, c0, c1) over all M rows: whole rows per thread, or with fewer rows than threads (a
    // decoding step) each thread its share of every row's quantisation groups (K / unit of them)
    auto by_rows = [&](int64_t K, int64_t unit, auto&& fn) {
      int64_t b, e;
      if (M >= nth) {
        share(M, b, e);
        for (int64_t r = b; r < e; ++r) fn(r, 0, K);
      } else {
        share(K / unit, b, e);
        if (b < e)
          for (int64_t r = 0; r < M; ++r) fn(r, b * unit, e * unit);
      }
    };
    for (int64_t l = 0; l < n_layer; ++l) {
      const FusedLinear* lin = lins.data() + 4 * l;
      const BF* ln1 = params.get(STACK_PARAMS * l)->data_ptr<BF>();
      const BF* ln2 = params.get(STACK_PARAMS * l + 2)->data_ptr<BF>();
      Attention<BF> att = att0;
      att.kp = kbase + (l * Bc + row0) * Hkv * Lc * D, att.vp = vbase + (l * Bc + row0) * Hkv * Lc * D;
      // x -> norm -> qkv
      by_rows(C, FusedRows::unit(lin[0]), [&](int64_t r, int64_t c0, int64_t c1) {
        rms_scale(xp + r * C, ln1, h + r * C, rms_inv(xp + r * C, C, eps), c0, c1);  // each thread sums the row
        rows.quantise(lin[0], h, r, c0, c1);
      });
      barrier();
      share(lin[0].N / VNNI_TILE, t0, t1);
      fused_tiles(lin[0], rows, M, t0, t1, qkv, false);
      barrier();
      // attention (keys and values first when a row brings several tokens, as attend_one_impl)
      if (T > 1) {
        share(B * Hkv, a0, a1);
        for (int64_t task = a0; task < a1; ++task)
          for (int64_t tok = 0; tok < T; ++tok) att.write(task / Hkv, task % Hkv, tok, w.kf.data());
        barrier();
      }
      share(B * Hkv * T, a0, a1);
      for (int64_t task = a0; task < a1; ++task) {
        const int64_t b = task / (Hkv * T), g = task / T % Hkv, tok = task % T;
        if (T == 1) att.write(b, g, tok, w.kf.data());
        att.attend(b, g, tok, w);
      }
      barrier();
      by_rows(C, FusedRows::unit(lin[1]), [&](int64_t r, int64_t c0, int64_t c1) { rows.quantise(lin[1], y, r, c0, c1); });
      barrier();
      share(lin[1].N / VNNI_TILE, t0, t1);
      fused_tiles(lin[1], rows, M, t0, t1, xp, true);  // x += proj(y)
      barrier();
      // x -> norm -> SwiGLU MLP
      by_rows(C, FusedRows::unit(lin[2]), [&](int64_t r, int64_t c0, int64_t c1) {
        rms_scale(xp + r * C, ln2, h + r * C, rms_inv(xp + r * C, C, eps), c0, c1);
        rows.quantise(lin[2], h, r, c0, c1);
      });
      barrier();
      share(lin[2].N / VNNI_TILE, t0, t1);
      fused_tiles(lin[2], rows, M, t0, t1, u, false);
      barrier();
      by_rows(hidden, FusedRows::unit(lin[3]), [&](int64_t r, int64_t c0, int64_t c1) {
        lmforge_silu_mul_cols(u + r * 2 * hidden, a + r * hidden, hidden, c0, c1);
        rows.quantise(lin[3], a, r, c0, c1);
      });
      barrier();
      share(lin[3].N / VNNI_TILE, t0, t1);
      fused_tiles(lin[3], rows, M, t0, t1, xp, true);  // x += down(a)
      barrier();
    }
  }
  return x;
}
#endif

at::Tensor decode_stack(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& params,
                        at::IntArrayRef spec, at::Tensor k_all, at::Tensor v_all, int64_t row0, int64_t pos,
                        const std::optional<at::Tensor>& row_pos, const std::optional<at::Tensor>& cos,
                        const std::optional<at::Tensor>& sin, int64_t n_head, int64_t n_kv_head, double eps) {
  const int64_t n_layer = static_cast<int64_t>(spec.size()) / STACK_SPEC;
  TORCH_CHECK(static_cast<int64_t>(spec.size()) == STACK_SPEC * n_layer &&
                  static_cast<int64_t>(params.size()) == STACK_PARAMS * n_layer && k_all.size(0) == n_layer &&
                  x_in.dim() == 3, "decode_stack: 16 params and 10 spec entries per block, x (B, T, C)");
  const int64_t B = x_in.size(0), T = x_in.size(1), C = x_in.size(2);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const char* env = std::getenv("LMFORGE_FUSED_STACK");  // 0: the general path below (A/B, tests)
  if (env == nullptr || env[0] != '0') {
    const std::vector<FusedLinear> lins = fused_linears(params, spec, n_layer, x_in, k_all, n_head, n_kv_head);
    if (!lins.empty()) {
      // the checks attend_tokens makes, before the region (nothing may throw inside it)
      TORCH_CHECK(v_all.sizes() == k_all.sizes() && v_all.is_contiguous() && v_all.scalar_type() == at::kBFloat16 &&
                      0 <= row0 && row0 + B <= k_all.size(1), "decode_stack: caches (layers, B, H_kv, L, D), rows");
      const AttendArgs args(B, T, k_all.size(3), k_all.size(4), at::kBFloat16, pos, row_pos, cos, sin);
      const int64_t *rp = args.rp, sb = args.sb, st = args.st;
      const c10::BFloat16* cp = cos.has_value() ? cos->data_ptr<c10::BFloat16>() : nullptr;
      const c10::BFloat16* sp = cos.has_value() ? sin->data_ptr<c10::BFloat16>() : nullptr;
      return decode_stack_fused(x_in, params, lins, k_all, v_all, row0, pos, rp, cp, sp, sb, st, n_head, n_kv_head,
                                eps);
    }
  }
#endif
  // inference only: the ops below skip the autograd and view-tracking keys (no ViewInfo per view, ~35% fewer
  // dispatcher steps), and the residual stream is added in place into a copy of x_in
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);
  for (int64_t l = 0; l < n_layer; ++l) {
    const int64_t p = STACK_PARAMS * l;
    const int64_t* sp = spec.data() + STACK_SPEC * l;
    at::Tensor kc = k_all.select(0, l).narrow(0, row0, B), vc = v_all.select(0, l).narrow(0, row0, B);
    const at::Tensor qkv = stack_linear(stack_norm(x, params, p, sp[0], eps).view({B * T, C}), params, p + 4,
                                        sp[2], sp[3]).view({B, T, -1});
    const at::Tensor y = attend_tokens(qkv, kc, vc, pos, row_pos, cos, sin, n_head, n_kv_head);
    x.add_(stack_linear(y.view({B * T, C}), params, p + 7, sp[4], sp[5]).view({B, T, C}));
    const at::Tensor h = stack_norm(x, params, p + 2, sp[0], eps).view({B * T, C});
    const at::Tensor u = stack_act(stack_linear(h, params, p + 10, sp[6], sp[7]), sp[1]);
    x.add_(stack_linear(u, params, p + 13, sp[8], sp[9]).view({B, T, C}));
  }
  return x;
}

// Whether decode_stack runs these blocks in its one-region path (decode_stack_fused; LMFORGE_FUSED_STACK=0 turns it
// off): for tests and benchmarks.
bool decode_stack_takes_fused(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params,
                              at::IntArrayRef spec, const at::Tensor& k_all, int64_t n_head, int64_t n_kv_head) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const char* env = std::getenv("LMFORGE_FUSED_STACK");
  return (env == nullptr || env[0] != '0') &&
         !fused_linears(params, spec, static_cast<int64_t>(spec.size()) / STACK_SPEC, x, k_all, n_head, n_kv_head)
              .empty();
#else
  return false;
#endif
}

// Whether int8_linear has its AVX512-VNNI body here (models/quant.py then lays int8 weights out for it).
bool int8_vnni() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

// The instruction set this library was compiled for (what -march=native found).
std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, ScalarType? out_dtype=None) -> Tensor");
  m.def("tiled_linear(Tensor x, Tensor w, ScalarType? out_dtype=None) -> Tensor");
  m.def("attend_one(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor? row_pos, Tensor? cos, "
        "Tensor? sin, int n_head, int n_kv_head) -> Tensor");
  m.def("attend_rows(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor? row_pos, Tensor? cos, "
        "Tensor? sin, int n_head, int n_kv_head) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("decode_stack(Tensor x, Tensor?[] params, int[] spec, Tensor(a!) k_cache, Tensor(b!) v_cache, int row0, "
        "int pos, Tensor? row_pos, Tensor? cos, Tensor? sin, int n_head, int n_kv_head, float eps) -> Tensor");
  m.def("decode_stack_fused(Tensor x, Tensor?[] params, int[] spec, Tensor k_cache, int n_head, int n_kv_head) -> bool");
  m.def("isa() -> str");
  m.def("int8_vnni() -> bool");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("tiled_linear", &tiled_linear);
  m.impl("attend_one", &attend_one);
  m.impl("attend_rows", &attend_rows);
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_stack", &decode_stack);
  m.impl("decode_stack_fused", &decode_stack_takes_fused);
}

TORCH_LIBRARY_IMPL(lmforge, CompositeExplicitAutograd, m) {
  m.impl("isa", &isa);
  m.impl("int8_vnni", &int8_vnni);
}
