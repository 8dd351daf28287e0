// lmforge's weight-only int4 product for decoding: y (M, N) = x (M, K) W^T, M small (a decoding step, a
// speculative verify pass, a small batch), with
//   W[n, k] = d[n, g] * q[n, k] + m[n, g],  q in [0, 15],  g = k / group   (llama.cpp's Q4_0/Q4_1/Q4_K)
//
// Why not PyTorch's `_weight_int4pack_mm_for_cpu`: it dequantises every weight to fp32 (a table lookup, an FMA
// with the scale and zero) before its FMA with x -- three or four vector instructions per 16 weights.
// Here, with AVX512-BF16, a weight becomes an exact bf16 number in one instruction per 32: the bf16 with bits
// 0x43 0q is 128 + q (exponent 2^7, q in the low mantissa bits), made by interleaving the nibble bytes with 0x43
// bytes (vpunpck[lh]bw). Then vdpbf16ps multiplies 16 output channels by one broadcast pair of inputs of x;
// its products (128 + q) * x are exact in fp32. Per group, 16 channels at a time, with s = sum_k (128 + q) x[k]
//   sum_k W[n, k] x[k] = d * (s - 128 * sum_k x[k]) + m * sum_k x[k],
// so the epilogue is three vector operations with the group's sum of x (computed once per call).
// `python bench/int8_rows.py --layout int4` (SmolLM2's matrices from memory, one thread of an AMD EPYC): 1.3-1.5x
// PyTorch's kernel at 1-8 rows, 1.75x at 170. Tried and dropped: software prefetches 1-4 KB ahead into L2 for one
// row (slower than none), vdpbf16ps with the broadcast folded in (inline asm; within noise).
//
// Layout (models/quant.py builds it): channels in tiles of 16, inputs in blocks of 32; a tile's block is 256
// bytes = 4 loads of 64 bytes, and load i holds the inputs 8i .. 8i + 7 of the block as
//   byte (L * 16 + h * 8 + 2 c' + t) = q[4 L + c'][8 i + 2 h + t] | q[4 L + c'][8 i + 4 + 2 h + t] << 4
// (L: 128-bit lane, c' + 4 L: channel in the tile, t: input in a pair), so that unpacking the low (high)
// nibbles of the h-th half of each lane gives the 16 channels x 2 inputs that one vdpbf16ps takes: the pair
// 4 i + h (+ 2 for the high nibbles). A tile's blocks follow each other: one contiguous stream of 8 K bytes.
// Scales: fp16 (N / 16, K / group, 2, 16) = [d of the 16 channels, m of the 16 channels] -- llama.cpp's Q4_0 /
// Q4_1 store fp16 d and m, so a GGUF's numbers arrive unrounded, and the layout reads Q4_1's 20 bytes per 32
// weights.
//
// A row's result is the same whatever number of rows comes with it (rows go in blocks of at most 4, each row
// with its own 4 accumulators), so a speculative verify pass gives each token what a one-token step gives it.
// Without AVX512-BF16 a plain loop computes the same product (for tests and correctness everywhere; models/
// quant.py keeps PyTorch's kernel there, see `int4_native`).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t TILE = 16;   // output channels per tile (the 16 fp32 lanes of a vector)
constexpr int64_t BLOCK = 32;  // inputs per block (256 bytes of a tile)
constexpr int ROWS = 4;        // rows of x per pass over a tile; more rows take further passes (from L1/L2)
// With 2-4 rows a pass is bound by arithmetic as much as by memory, and a prefetch 1 KB ahead into L1 lets the
// loads overlap it: 7-12% at 2-8 rows (one row streams best without: the hardware prefetcher keeps up).
constexpr int64_t PREFETCH_BYTES = 1024;

// The nibble of q[c][j] (channel c of the tile, input j of the block) inside a tile's 256-byte block.
inline int nibble(const uint8_t* block, int64_t c, int64_t j) {
  const int64_t i = j / 8, hi = (j / 4) % 2, h = (j / 2) % 2, t = j % 2, L = c / 4, cp = c % 4;
  const uint8_t byte = block[i * 64 + L * 16 + h * 8 + 2 * cp + t];
  return hi ? byte >> 4 : byte & 15;
}

