// lmforge's weight-only int4 product for decoding: y (M, N) = x (M, K) W^T, M small to moderate (a decoding step,
// a speculative verify pass, a batch, a prompt's prefill), with
//   W[n, k] = d[n, g] * q[n, k] + m[n, g],  q in [0, 15],  g = k / group   (llama.cpp's Q4_0/Q4_1/Q4_K)
//
// Integer dot products (AVX512-VNNI's vpdpbusd: 64 u8 x s8 products summed into 16 int32 lanes per instruction,
// twice the 32 multiply-adds of vdpbf16ps): q (0..15) is the unsigned operand as it is, and x is quantised on the
// fly, once per call and row by row, to int8 per block of 32 inputs: x[k] ~ s[b] xq[k] with s[b] = absmax / 127,
// round to nearest even (llama.cpp does the same for its Q4 x Q8 dot products). Per block b of group g and 16
// channels at a time,
//   sum_k W[n, k] x[k] ~= d * sum_b s[b] * (sum_{k in b} (q[n, k] - 8) xq[k]) + (m + 8 d) * sum_{k in g} x[k]:
// the int32 sum starts from -8 sum xq (computed with xq), so the rounding of x multiplies the centred weights
// d (q - 8) (half the error of d q), and the minimum's term takes the exact fp32 sum of x. The error against the
// exact product is at most sum_k |d (q[k] - 8)| s[b] / 2 (tests/test_kernels.py), ~0.5% of a dot product's size
// on random data; SmolLM2's perplexity moves by <= 0.004 nats per token (docs/hub.md). The epilogue per block and
// row: one conversion and one multiply or FMA; per group two FMAs.
// The first version (vdpbf16ps on the exact bf16 numbers 128 + q) was bound by arithmetic from 2 rows on; this one
// is 1.1x it at 1 row, 1.4x at 4, 1.6x at 16, 1.75-2x at 64-170 (`python bench/int8_rows.py --layout int4`, one
// thread of an AMD EPYC, docs/hub.md). The x broadcast is folded into vpdpbusd's memory operand (inline asm: GCC
// emits a separate vpbroadcastd for _mm512_set1_epi32, 8-10% slower from 4 rows on).
//
// Layout (models/quant.py: int4_layout builds it): channels in tiles of 16, inputs in blocks of 32; a tile's block
// is 256 bytes = 4 loads of 64 bytes, and load i holds, for channel c of the tile (its 32-bit lane) and byte j of
// the lane,
//   byte (4 c + j) = q[c][4 i + j] | q[c][16 + 4 i + j] << 4
// so `v & 15` is the inputs 4i .. 4i + 3 of all 16 channels as vpdpbusd takes them (4 consecutive inputs of one
// channel per lane) and `(v >> 4) & 15` the inputs 16 + 4i .. 16 + 4i + 3: one AND (and one shift) per 64 weights.
// The nibble pairs (k, k + 16) are GGUF's own Q4_0/Q4_1 pairs (a Q4_1 block's 16 bytes, moved). A tile's blocks
// follow each other: one contiguous stream of 8 K bytes. Scales: fp16 (N / 16, K / group, 2, 16) = [d of the 16
// channels, m of the 16 channels] -- llama.cpp's Q4_0 / Q4_1 store fp16 d and m, so a GGUF's numbers arrive
// unrounded.
//
// A row's result is the same whatever number of rows comes with it (x is quantised row by row; rows go in blocks of
// at most ROWS, each row with its own accumulators and the same order of floating-point operations), so a
// speculative verify pass gives each token what a one-token step gives it. Without AVX512-VNNI and AVX512BW a plain
// loop computes the same maths in the same order (the same quantisation of x, the same int32 sums, std::fma where
// the fast body has an FMA: the same fp32 sums bit for bit, tests/test_kernels.py), for tests and correctness
// everywhere; models/quant.py keeps PyTorch's kernel there, see `int4_native`.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LMFORGE_INT4_VNNI 1
#endif

