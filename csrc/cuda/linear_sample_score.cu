// fastdal::linear_sample_score on CUDA.
//
// Row r has inputs a[r] (T, d_in) and output gradients delta[r] (T, d_out); its weight gradient is
// g_r = delta[r]^T a[r] (d_out, d_in), and the op returns ||g_r||^2 and <g_r, G[r % groups]>
// (fastdal/ops.py states it). a and delta are read through their strides as they lie (unfold gives
// (N, d, T) storage seen as (N, T, d)); nothing is copied, and neither g_r nor a T x T matrix is
// ever stored. Every kernel but the small-T one is a GEMM tile (common.cuh): 256 threads, a 64 x 64
// tile of the product, chunks of 64 bytes of the inner dimension staged in shared memory, multiplied
// either SIMT (a 4 x 4 micro-tile a thread: precision "ieee", and float64) or, for float32 on sm_80+,
// on tensor cores (TF32 WMMA, "tf32x3" or "tf32": each warp a 16 x 32 strip of the tile, which is
// then passed through shared memory to the SIMT micro-tile layout for the same epilogue). The
// tile's result is reduced in double and written, per block, to its own slot of a partials buffer;
// a second kernel sums each row's slots in a fixed order (one warp a row). No atomics: results are
// bitwise repeatable run to run.
//
// * direct: one block per (row, 64 x 64 tile of g over (d_out, d_in)); the tile is summed over T
//   and reduced at once into its squared norm and its dot product with G's tile.
// * ghost, ||g||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s):
//   - T > 16: one block per (row, 64 x 64 tile (t, s) of the T x T Gram matrices, s-tile >= t-tile);
//     the tile of a's Gram matrix is computed over d_in, then delta's over d_out, and their
//     elementwise product summed, off-diagonal tiles counted twice.
//   - T <= 16: one block per row holds all T^2 Gram entries at once, each split over the features
//     among 256 / T^2 threads (a 64 x 64 tile would be mostly padding; T = 1 is a Linear layer).
// * ghost, <g, G> = sum_t delta_t . (G a_t): the positions of all rows of one group form the rows
//   of one GEMM against G^T, (N / groups) T x d_in times d_in x d_out, tiled 64 x 64 over
//   (position, output); each tile is reduced against delta's tile and added to the rows its
//   positions belong to. Gathering positions across rows keeps the GEMM efficient for small T
//   (T = 1 would otherwise read all of G for every row). A block's slot for a row is (row, m-tile
//   relative to the row's first, o-tile).
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "common.cuh"