#if defined(__AVX512BF16__)
// R rows (at most ROWS) of x against one tile: out[r][0..16) = x[r] . W[tile channels], group by group.
template <int R>
inline void tile_rows(const uint8_t* p, const at::Half* dm, const c10::BFloat16* const* x, const float* const* xs,
                      int64_t groups, int64_t blocks_per_group, float* const* out) {
  const __m512i low = _mm512_set1_epi8(0x0F), exp43 = _mm512_set1_epi8(0x43);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[R][4];  // 4 chains per row: vdpbf16ps's latency would otherwise bound one row
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_group; ++b, k += BLOCK) {
      for (int i = 0; i < 4; ++i, p += 64) {
        if (R >= 2) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const __m512bh w[4] = {(__m512bh)_mm512_unpacklo_epi8(lo, exp43), (__m512bh)_mm512_unpackhi_epi8(lo, exp43),
                               (__m512bh)_mm512_unpacklo_epi8(hi, exp43), (__m512bh)_mm512_unpackhi_epi8(hi, exp43)};
        for (int r = 0; r < R; ++r) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(x[r] + k + 8 * i);  // pairs of bf16 inputs
          for (int a = 0; a < 4; ++a)
            acc[r][a] = _mm512_dpbf16_ps(acc[r][a], w[a], (__m512bh)_mm512_set1_epi32(xp[a]));
        }
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dm + g * 2 * TILE)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dm + g * 2 * TILE + TILE)));
    for (int r = 0; r < R; ++r) {  // d (s - 128 sum x) + m sum x
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
      const __m512 sx = _mm512_set1_ps(xs[r][g]);
      total[r] = _mm512_fmadd_ps(sx, m, _mm512_fmadd_ps(_mm512_sub_ps(s, _mm512_mul_ps(sx, _mm512_set1_ps(128.f))), d, total[r]));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], total[r]);
}
#endif

// The plain loop: the same product, d (s - 128 sum x) + m sum x per group, for any CPU.
void tile_rows_plain(const uint8_t* p, const at::Half* dm, const c10::BFloat16* x, const float* xs, int64_t groups,
                     int64_t blocks_per_group, float* out) {
  for (int64_t c = 0; c < TILE; ++c) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t b = 0; b < blocks_per_group; ++b) {
        const int64_t blk = g * blocks_per_group + b;
        for (int64_t j = 0; j < BLOCK; ++j)
          s += static_cast<float>(128 + nibble(p + blk * 256, c, j)) * static_cast<float>(x[blk * BLOCK + j]);
      }
      const float d = dm[g * 2 * TILE + c], m = dm[g * 2 * TILE + TILE + c];
      total += d * (s - 128.f * xs[g]) + m * xs[g];
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
  TORCH_CHECK(N % TILE == 0 && group % BLOCK == 0 && K % group == 0, "int4_linear: N must be a multiple of ", TILE,
              ", the group of ", BLOCK, " and K of the group");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K && x_in.scalar_type() == at::kBFloat16,
              "int4_linear: x must be (M, ", K, ") bf16, got ", x_in.sizes(), " ", x_in.scalar_type());
  const int64_t groups = K / group, M = x_in.size(0);
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.numel() == N * groups * 2,
              "int4_linear: scales must be (N / 16, K / group, 2, 16) fp16");
  const at::Tensor x = x_in.contiguous();
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  std::vector<float> xs(M * groups);  // each group's sum of x, once per call
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < group; ++j) s += static_cast<float>(xp[r * K + g * group + j]);
      xs[r * groups + g] = s;
    }
  const bool fp32_out = out_dtype.value_or(at::kBFloat16) == at::kFloat;
  TORCH_CHECK(fp32_out || out_dtype.value_or(at::kBFloat16) == at::kBFloat16, "int4_linear: out_dtype bf16 or fp32");
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  void* yp = y.data_ptr();
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const at::Half* dmp = dm.data_ptr<at::Half>();
  const int64_t bpg = group / BLOCK, tile_bytes = TILE * K / 2;
  at::parallel_for(0, N / TILE, 4, [&](int64_t t0, int64_t t1) {
    float out[ROWS][TILE];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* p = qp + t * tile_bytes;
      const at::Half* d = dmp + t * groups * 2 * TILE;
      for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int R = static_cast<int>(std::min<int64_t>(ROWS, M - r0));
#if defined(__AVX512BF16__)
        const c10::BFloat16* xr[ROWS];
        const float* sr[ROWS];
        float* o[ROWS];
        for (int r = 0; r < R; ++r) xr[r] = xp + (r0 + r) * K, sr[r] = xs.data() + (r0 + r) * groups, o[r] = out[r];
        switch (R) {
          case 1: tile_rows<1>(p, d, xr, sr, groups, bpg, o); break;
          case 2: tile_rows<2>(p, d, xr, sr, groups, bpg, o); break;
          case 3: tile_rows<3>(p, d, xr, sr, groups, bpg, o); break;
          default: tile_rows<4>(p, d, xr, sr, groups, bpg, o); break;
        }
#else
        for (int r = 0; r < R; ++r)
          tile_rows_plain(p, d, xp + (r0 + r) * K, xs.data() + (r0 + r) * groups, groups, bpg, out[r]);
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

// Whether int4_linear runs its bf16 dot-product body here (else the plain loop, correct but slow).
bool int4_native() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int group, ScalarType? out_dtype=None) -> Tensor");
  m.def("int4_native() -> bool");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("int4_linear", &int4_linear);
}

TORCH_LIBRARY_IMPL(lmforge, CompositeExplicitAutograd, m) { m.impl("int4_native", &int4_native); }