namespace {

constexpr int64_t TILE = 16;   // output channels per tile (the 16 int32 / fp32 lanes of a vector)
constexpr int64_t BLOCK = 32;  // inputs per block (256 bytes of a tile) and per scale of the quantised x
constexpr int ROWS = 8;        // rows of x per pass over a tile; more rows take further passes (from L1/L2)
// From 2 rows on, a prefetch of each 64-byte line 1 KB ahead into L2 (within noise here, as for the int8 kernel's
// prototype; into L1 it was slower there); one row streams best without: the hardware prefetcher keeps up.
constexpr int64_t PREFETCH_BYTES = 1024;

// The nibble of q[c][k] (channel c of the tile, input k of the block) inside a tile's 256-byte block.
inline int nibble(const uint8_t* block, int64_t c, int64_t k) {
  const uint8_t byte = block[(k % 16) / 4 * 64 + 4 * c + k % 4];
  return k >= 16 ? byte >> 4 : byte & 15;
}

// One row's block of 32 inputs quantised: xq[k] = round(x[k] / s) with s = absmax / 127 (nearest even, as
// vcvtps2dq), and -8 * sum_k xq[k] into *c8; returns the block's fp32 sum of x, added in one fixed order on every
// CPU: t[l] = x[l] + x[16 + l], then four steps t[l] += t[l ^ h] for h = 8, 4, 2, 1 (a tree of vector shuffles).
inline float quantise_block(const c10::BFloat16* x, int8_t* xq, float* s, int32_t* c8) {
#if defined(LMFORGE_INT4_VNNI)
  const auto load16 = [](const c10::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  };
  const __m512 a = load16(x), b = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *s = amax / 127.f;
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 16), _mm512_cvtepi32_epi8(qb));
  *c8 = -8 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  __m512 t = _mm512_add_ps(a, b);
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0x4E));  // lane l ^ 8 (the other 256-bit half)
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));  // l ^ 4 (the neighbouring 128-bit block)
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));        // l ^ 2
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));        // l ^ 1
  return _mm512_cvtss_f32(t);
#else
  float v[32], amax = 0.f;
  for (int k = 0; k < 32; ++k) v[k] = static_cast<float>(x[k]), amax = std::max(amax, std::fabs(v[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *s = amax / 127.f;
  int32_t c = 0;
  for (int k = 0; k < 32; ++k) {
    const float y = v[k] * inv;  // its own statement: no contraction into anything
    xq[k] = static_cast<int8_t>(std::nearbyint(y));
    c += xq[k];
  }
  *c8 = -8 * c;
  float t[16], u[16];
  for (int l = 0; l < 16; ++l) t[l] = v[l] + v[16 + l];
  for (int h = 8; h >= 1; h /= 2) {
    for (int l = 0; l < 16; ++l) u[l] = t[l] + t[l ^ h];
    std::copy(u, u + 16, t);
  }
  return t[0];
#endif
}

#if defined(LMFORGE_INT4_VNNI)
// acc += w (64 u8) . x4 (4 s8 broadcast to the 16 lanes) with the broadcast folded into vpdpbusd's memory operand:
// GCC emits a separate vpbroadcastd for _mm512_set1_epi32, which cost 8-10% from 4 rows on.
inline void dpbusd_bcast(__m512i& acc, __m512i w, const int32_t* x4) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x4));
}

// R rows (at most ROWS) of x against one tile: out[r][0..16) = x[r] . W[tile channels], block by block.
// xq[r]: row r quantised, xs[r]: its scale per block, xc[r]: -8 * its sum of xq per block, xsum[r]: its exact sum of
// x per group.
template <int R>
inline void tile_rows(const uint8_t* p, const at::Half* dm, const int8_t* const* xq, const float* const* xs,
                      const int32_t* const* xc, const float* const* xsum, int64_t groups, int64_t blocks_per_group,
                      float* const* out) {
  constexpr int C = R == 1 ? 4 : (R == 2 ? 2 : 1);  // independent int32 chains per row (vpdpbusd's latency)
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  int64_t blk = 0;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 f[R];  // sum_b s[b] * dot[b] over the group's blocks
    for (int64_t b = 0; b < blocks_per_group; ++b, ++blk, p += 4 * 64) {
      __m512i acc[R][C];  // from -8 sum xq: the sums are of (q - 8) xq
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = c == 0 ? _mm512_set1_epi32(xc[r][blk]) : _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        if (R >= 2) _mm_prefetch(reinterpret_cast<const char*>(p) + 64 * i + PREFETCH_BYTES, _MM_HINT_T2);
        const __m512i v = _mm512_loadu_si512(p + 64 * i);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* x4 = reinterpret_cast<const int32_t*>(xq[r] + blk * BLOCK);  // 4 inputs per int32
          dpbusd_bcast(acc[r][2 * i % C], lo, x4 + i);
          dpbusd_bcast(acc[r][(2 * i + 1) % C], hi, x4 + 4 + i);
        }
      }
      for (int r = 0; r < R; ++r) {
        __m512i dot = acc[r][0];
        for (int c = 1; c < C; ++c) dot = _mm512_add_epi32(dot, acc[r][c]);
        const __m512 s = _mm512_set1_ps(xs[r][blk]);
        f[r] = b == 0 ? _mm512_mul_ps(_mm512_cvtepi32_ps(dot), s) : _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, f[r]);
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + g * 2 * TILE)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + g * 2 * TILE + TILE)));
    const __m512 z = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d, m);
    for (int r = 0; r < R; ++r)  // d * f + (m + 8 d) * sum x
      total[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[r][g]), _mm512_fmadd_ps(f[r], d, total[r]));
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], total[r]);
}
// tile_rows for a run-time row count R (1 .. ROWS).
inline void tile_rows_any(int R, const uint8_t* p, const at::Half* dm, const int8_t* const* xq,
                          const float* const* xs, const int32_t* const* xc, const float* const* xsum, int64_t groups,
                          int64_t blocks_per_group, float* const* out) {
  switch (R) {
    case 1: tile_rows<1>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    case 2: tile_rows<2>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    case 3: tile_rows<3>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    case 4: tile_rows<4>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    case 5: tile_rows<5>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    case 6: tile_rows<6>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    case 7: tile_rows<7>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
    default: tile_rows<8>(p, dm, xq, xs, xc, xsum, groups, blocks_per_group, out); break;
  }
}
#endif

