// fastdal::kron_project on CUDA.
//
// Row r has inputs a[r] (T, d_in) and output gradients delta[r] (T, d_out); with P_in = p_in
// (r_in, d_in) and P_out = p_out[r % groups] (r_out, d_out) the op returns (fastdal/ops.py states it)
//   out[r] = P_out (delta[r]^T a[r]) P_in^T = sum_t (P_out delta_t)(P_in a_t)^T   (r_out, r_in),
// at T (d_in r_in + d_out r_out + r_in r_out) per row; the weight gradient delta^T a (d_out, d_in)
// is never formed, in registers, shared memory or global memory.
//
// Tiling, as the CPU kernel (csrc/cpu/kron_project.cpp) but with 32-position chunks: one block per
// (row, 32 x 32 tile of out over (r_out, r_in)) walks the row's positions a chunk at a time. Per
// chunk, ap = a_chunk P_in^T (32 positions x 32 ranks) is a GEMM over d_in, 32 features at a time
// staged in shared memory, dp = delta_chunk P_out^T likewise over d_out, and the tile of out gains
// dp^T ap, a third GEMM over the chunk's positions, summed in double across chunks. Each entry of
// out belongs to one block and is summed in a fixed order: deterministic, with no atomics and
// nothing in global memory but out. For ranks up to 32 (the usual case) a row is one block and
// nothing is computed twice; larger ranks recompute ap once per r_out tile and dp once per r_in
// tile. a and delta are read through their strides (unfold gives (N, d, T) storage seen as
// (N, T, d)), the warps of a load running along whichever of positions and features has stride 1;
// positions, features and ranks past the edges are staged as zero and add nothing.
// Precision: for float32 with "tf32x3" (the default) or "tf32", on sm_80+, the two projections ap
// and dp run on tensor cores (TF32 WMMA, common.cuh; 3xTF32 for "tf32x3"): each warp a 16 x 16
// fragment of the 32 x 32 result over half of each staged chunk's features, the two halves then
// added in a fixed order. The third GEMM, dp^T ap (32 x 32 x 32 a chunk, small next to the
// projections over d_in and d_out), stays SIMT in the input dtype, summed across chunks in double,
// for every precision. float64, "ieee", and builds whose device code has no tensor cores run
// everything SIMT (FFMA / DFMA).
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "common.cuh"