namespace fastdal::cuda {
namespace {

template <typename T>
struct SampleArgs {
  const T* a;
  const T* delta;
  const T* g;  // (groups, d_out, d_in) contiguous; nullable
  int64_t n, t, d_in, d_out, groups;
  int64_t a_sn, a_st, a_sf;  // strides of a: row, position, feature
  int64_t d_sn, d_st, d_sf;  // strides of delta
  acc_t* part_sq;  // per block partials, (n, per_row) for the kernel's per_row
  acc_t* part_dot;
  T* sq;   // the outputs: written by sum_partials_kernel, or directly by the small-T ghost kernel
  T* dot;
};

constexpr int kTile = 64;  // tile edge of every GEMM below
constexpr int kMicro = 4;  // micro-tile edge: 16 x 16 threads
static_assert((kTile / kMicro) * (kTile / kMicro) == kThreads, "one micro-tile per thread");

// Elements of the inner dimension staged a chunk: 64 bytes of each line, two full sectors.
template <typename T>
constexpr int kChunk = 64 / sizeof(T);

// acc[i][j] += x[i] y[j] over the chunk, for xs[k][x0 + i] and ys[k][y0 + j] (both stored [k][.]).
template <typename T, int CHUNK>
__device__ __forceinline__ void multiply_chunk(const T* xs, int ldx, int x0, const T* ys, int ldy, int y0,
                                               T (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int k = 0; k < CHUNK; ++k) {
    T xv[kMicro], yv[kMicro];
    load_vec(xs + k * ldx + x0, xv);
    load_vec(ys + k * ldy + y0, yv);
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = fma(xv[i], yv[j], acc[i][j]);
  }
}

template <typename T>
__device__ __forceinline__ void zero(T (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = T(0);
}

// The block's 64 x 64 product tile C[x][y] = sum_k xs[k][x] ys[k][y], summed over the staged chunks
// (xs and ys stored [k][.] with leading dimension LD). SIMT: thread (ty, tx) holds the 4 x 4
// micro-tile C[4 ty + i][4 tx + j] in registers.
template <typename T, Precision P, bool TENSOR_CORES = std::is_same_v<T, float> && P != Precision::kIeee>
struct TileProduct {
  static constexpr int kScratch = 1;  // no shared scratch needed
  T acc[kMicro][kMicro];
  __device__ __forceinline__ void clear() { zero(acc); }
  template <int CHUNK>
  __device__ __forceinline__ void multiply(const T* xs, const T* ys, int ld, int ty, int tx) {
    multiply_chunk<T, CHUNK>(xs, ld, ty * kMicro, ys, ld, tx * kMicro, acc);
  }
  // The thread's micro-tile; all threads call it.
  __device__ __forceinline__ void micro(T (&m)[kMicro][kMicro], T* /*scratch*/, int /*ty*/, int /*tx*/) const {
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) m[i][j] = acc[i][j];
  }
  // This thread's share of sum_{x,y} C[x][y] other[x][y] (both tiles held alike).
  __device__ __forceinline__ acc_t dot(const TileProduct& other) const {
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) sum += static_cast<acc_t>(acc[i][j]) * other.acc[i][j];
    return sum;
  }
};

// Tensor cores: warp w holds the 16 x 32 strip C[16 (w % 4) ..][32 (w / 4) ..] as two accumulator
// fragments. xs is A (x by k) in column-major order and ys B (k by y) in row-major order, both with
// leading dimension LD = 68 (a multiple of 4; fragment pointers at multiples of 16 x or y columns and
// 8 k rows, so 32-byte aligned). micro() stores the fragments to a 64 x 68 scratch and hands each
// thread the SIMT micro-tile, so that the kernels' epilogues do not depend on the fragment layout.
template <Precision P>
struct TileProduct<float, P, true> {
  static_assert(P != Precision::kIeee, "ieee is the SIMT specialization");
  static constexpr int kLd = kTile + kPad<float>;
  static constexpr int kScratch = kTile * kLd;
  tc::Acc acc[1][2];
  __device__ __forceinline__ static int warp_x() { return static_cast<int>(threadIdx.x / 32) % 4 * 16; }
  __device__ __forceinline__ static int warp_y() { return static_cast<int>(threadIdx.x / 32) / 4 * 32; }
  __device__ __forceinline__ void clear() { tc::fill_zero(acc); }
  template <int CHUNK>
  __device__ __forceinline__ void multiply(const float* xs, const float* ys, int ld, int, int) {
    static_assert(CHUNK % tc::kK == 0, "whole k-steps a chunk");
    tc::warp_mma<P, 1, 2, CHUNK / tc::kK, tc::col_major, tc::row_major>(acc, xs + warp_x(), ld, ys + warp_y(), ld);
  }
  __device__ __forceinline__ void micro(float (&m)[kMicro][kMicro], float* scratch, int ty, int tx) const {
    tc::store(scratch + warp_x() * kLd + warp_y(), kLd, acc);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) m[i][j] = scratch[(ty * kMicro + i) * kLd + tx * kMicro + j];
  }
  // Same fragment types hold the same (x, y) in the same element: an elementwise product is valid.
  __device__ __forceinline__ acc_t dot(const TileProduct& other) const {
    acc_t sum = 0;
#if FASTDAL_TENSOR_CORES
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < acc[0][j].num_elements; ++e) sum += static_cast<acc_t>(acc[0][j].x[e]) * other.acc[0][j].x[e];
#endif
    return sum;
  }
};

// out[r] = sum_j part[r * per_row + j], one warp a row: lanes sum strided slots in order, then a
// fixed shuffle tree. The order depends on nothing but per_row: bitwise repeatable.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* __restrict__ part, int64_t n,
                                                                int64_t per_row, T* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= n) return;  // the whole warp
  const int lane = threadIdx.x % 32;
  acc_t s = 0;
  for (int64_t j = lane; j < per_row; j += 32) s += part[row * per_row + j];
  s = warp_sum(s);
  if (lane == 0) out[row] = static_cast<T>(s);
}