// The plain loop: the same maths in the same order, for any CPU.
void tile_rows_plain(const uint8_t* p, const at::Half* dm, const int8_t* xq, const float* xs, const int32_t* xc,
                     const float* xsum, int64_t groups, int64_t blocks_per_group, float* out) {
  for (int64_t c = 0; c < TILE; ++c) {
    float total = 0.f;
    for (int64_t g = 0, blk = 0; g < groups; ++g) {
      float f = 0.f;
      for (int64_t b = 0; b < blocks_per_group; ++b, ++blk) {
        int32_t dot = xc[blk];
        for (int64_t k = 0; k < BLOCK; ++k) dot += nibble(p + blk * 256, c, k) * xq[blk * BLOCK + k];
        f = b == 0 ? static_cast<float>(dot) * xs[blk] : std::fma(static_cast<float>(dot), xs[blk], f);
      }
      const float d = dm[g * 2 * TILE + c], m = dm[g * 2 * TILE + TILE + c], z = std::fma(8.f, d, m);
      total = std::fma(z, xsum[g], std::fma(f, d, total));
    }
    out[c] = total;
  }
}

// y (M, N) in bf16, or fp32 with out_dtype (an output head's logits: the fp32 sums unrounded).
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& dm, int64_t group,
                       std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_linear: packed must be (N, K / 2) uint8 in lmforge's int4 layout");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(N % TILE == 0 && group > 0 && group % BLOCK == 0 && K % group == 0,
              "int4_linear: N must be a multiple of ", TILE, ", the group of ", BLOCK, " and K of the group");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K && x_in.scalar_type() == at::kBFloat16,
              "int4_linear: x must be (M, ", K, ") bf16, got ", x_in.sizes(), " ", x_in.scalar_type());
  const int64_t groups = K / group, blocks = K / BLOCK, bpg = group / BLOCK, M = x_in.size(0);
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.numel() == N * groups * 2,
              "int4_linear: scales must be (N / 16, K / group, 2, 16) fp16");
  const bool fp32_out = out_dtype.value_or(at::kBFloat16) == at::kFloat;
  TORCH_CHECK(fp32_out || out_dtype.value_or(at::kBFloat16) == at::kBFloat16, "int4_linear: out_dtype bf16 or fp32");
  const at::Tensor x = x_in.contiguous();
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  // x quantised once per call, row by row: int8 per block of 32, each block's scale, each group's exact sum (buffers
  // kept by the calling thread between calls: a decoding step makes ~120 of these calls)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs, xsum;
  thread_local std::vector<int32_t> xc;
  xq.resize(M * K), xs.resize(M * blocks), xsum.resize(M * groups), xc.resize(M * blocks);
  // (the workers must see the calling thread's buffers: a thread_local named inside a worker is the worker's own)
  int8_t* const xqp = xq.data();
  float* const xsp = xs.data();
  float* const xsump = xsum.data();
  int32_t* const xcp = xc.data();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0, blk = r * blocks; g < groups; ++g) {
        float sum = 0.f;
        for (int64_t b = 0; b < bpg; ++b, ++blk)
          sum += quantise_block(xp + blk * BLOCK, xqp + blk * BLOCK, xsp + blk, xcp + blk);
        xsump[r * groups + g] = sum;
      }
  });
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  void* yp = y.data_ptr();
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const at::Half* dmp = dm.data_ptr<at::Half>();
  const int64_t tile_bytes = TILE * K / 2;
  at::parallel_for(0, N / TILE, 4, [&](int64_t t0, int64_t t1) {
    float out[ROWS][TILE];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* p = qp + t * tile_bytes;
      const at::Half* d = dmp + t * groups * 2 * TILE;
      for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int R = static_cast<int>(std::min<int64_t>(ROWS, M - r0));
#if defined(LMFORGE_INT4_VNNI)
        const int8_t* xr[ROWS];
        const float *sr[ROWS], *sumr[ROWS];
        const int32_t* cr[ROWS];
        float* o[ROWS];
        for (int r = 0; r < R; ++r)
          xr[r] = xqp + (r0 + r) * K, sr[r] = xsp + (r0 + r) * blocks,
          cr[r] = xcp + (r0 + r) * blocks, sumr[r] = xsump + (r0 + r) * groups, o[r] = out[r];
        tile_rows_any(R, p, d, xr, sr, cr, sumr, groups, bpg, o);
#else
        for (int r = 0; r < R; ++r)
          tile_rows_plain(p, d, xqp + (r0 + r) * K, xsp + (r0 + r) * blocks, xcp + (r0 + r) * blocks,
                          xsump + (r0 + r) * groups, groups, bpg, out[r]);
#endif
        for (int r = 0; r < R; ++r)
          for (int64_t c = 0; c < TILE; ++c) {
            const int64_t i = (r0 + r) * N + t * TILE + c;
            if (fp32_out)
              static_cast<float*>(yp)[i] = out[r][c];
            else
              static_cast<c10::BFloat16*>(yp)[i] = static_cast<c10::BFloat16>(out[r][c]);
          }
      }
    }
  });
  return y;
}