namespace fastdal::cuda {
namespace {

template <typename T>
struct KronArgs {
  const T* a;
  const T* delta;
  const T* p_in;   // (r_in, d_in) contiguous
  const T* p_out;  // (groups, r_out, d_out) contiguous
  int64_t n, t, d_in, d_out, r_in, r_out, groups;
  int64_t a_sn, a_st, a_sf;  // strides of a: row, position, feature
  int64_t d_sn, d_st, d_sf;  // strides of delta
  T* out;                    // (n, r_out, r_in)
};

constexpr int kTile = 32;  // edge of every tile: positions, features, ranks
constexpr int kMicro = 2;  // micro-tile edge: 16 x 16 threads
static_assert((kTile / kMicro) * (kTile / kMicro) == kThreads, "one micro-tile per thread");

template <typename T>
constexpr int kLd = kTile + kPad<T>;

template <typename T>
__device__ __forceinline__ void zero(T (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = T(0);
}

// acc[i][j] += x[k][x0 + i] y[k][y0 + j] over the kTile values of k (both tiles stored [k][.]).
template <typename T>
__device__ __forceinline__ void multiply_chunk(const T* xs, int x0, const T* ys, int y0, T (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int k = 0; k < kTile; ++k) {
    T xv[kMicro], yv[kMicro];
    load_vec(xs + k * kLd<T> + x0, xv);
    load_vec(ys + k * kLd<T> + y0, yv);
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = fma(xv[i], yv[j], acc[i][j]);
  }
}

// Whether the projections of a kernel instantiation run on tensor cores.
template <typename T, Precision P>
constexpr bool kTensorCores = std::is_same_v<T, float> && P != Precision::kIeee;

// Shared scratch the projections need: the second split-K half of a tensor-core projection.
template <typename T, Precision P>
constexpr int kScratch = kTensorCores<T, P> ? kTile * kLd<T> : 1;

// proj[t][j] = sum_f x[t][f] p[j][f] for a chunk of kTile positions and kTile ranks: x is the
// chunk (rows t at stride x_st, `positions` of them inside the matrix; features at stride x_sf),
// p the ranks' rows of a projection (`ranks` of them, features contiguous). Positions, ranks and
// features outside the matrices are staged as zero, so they add nothing and positions and ranks
// outside come out as zero. xs and ps are the staging buffers, [feature][position] and
// [feature][rank]; proj is stored [t][j].
// SIMT: thread (ty, tx) holds proj[2 ty + i][2 tx + j] in registers.
// Tensor cores: the product is A B with A = x (position by feature), which xs holds column-major,
// and B = p^T (feature by rank), which ps holds row-major, both with leading dimension kLd = 36.
// Warp w holds the 16 x 16 fragment of proj at (16 ((w % 4) / 2), 16 (w % 2)) summed over the
// half (w / 4) of each chunk's features: features 16 (w / 4) + 0..15, two k-steps. The halves are
// stored to proj and to scratch and then added, proj += scratch, a fixed order. The next kTile
// features are fetched into registers while the current ones are multiplied.
template <typename T, Precision P>
__device__ __forceinline__ void project_chunk(const T* __restrict__ x, int64_t x_st, int64_t x_sf, int64_t positions,
                                              const T* __restrict__ p, int64_t ranks, int64_t features, T* xs, T* ps,
                                              T* proj, T* scratch, int tid, int ty, int tx) {
  const bool positions_fast = x_sf != 1;
  Tile<T, kTile, kTile, true> x_tile, p_tile;  // to [feature][position], [feature][rank]
  auto fetch = [&](int64_t f0) {
    x_tile.load(x + f0 * x_sf, StridedRows{x_st, positions}, x_sf, features - f0, positions_fast, tid);
    p_tile.load(p + f0, StridedRows{features, ranks}, 1, features - f0, false, tid);
  };
  if constexpr (kTensorCores<T, P>) {
    constexpr int kHalf = kTile / 2;  // features of a chunk per warp; 16 x 16 fragments
    static_assert(kHalf % tc::kK == 0 && kTile == 2 * tc::kM && kTile == 2 * tc::kN, "2 x 2 fragments, 2 halves");
    const int warp = tid / 32, half = warp / 4, fm = warp % 4 / 2, fn = warp % 2;
    // Element (position 16 fm + i, feature 16 half + k) of A at xs[(16 half + k) kLd + 16 fm + i],
    // element (feature 16 half + k, rank 16 fn + j) of B at ps[(16 half + k) kLd + 16 fn + j].
    const float* a_frag = xs + half * kHalf * kLd<T> + fm * tc::kM;
    const float* b_frag = ps + half * kHalf * kLd<T> + fn * tc::kN;
    tc::Acc acc[1][1];
    tc::fill_zero(acc);
    fetch(0);
    for (int64_t f0 = 0; f0 < features; f0 += kTile) {
      __syncthreads();  // the previous chunk's multiply is done with xs and ps
      x_tile.store(xs, kLd<T>, positions_fast, tid);
      p_tile.store(ps, kLd<T>, false, tid);
      __syncthreads();
      if (f0 + kTile < features) fetch(f0 + kTile);  // in flight while this chunk is multiplied
      tc::warp_mma<P, 1, 1, kHalf / tc::kK, tc::col_major, tc::row_major>(acc, a_frag, kLd<T>, b_frag, kLd<T>);
    }
    // Row-major [t][j], as the SIMT path stores proj.
    tc::store((half == 0 ? proj : scratch) + fm * tc::kM * kLd<T> + fn * tc::kN, kLd<T>, acc);
    __syncthreads();
    static_assert(kTile * kTile % kThreads == 0, "whole passes");
#pragma unroll
    for (int k = 0; k < kTile * kTile / kThreads; ++k) {
      const int e = k * kThreads + tid, i = e / kTile * kLd<T> + e % kTile;  // element (e / 32, e % 32)
      proj[i] += scratch[i];
    }
  } else {
    T acc[kMicro][kMicro];
    zero(acc);
    for (int64_t f0 = 0; f0 < features; f0 += kTile) {
      fetch(f0);
      __syncthreads();  // the previous chunk's multiply is done with xs and ps
      x_tile.store(xs, kLd<T>, positions_fast, tid);
      p_tile.store(ps, kLd<T>, false, tid);
      __syncthreads();
      multiply_chunk(xs, ty * kMicro, ps, tx * kMicro, acc);
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) proj[(ty * kMicro + i) * kLd<T> + tx * kMicro + j] = acc[i][j];
  }
}

// Block (row, o-tile, i-tile), decoded from a 1-D grid with the tiles of a row adjacent (they read
// the same a[r] and delta[r] while these are in L2). Thread (ty, tx) holds
// out[row][o0 + 2 ty + i][i0 + 2 tx + j].
template <typename T, Precision P>
__device__ __forceinline__ void kron_project_block(const KronArgs<T>& p, int64_t tiles_o, int64_t tiles_i) {
  // 128-byte aligned: fragment pointers of the tensor-core path must be 32-byte aligned.
  __shared__ __align__(128) T xs[kTile * kLd<T>];  // staged chunk of a or delta, [feature][position]
  __shared__ __align__(128) T ps[kTile * kLd<T>];  // staged rows of P_in or P_out, [feature][rank]
  __shared__ __align__(128) T ap[kTile * kLd<T>];  // [position][r_in]
  __shared__ __align__(128) T dp[kTile * kLd<T>];  // [position][r_out]
  __shared__ __align__(128) T scratch[kScratch<T, P>];

  const int tid = threadIdx.x, ty = tid % (kTile / kMicro), tx = tid / (kTile / kMicro);
  const int64_t block = blockIdx.x;
  const int64_t row = block / (tiles_o * tiles_i);
  const int64_t o0 = (block / tiles_i) % tiles_o * kTile;
  const int64_t i0 = block % tiles_i * kTile;
  const T* a = p.a + row * p.a_sn;
  const T* delta = p.delta + row * p.d_sn;
  const T* p_in = p.p_in + i0 * p.d_in;
  const T* p_out = p.p_out + ((row % p.groups) * p.r_out + o0) * p.d_out;

  acc_t total[kMicro][kMicro] = {};
  for (int64_t t0 = 0; t0 < p.t; t0 += kTile) {
    __syncthreads();  // the previous chunk's dp^T ap is done with ap and dp
    project_chunk<T, P>(a + t0 * p.a_st, p.a_st, p.a_sf, p.t - t0, p_in, p.r_in - i0, p.d_in, xs, ps, ap, scratch,
                        tid, ty, tx);
    project_chunk<T, P>(delta + t0 * p.d_st, p.d_st, p.d_sf, p.t - t0, p_out, p.r_out - o0, p.d_out, xs, ps, dp,
                        scratch, tid, ty, tx);
    __syncthreads();
    // Summed over the chunk in the input dtype, as the GEMMs of the CPU kernel are over a tile,
    // then across chunks in double. SIMT for every precision.
    T part[kMicro][kMicro];
    zero(part);
    multiply_chunk(dp, ty * kMicro, ap, tx * kMicro, part);
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) total[i][j] += part[i][j];
  }

  T* out = p.out + row * p.r_out * p.r_in;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t o = o0 + ty * kMicro + i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t f = i0 + tx * kMicro + j;
      if (o < p.r_out && f < p.r_in) out[o * p.r_in + f] = static_cast<T>(total[i][j]);
    }
  }
}