// ---------------------------------------------------------------------------------------------
// direct
// ---------------------------------------------------------------------------------------------

// Block (row, o-tile, i-tile), decoded from a 1-D grid with the tiles of a row adjacent (they read
// the same a[r] and delta[r] while these are in L2). Thread (ty, tx) holds g[o0 + 4 ty + i][i0 + 4 tx + j].
template <typename T, Precision P>
__global__ void __launch_bounds__(kThreads) direct_kernel(const SampleArgs<T> p, int64_t tiles_o, int64_t tiles_i) {
  constexpr int BT = kChunk<T>;
  constexpr int LD = kTile + kPad<T>;
  using Product = TileProduct<T, P>;
  // Chunks of delta and a stored [t][feature]: a thread's 4 features at one t are one vector load.
  __shared__ __align__(128) T ds[BT * LD];
  __shared__ __align__(128) T as[BT * LD];
  __shared__ __align__(128) T scratch[Product::kScratch];

  const int tid = threadIdx.x, ty = tid % (kTile / kMicro), tx = tid / (kTile / kMicro);
  const int64_t block = blockIdx.x;
  const int64_t row = block / (tiles_o * tiles_i);
  const int64_t o0 = (block / tiles_i) % tiles_o * kTile;
  const int64_t i0 = block % tiles_i * kTile;
  const T* delta = p.delta + row * p.d_sn + o0 * p.d_sf;
  const T* a = p.a + row * p.a_sn + i0 * p.a_sf;
  const bool delta_t_fast = p.d_sf != 1, a_t_fast = p.a_sf != 1;

  Tile<T, BT, kTile, false> d_tile, a_tile;
  auto fetch = [&](int64_t t0) {
    d_tile.load(delta + t0 * p.d_st, StridedRows{p.d_st, p.t - t0}, p.d_sf, p.d_out - o0, delta_t_fast, tid);
    a_tile.load(a + t0 * p.a_st, StridedRows{p.a_st, p.t - t0}, p.a_sf, p.d_in - i0, a_t_fast, tid);
  };

  Product product;
  product.clear();
  fetch(0);
  for (int64_t t0 = 0; t0 < p.t; t0 += BT) {
    __syncthreads();
    d_tile.store(ds, LD, delta_t_fast, tid);
    a_tile.store(as, LD, a_t_fast, tid);
    __syncthreads();
    if (t0 + BT < p.t) fetch(t0 + BT);  // in flight while this chunk is multiplied
    product.template multiply<BT>(ds, as, LD, ty, tx);
  }
  T acc[kMicro][kMicro];
  product.micro(acc, scratch, ty, tx);

  // Outside the matrix the tile is zero: it adds nothing to ||g||^2.
  acc_t sq = 0, dot = 0;
  const T* grad = p.g ? p.g + (row % p.groups) * p.d_out * p.d_in : nullptr;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t o = o0 + ty * kMicro + i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t f = i0 + tx * kMicro + j;
      const acc_t g = acc[i][j];
      sq += g * g;
      if (grad && o < p.d_out && f < p.d_in) dot += g * grad[o * p.d_in + f];
    }
  }
  sq = block_sum(sq);
  dot = block_sum(dot);
  if (tid == 0) {  // the block's own slot of the row
    const int64_t slot = row * (tiles_o * tiles_i) + block % (tiles_o * tiles_i);
    p.part_sq[slot] = sq;
    if (grad) p.part_dot[slot] = dot;
  }
}

// ---------------------------------------------------------------------------------------------
// ghost ||g||^2, T > 16
// ---------------------------------------------------------------------------------------------