// Whether int4_linear runs its AVX512-VNNI body here (else the plain loop, correct but slow).
bool int4_native() {
#if defined(LMFORGE_INT4_VNNI)
  return true;
#else
  return false;
#endif
}

}  // namespace

// decode_stack (decode_ops.cpp) calls the kernel directly, past the dispatcher.
at::Tensor lmforge_int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t group) {
  return int4_linear(x, packed, dm, group, std::nullopt);
}

// decode_stack_fused's pieces of int4_linear (AVX512-VNNI machines): row r of x (K bf16) quantised into xq (K),
// xs and xc (K / 32) and xsum (K / group), as int4_linear quantises it; then tile t of 16 channels for R rows
// (R <= 8, row pointers as tile_rows takes them) into out[r][0..16).
void lmforge_int4_quantise_row(const c10::BFloat16* x, int64_t K, int64_t group, int8_t* xq, float* xs, int32_t* xc,
                               float* xsum) {
  for (int64_t g = 0, blk = 0; g < K / group; ++g) {
    float sum = 0.f;
    for (int64_t b = 0; b < group / BLOCK; ++b, ++blk)
      sum += quantise_block(x + blk * BLOCK, xq + blk * BLOCK, xs + blk, xc + blk);
    xsum[g] = sum;
  }
}

#if defined(LMFORGE_INT4_VNNI)
void lmforge_int4_tile(const uint8_t* packed, const at::Half* dm, int64_t K, int64_t group, int64_t t, int R,
                       const int8_t* const* xq, const float* const* xs, const int32_t* const* xc,
                       const float* const* xsum, float* const* out) {
  const uint8_t* p = packed + t * TILE * K / 2;
  const at::Half* d = dm + t * (K / group) * 2 * TILE;
  const int64_t groups = K / group, bpg = group / BLOCK;
  tile_rows_any(R, p, d, xq, xs, xc, xsum, groups, bpg, out);
}
#endif

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int group, ScalarType? out_dtype=None) -> Tensor");
  m.def("int4_native() -> bool");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("int4_linear", &int4_linear);
}

TORCH_LIBRARY_IMPL(lmforge, CompositeExplicitAutograd, m) { m.impl("int4_native", &int4_native); }
