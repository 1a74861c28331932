// Direct norm of linear_sample_score for float32 rows with contiguous positions, in AVX2 registers.
//
// For a conv layer the op receives a and delta in the unfold layout: each input channel i and each
// output channel o holds its T positions contiguously. Entry g[o, i] of the per-sample gradient
// g = delta^T a is then a dot product of two contiguous vectors, so a tile of g can be formed with
// the positions in the SIMD lanes, straight from where the rows lie: no packing copy as BLAS makes,
// and no tile of g stored, since each finished tile is squared and multiplied with G in registers.
//
// Register tile: kTileOut x kTileIn = 4 x 3 entries of g, each an 8-lane accumulator, with the 3
// vectors of a and 1 of delta that feed them: all 16 ymm registers, 7 loads per 12 FMAs. The 3 rows
// of a stay in L1 while the tile walks down a block of delta rows sized to stay in L2 (kDeltaBlock),
// so a row's a is read from memory once per block of delta, and delta once per tile of a.
//
// Where it serves, it beats this op's BLAS path (linear_sample_score.cpp), measured on the vanilla
// CNN's conv layers (batch 128, T = 1024) on an AVX2-only AMD EPYC (Zen 1), two threads: 1.4x on conv1
// (d_in 27, d_out 32, too narrow for sgemm to run well), about 5% on conv2 (288, 64), level on conv3
// (576, 128), where both run at 80-85% of the FMA peak. On CPUs with AVX-512, MKL's 512-bit kernels
// can run at up to twice the rate of 256-bit ones, and this kernel was never measured there, so BLAS
// keeps the work.
#include "direct_avx2.h"

#include <c10/util/Exception.h>

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define FASTDAL_AVX2 __attribute__((target("avx2,fma")))

namespace fastdal::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int kTileOut = 4, kTileIn = 3;
constexpr int64_t kDeltaBlockBytes = 256 << 10;  // half of a 512 KiB L2, the rest for a and prefetching

FASTDAL_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <bool kMasked>
FASTDAL_AVX2 inline __m256 load(const float* p, __m256i mask) {
  if constexpr (kMasked) {
    return _mm256_maskload_ps(p, mask);  // lanes off the mask read as 0 and touch no memory
  } else {
    return _mm256_loadu_ps(p);
  }
}

// acc[o][i] += delta[o][s..s+8) * a[i][s..s+8) lane by lane (only the masked lanes when kMasked).
template <int MO, int MI, bool kMasked>
FASTDAL_AVX2 inline void accumulate(__m256 (&acc)[MO][MI], const float* a, int64_t a_ld, const float* delta,
                                    int64_t d_ld, __m256i mask) {
  __m256 x[MI];
  for (int i = 0; i < MI; ++i) x[i] = load<kMasked>(a + i * a_ld, mask);
  for (int o = 0; o < MO; ++o) {
    const __m256 y = load<kMasked>(delta + o * d_ld, mask);
    for (int i = 0; i < MI; ++i) acc[o][i] = _mm256_fmadd_ps(y, x[i], acc[o][i]);
  }
}

// g (MO x MI, row-major) = the tile of delta^T a with MO rows of delta and MI rows of a, over t
// positions; the last t % 8 through tail_mask.
template <int MO, int MI>
FASTDAL_AVX2 void tile(const float* a, int64_t a_ld, const float* delta, int64_t d_ld, int64_t t, __m256i tail_mask,
                       float* g) {
  __m256 acc[MO][MI];
  for (int o = 0; o < MO; ++o)
    for (int i = 0; i < MI; ++i) acc[o][i] = _mm256_setzero_ps();
  const int64_t full = t - t % kLanes;
  for (int64_t s = 0; s < full; s += kLanes) accumulate<MO, MI, false>(acc, a + s, a_ld, delta + s, d_ld, tail_mask);
  if (full < t) accumulate<MO, MI, true>(acc, a + full, a_ld, delta + full, d_ld, tail_mask);
  for (int o = 0; o < MO; ++o)
    for (int i = 0; i < MI; ++i) g[o * MI + i] = horizontal_sum(acc[o][i]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __m256i, float*);

// tile<MO, MI> for MO = 1..kTileOut, MI = 1..kTileIn: full tiles and the remainders at the edges.
constexpr TileFn kTiles[kTileOut][kTileIn] = {{tile<1, 1>, tile<1, 2>, tile<1, 3>},
                                              {tile<2, 1>, tile<2, 2>, tile<2, 3>},
                                              {tile<3, 1>, tile<3, 2>, tile<3, 3>},
                                              {tile<4, 1>, tile<4, 2>, tile<4, 3>}};

}  // namespace

bool direct_avx2_usable() {
  static const bool usable = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !__builtin_cpu_supports("avx512f");
  }();
  return usable;
}

FASTDAL_AVX2 void direct_row_avx2(const float* a, int64_t a_ld, const float* delta, int64_t d_ld, int64_t t,
                                  int64_t d_in, int64_t d_out, const float* grad, double* sq, double* dot) {
  alignas(32) int32_t lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = l < t % kLanes ? -1 : 0;
  const __m256i tail_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  // Rows of delta per block: a whole number of tiles whose positions fill kDeltaBlockBytes.
  const int64_t block = std::max<int64_t>(1, kDeltaBlockBytes / (t * int64_t(sizeof(float))) / kTileOut) * kTileOut;
  double s = 0, d = 0;
  float g[kTileOut * kTileIn];
  for (int64_t o_first = 0; o_first < d_out; o_first += block) {
    const int64_t o_end = std::min(d_out, o_first + block);
    for (int64_t i0 = 0; i0 < d_in; i0 += kTileIn) {
      const int64_t mi = std::min<int64_t>(kTileIn, d_in - i0);
      for (int64_t o0 = o_first; o0 < o_end; o0 += kTileOut) {
        const int64_t mo = std::min<int64_t>(kTileOut, o_end - o0);
        kTiles[mo - 1][mi - 1](a + i0 * a_ld, a_ld, delta + o0 * d_ld, d_ld, t, tail_mask, g);
        for (int64_t o = 0; o < mo; ++o) {
          for (int64_t i = 0; i < mi; ++i) {
            const double v = g[o * mi + i];
            s += v * v;
            if (grad) d += v * grad[(o0 + o) * d_in + i0 + i];
          }
        }
      }
    }
  }
  *sq = s;
  *dot = d;
}

}  // namespace fastdal::cpu

#else  // not x86-64 with GCC or Clang: BLAS does the work

namespace fastdal::cpu {

bool direct_avx2_usable() { return false; }

void direct_row_avx2(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, const float*, double*,
                     double*) {
  TORCH_CHECK(false, "fastdal (cpp): direct_row_avx2 needs an x86-64 build");
}

}  // namespace fastdal::cpu

#endif