// Block (row, t-tile bt, s-tile bs >= bt). Thread (ty, tx) holds the Gram entries of positions
// (t0 + 4 ty + i, s0 + 4 tx + j): first a's, over d_in, then delta's, over d_out.
template <typename T, Precision P>
__global__ void __launch_bounds__(kThreads) ghost_gram_kernel(const SampleArgs<T> p, int64_t tiles_t) {
  constexpr int BF = kChunk<T>;
  constexpr int LD = kTile + kPad<T>;
  using Product = TileProduct<T, P>;
  // Chunks stored [feature][position]: a thread's 4 positions at one feature are one vector load.
  __shared__ __align__(128) T xs[BF * LD];
  __shared__ __align__(128) T ys[BF * LD];

  const int tid = threadIdx.x, ty = tid % (kTile / kMicro), tx = tid / (kTile / kMicro);
  const int64_t pairs = tiles_t * (tiles_t + 1) / 2;
  const int64_t row = blockIdx.x / pairs;
  int64_t bt = 0, rest = blockIdx.x % pairs;  // the rest-th pair (bt, bs >= bt), row-major
  while (rest >= tiles_t - bt) rest -= tiles_t - bt++;
  const int64_t bs = bt + rest;
  const int64_t t0 = bt * kTile, s0 = bs * kTile;

  const int64_t a_chunks = ceil_div(p.d_in, BF), steps = a_chunks + ceil_div(p.d_out, BF);
  const bool a_t_fast = p.a_sf != 1, d_t_fast = p.d_sf != 1;
  Tile<T, kTile, BF, true> x_tile, y_tile;
  auto fetch = [&](int64_t step) {
    const bool of_a = step < a_chunks;
    const T* base = of_a ? p.a + row * p.a_sn : p.delta + row * p.d_sn;
    const int64_t st = of_a ? p.a_st : p.d_st, sf = of_a ? p.a_sf : p.d_sf;
    const int64_t f0 = (of_a ? step : step - a_chunks) * BF, features = of_a ? p.d_in : p.d_out;
    const bool t_fast = of_a ? a_t_fast : d_t_fast;
    x_tile.load(base + t0 * st + f0 * sf, StridedRows{st, p.t - t0}, sf, features - f0, t_fast, tid);
    y_tile.load(base + s0 * st + f0 * sf, StridedRows{st, p.t - s0}, sf, features - f0, t_fast, tid);
  };

  Product acc, gram_a;
  acc.clear();
  fetch(0);
  for (int64_t step = 0; step < steps; ++step) {
    const bool t_fast = step < a_chunks ? a_t_fast : d_t_fast;
    __syncthreads();
    x_tile.store(xs, LD, t_fast, tid);
    y_tile.store(ys, LD, t_fast, tid);
    __syncthreads();
    if (step + 1 < steps) fetch(step + 1);
    acc.template multiply<BF>(xs, ys, LD, ty, tx);
    if (step == a_chunks - 1) {  // a's Gram tile is complete; delta's follows in acc
      gram_a = acc;
      acc.clear();
    }
  }

  // Positions past T are zero in both Gram tiles; both are held alike, so their elementwise
  // product needs no shared memory, whichever way they are held.
  acc_t sum = acc.dot(gram_a);
  sum = block_sum(sum);
  if (tid == 0) p.part_sq[static_cast<int64_t>(blockIdx.x)] = bt == bs ? sum : 2 * sum;  // = row * pairs + pair
}

// ---------------------------------------------------------------------------------------------
// ghost ||g||^2, T <= 16
// ---------------------------------------------------------------------------------------------

constexpr int kSmallT = 16;