// The SIMT kernel (float64, and float32 "ieee" or without tensor cores).
template <typename T>
__global__ void __launch_bounds__(kThreads) kron_project_kernel(const KronArgs<T> p, int64_t tiles_o, int64_t tiles_i) {
  kron_project_block<T, Precision::kIeee>(p, tiles_o, tiles_i);
}

// The tensor-core kernel (float32, "tf32x3" or "tf32"), held to 128 registers a thread (2 blocks an
// SM, no spills for sm_90): left free, ptxas gives it 170-200 (1 block an SM).
template <Precision P>
__global__ void __launch_bounds__(kThreads, 2) kron_project_tc_kernel(const KronArgs<float> p, int64_t tiles_o,
                                                                       int64_t tiles_i) {
  kron_project_block<float, P>(p, tiles_o, tiles_i);
}

template <typename T, Precision P>
void launch(const KronArgs<T>& p, int64_t tiles_o, int64_t tiles_i, int64_t blocks) {
  const auto grid = static_cast<unsigned>(blocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (kTensorCores<T, P>) {
    kron_project_tc_kernel<P><<<grid, kThreads, 0, stream>>>(p, tiles_o, tiles_i);
  } else {
    kron_project_kernel<T><<<grid, kThreads, 0, stream>>>(p, tiles_o, tiles_i);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tensor cores where asked for and compiled in (sm_80+); otherwise the SIMT kernel. float64
// ignores precision.
template <typename T>
void launch_with(const KronArgs<T>& p, Precision prec, int64_t tiles_o, int64_t tiles_i, int64_t blocks) {
  if constexpr (std::is_same_v<T, float>) {
    if (prec == Precision::kTf32x3 && has_tensor_cores(kron_project_tc_kernel<Precision::kTf32x3>)) {
      return launch<float, Precision::kTf32x3>(p, tiles_o, tiles_i, blocks);
    }
    if (prec == Precision::kTf32 && has_tensor_cores(kron_project_tc_kernel<Precision::kTf32>)) {
      return launch<float, Precision::kTf32>(p, tiles_o, tiles_i, blocks);
    }
  }
  launch<T, Precision::kIeee>(p, tiles_o, tiles_i, blocks);
}

at::Tensor kron_project_cuda(const at::Tensor& a, const at::Tensor& delta, const at::Tensor& p_in,
                             const at::Tensor& p_out, std::string_view precision) {
  const Precision prec = precision_of(precision);
  check_float_tensor(a, "a", 3);
  check_float_tensor(delta, "delta", 3);
  check_float_tensor(p_in, "p_in", 2);
  check_float_tensor(p_out, "p_out", 3);
  check_like(delta, "delta", a, "a");
  check_like(p_in, "p_in", a, "a");
  check_like(p_out, "p_out", a, "a");
  const int64_t n = a.size(0), t = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  TORCH_CHECK(delta.size(0) == n && delta.size(1) == t, "fastdal (cuda): delta must be (", n, ", ", t,
              ", d_out) to match a, got ", delta.sizes());
  TORCH_CHECK(p_in.size(1) == d_in, "fastdal (cuda): p_in must be (r_in, ", d_in, ") to match a, got ", p_in.sizes());
  TORCH_CHECK(p_out.size(2) == d_out, "fastdal (cuda): p_out must be (groups, r_out, ", d_out,
              ") to match delta, got ", p_out.sizes());
  const int64_t groups = p_out.size(0);
  TORCH_CHECK(groups >= 1 && n % groups == 0, "fastdal (cuda): p_out's first dimension (groups) must divide N=", n,
              ", got ", groups);
  check_contiguous(p_in, "p_in");
  check_contiguous(p_out, "p_out");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t r_in = p_in.size(0), r_out = p_out.size(1);
  auto out = at::zeros({n, r_out, r_in}, a.options());
  if (out.numel() == 0 || t == 0 || d_in == 0 || d_out == 0) return out;  // delta^T a = 0
  const int64_t tiles_o = ceil_div(r_out, kTile), tiles_i = ceil_div(r_in, kTile);
  const int64_t blocks = n * tiles_o * tiles_i;
  TORCH_CHECK(blocks <= INT_MAX, "fastdal (cuda): kron_project: too many blocks (", blocks, ")");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kron_project_cuda", [&] {
    const KronArgs<scalar_t> p{a.data_ptr<scalar_t>(),
                               delta.data_ptr<scalar_t>(),
                               p_in.data_ptr<scalar_t>(),
                               p_out.data_ptr<scalar_t>(),
                               n,
                               t,
                               d_in,
                               d_out,
                               r_in,
                               r_out,
                               groups,
                               a.stride(0),
                               a.stride(1),
                               a.stride(2),
                               delta.stride(0),
                               delta.stride(1),
                               delta.stride(2),
                               out.data_ptr<scalar_t>()};
    launch_with(p, prec, tiles_o, tiles_i, blocks);
  });
  return out;
}

}  // namespace
}  // namespace fastdal::cuda

TORCH_LIBRARY_IMPL(fastdal, CUDA, m) { m.impl("kron_project", &fastdal::cuda::kron_project_cuda); }