// Block per row. Thread tid < P F, P = T^2 and F = 256 / P, sums the Gram entry (t, s) = (p / T, p % T)
// of p = tid % P over the features q = tid / P, q + F, ... of each chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads) ghost_gram_small_kernel(const SampleArgs<T> p) {
  constexpr int BF = 128;  // features a chunk: few round trips to global memory per row
  constexpr int LD = BF + 1;
  __shared__ T xs[kSmallT * LD];
  __shared__ T partial_a[kThreads];
  __shared__ T partial_d[kThreads];

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int tn = static_cast<int>(p.t), pairs = tn * tn, slices = kThreads / pairs;
  const int pair = tid % pairs, slice = tid / pairs;
  const bool works = slice < slices;
  const int t = pair / tn, s = pair % tn;

  const int64_t a_chunks = ceil_div(p.d_in, BF), steps = a_chunks + ceil_div(p.d_out, BF);
  Tile<T, kSmallT, BF, false> tile;
  auto fetch = [&](int64_t step) {
    const bool of_a = step < a_chunks;
    const T* base = of_a ? p.a + row * p.a_sn : p.delta + row * p.d_sn;
    const int64_t st = of_a ? p.a_st : p.d_st, sf = of_a ? p.a_sf : p.d_sf;
    const int64_t f0 = (of_a ? step : step - a_chunks) * BF, features = of_a ? p.d_in : p.d_out;
    tile.load(base + f0 * sf, StridedRows{st, p.t}, sf, features - f0, sf != 1, tid);
  };

  T gram = 0;
  fetch(0);
  for (int64_t step = 0; step < steps; ++step) {
    const bool t_fast = (step < a_chunks ? p.a_sf : p.d_sf) != 1;
    __syncthreads();
    tile.store(xs, LD, t_fast, tid);
    __syncthreads();
    if (step + 1 < steps) fetch(step + 1);
    if (works) {
      for (int f = slice; f < BF; f += slices) gram = fma(xs[t * LD + f], xs[s * LD + f], gram);
    }
    if (step == a_chunks - 1) {  // a's Gram entries are complete; delta's follow
      partial_a[tid] = gram;
      gram = 0;
    }
  }
  partial_d[tid] = gram;
  __syncthreads();

  acc_t product = 0;
  if (tid < pairs) {
    acc_t ga = 0, gd = 0;
    for (int q = 0; q < slices; ++q) ga += partial_a[q * pairs + tid], gd += partial_d[q * pairs + tid];
    product = ga * gd;
  }
  product = block_sum(product);
  if (tid == 0) p.sq[row] = static_cast<T>(product);  // the row's only block
}

// ---------------------------------------------------------------------------------------------
// ghost <g, G>
// ---------------------------------------------------------------------------------------------

// Block (group, m-tile, o-tile) over the GEMM P = A G^T of one group, where A's rows m are the
// positions (sample m / T, position m % T) of the group's rows, r = (m / T) groups + group. Thread
// (ty, tx) holds P[m0 + 4 ty + i][o0 + 4 tx + j] = a_m . G_o, reduced against delta at the end.
template <typename T, Precision P>
__global__ void __launch_bounds__(kThreads) ghost_dot_kernel(const SampleArgs<T> p, int64_t tiles_m,
                                                             int64_t tiles_o, int64_t slots) {
  constexpr int BF = kChunk<T>;
  constexpr int LD = kTile + kPad<T>;
  constexpr int kLanes = kTile / kMicro;
  using Product = TileProduct<T, P>;
  __shared__ __align__(128) T xs[BF * LD];  // [feature][m]
  __shared__ __align__(128) T gs[BF * LD];  // [feature][o]
  __shared__ __align__(128) T scratch[Product::kScratch];
  __shared__ int64_t a_off[kTile], d_off[kTile], row_of[kTile];  // -1 past the group's positions
  __shared__ acc_t partial[kLanes][kTile];

  const int tid = threadIdx.x, ty = tid % kLanes, tx = tid / kLanes;
  const int64_t block = blockIdx.x;
  const int64_t group = block / (tiles_m * tiles_o);
  const int64_t m0 = (block / tiles_o) % tiles_m * kTile;
  const int64_t o0 = block % tiles_o * kTile;
  const int64_t positions = p.n / p.groups * p.t;
  if (tid < kTile) {
    const int64_t m = m0 + tid;
    const int64_t r = m / p.t * p.groups + group, t = m % p.t;
    const bool inside = m < positions;
    a_off[tid] = inside ? r * p.a_sn + t * p.a_st : -1;
    d_off[tid] = inside ? r * p.d_sn + t * p.d_st : -1;
    row_of[tid] = inside ? r : -1;
  }
  __syncthreads();

  const T* grad = p.g + group * p.d_out * p.d_in + o0 * p.d_in;
  const bool a_m_fast = p.a_sf != 1;
  Tile<T, kTile, BF, true> x_tile, g_tile;
  auto fetch = [&](int64_t f0) {
    x_tile.load(p.a + f0 * p.a_sf, TableRows{a_off}, p.a_sf, p.d_in - f0, a_m_fast, tid);
    g_tile.load(grad + f0, StridedRows{p.d_in, p.d_out - o0}, 1, p.d_in - f0, false, tid);
  };

  Product product;
  product.clear();
  fetch(0);
  for (int64_t f0 = 0; f0 < p.d_in; f0 += BF) {
    __syncthreads();
    x_tile.store(xs, LD, a_m_fast, tid);
    g_tile.store(gs, LD, false, tid);
    __syncthreads();
    if (f0 + BF < p.d_in) fetch(f0 + BF);
    product.template multiply<BF>(xs, gs, LD, ty, tx);
  }
  T acc[kMicro][kMicro];
  product.micro(acc, scratch, ty, tx);

  // partial[tx][m]: the position's sum over this thread's 4 outputs; then one sum per position and
  // one partial per run of positions of the same row (a row's positions in a tile are one run).
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int m = ty * kMicro + i;
    acc_t s = 0;
    if (d_off[m] >= 0) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t o = o0 + tx * kMicro + j;
        if (o < p.d_out) s += static_cast<acc_t>(acc[i][j]) * p.delta[d_off[m] + o * p.d_sf];
      }
    }
    partial[tx][m] = s;
  }
  __syncthreads();
  if (tid < kTile) {
    acc_t s = 0;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) s += partial[l][tid];
    partial[0][tid] = s;
  }
  __syncthreads();
  if (tid == 0) {
    const int64_t m_tile = m0 / kTile, o_tile = o0 / kTile;
    acc_t run = 0;
    for (int m = 0; m < kTile && row_of[m] >= 0; ++m) {
      run += partial[0][m];
      if (m + 1 == kTile || row_of[m + 1] != row_of[m]) {
        // Slot (row, m-tile - the row's first m-tile, o-tile) of `slots` x tiles_o per row.
        const int64_t row = row_of[m];
        const int64_t first_tile = row / p.groups * p.t / kTile;
        p.part_dot[(row * slots + (m_tile - first_tile)) * tiles_o + o_tile] = run;
        run = 0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host
// ---------------------------------------------------------------------------------------------

unsigned grid_size(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= INT_MAX, "fastdal (cuda): linear_sample_score: too many blocks (", blocks, ") for ", what);
  return static_cast<unsigned>(blocks);
}

// Sums the (n, per_row) partials of each row into out, in a fixed order.
template <typename T>
void sum_partials(const at::Tensor& part, int64_t n, int64_t per_row, T* out, cudaStream_t stream) {
  sum_partials_kernel<T><<<grid_size(ceil_div(n, kThreads / 32), "the row sums"), kThreads, 0, stream>>>(
      part.data_ptr<acc_t>(), n, per_row, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// P: the kernels' precision (kIeee for float64, and where the device code has no tensor cores).
template <typename T, Precision P>
void run(SampleArgs<T> p, bool ghost, const at::Tensor& sq, const at::Tensor& dot) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto partials = [&](int64_t per_row, bool zeroed) {
    const auto options = sq.options().dtype(at::kDouble);
    return zeroed ? at::zeros({p.n, per_row}, options) : at::empty({p.n, per_row}, options);
  };
  if (!ghost) {
    const int64_t tiles_o = ceil_div(p.d_out, kTile), tiles_i = ceil_div(p.d_in, kTile);
    // Every slot is written by its block: no zeroing needed.
    const at::Tensor part_sq = partials(tiles_o * tiles_i, false);
    const at::Tensor part_dot = p.g != nullptr ? partials(tiles_o * tiles_i, false) : at::Tensor();
    p.part_sq = part_sq.data_ptr<acc_t>();
    p.part_dot = p.g != nullptr ? part_dot.data_ptr<acc_t>() : nullptr;
    direct_kernel<T, P><<<grid_size(p.n * tiles_o * tiles_i, "the direct norm"), kThreads, 0, stream>>>(
        p, tiles_o, tiles_i);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials(part_sq, p.n, tiles_o * tiles_i, p.sq, stream);
    if (p.g != nullptr) sum_partials(part_dot, p.n, tiles_o * tiles_i, p.dot, stream);
    return;
  }
  if (p.t <= kSmallT) {
    ghost_gram_small_kernel<T><<<grid_size(p.n, "the ghost norm"), kThreads, 0, stream>>>(p);  // writes sq
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t tiles_t = ceil_div(p.t, kTile), pairs = tiles_t * (tiles_t + 1) / 2;
    const at::Tensor part_sq = partials(pairs, false);
    p.part_sq = part_sq.data_ptr<acc_t>();
    ghost_gram_kernel<T, P><<<grid_size(p.n * pairs, "the ghost norm"), kThreads, 0, stream>>>(p, tiles_t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials(part_sq, p.n, pairs, p.sq, stream);
  }
  if (p.g != nullptr) {
    const int64_t tiles_m = ceil_div(p.n / p.groups * p.t, kTile), tiles_o = ceil_div(p.d_out, kTile);
    // A row's T positions touch at most (T - 1) / kTile + 2 m-tiles; slots a row does not touch
    // stay zero.
    const int64_t slots = (p.t - 1) / kTile + 2;
    const at::Tensor part_dot = partials(slots * tiles_o, true);
    p.part_dot = part_dot.data_ptr<acc_t>();
    ghost_dot_kernel<T, P><<<grid_size(p.groups * tiles_m * tiles_o, "the ghost dot product"), kThreads, 0, stream>>>(
        p, tiles_m, tiles_o, slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials(part_dot, p.n, slots * tiles_o, p.dot, stream);
  }
}

// Tensor cores where asked for and compiled in (sm_80+); otherwise the SIMT kernels. float64
// ignores precision.
template <typename T>
void run_with(const SampleArgs<T>& p, Precision prec, bool ghost, const at::Tensor& sq, const at::Tensor& dot) {
  if constexpr (std::is_same_v<T, float>) {
    if (prec == Precision::kTf32x3 && has_tensor_cores(direct_kernel<float, Precision::kTf32x3>)) {
      return run<float, Precision::kTf32x3>(p, ghost, sq, dot);
    }
    if (prec == Precision::kTf32 && has_tensor_cores(direct_kernel<float, Precision::kTf32>)) {
      return run<float, Precision::kTf32>(p, ghost, sq, dot);
    }
  }
  run<T, Precision::kIeee>(p, ghost, sq, dot);
}

std::tuple<at::Tensor, at::Tensor> linear_sample_score_cuda(const at::Tensor& a, const at::Tensor& delta,
                                                            const std::optional<at::Tensor>& weight_grad,
                                                            int64_t groups, bool ghost, std::string_view precision) {
  const Precision prec = precision_of(precision);
  check_float_tensor(a, "a", 3);
  check_float_tensor(delta, "delta", 3);
  check_like(delta, "delta", a, "a");
  const int64_t n = a.size(0), t = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  TORCH_CHECK(delta.size(0) == n && delta.size(1) == t, "fastdal (cuda): delta must be (", n, ", ", t,
              ", d_out) to match a, got ", delta.sizes());
  TORCH_CHECK(groups >= 1 && n % groups == 0, "fastdal (cuda): groups must be a positive integer dividing N=", n,
              ", got ", groups);
  if (weight_grad.has_value()) {
    check_float_tensor(*weight_grad, "weight_grad", 3);
    check_like(*weight_grad, "weight_grad", a, "a");
    check_contiguous(*weight_grad, "weight_grad");
    TORCH_CHECK(weight_grad->size(0) == groups && weight_grad->size(1) == d_out && weight_grad->size(2) == d_in,
                "fastdal (cuda): weight_grad must be (", groups, ", ", d_out, ", ", d_in, "), got ",
                weight_grad->sizes());
  }
  const c10::cuda::CUDAGuard guard(a.device());
  auto sq = at::zeros({n}, a.options());
  auto dot = at::zeros({n}, a.options());
  if (n == 0 || t == 0 || d_in == 0 || d_out == 0) return {sq, dot};  // g = 0
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_sample_score_cuda", [&] {
    const SampleArgs<scalar_t> p{a.data_ptr<scalar_t>(),
                                 delta.data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(weight_grad),
                                 n,
                                 t,
                                 d_in,
                                 d_out,
                                 groups,
                                 a.stride(0),
                                 a.stride(1),
                                 a.stride(2),
                                 delta.stride(0),
                                 delta.stride(1),
                                 delta.stride(2),
                                 nullptr,
                                 nullptr,
                                 sq.data_ptr<scalar_t>(),
                                 dot.data_ptr<scalar_t>()};
    run_with(p, prec, ghost, sq, dot);
  });
  return {sq, dot};
}

}  // namespace
}  // namespace fastdal::cuda

TORCH_LIBRARY_IMPL(fastdal, CUDA, m) { m.impl("linear_sample_score", &fastdal::cuda::linear_sample_score_cuda); }
