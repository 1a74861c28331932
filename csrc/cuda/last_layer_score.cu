// fastdal::last_layer_score on CUDA.
//
// Per row h_i of h (N, D), with W (K, D), b (K), G_W (K, D), G_b (K) (fastdal/ops.py states the op):
//   z = W h_i + b,  yhat = argmax z (first maximum),  e = softmax(z) - onehot(yhat),  c = G_W h_i + G_b,
//   sq_norm = ||e||^2 (||h_i||^2 [G_W given] + 1 [G_b given]),  dot = e . c,  score = sq_norm + gamma dot.
// A row with a non-finite logit gets NaN score, sq_norm and dot.
//
// Tiling. A block owns a tile of rows and walks the classes in tiles; for each class tile it
// computes z and c for all (row, class) pairs of the tile as a SIMT GEMM over D: chunks of 64 bytes
// of D of h, W and G_W are staged in shared memory (the next chunk is fetched into registers while
// the current one is multiplied), and a thread accumulates a TM rows x TN classes micro-tile of z
// and of c in registers. Shared memory returns one 4-byte register a lane per cycle, a quarter of
// the SM's multiply-add rate, so the micro-tile is what keeps the kernel off that limit. Two shapes:
// * K <= 16: a thread takes 2 rows and all classes (TN = K rounded up to 4), a block 512 rows; all
//   lanes of a warp read the same W values. h is read from global memory exactly once: the
//   bandwidth-bound case (N = 1M, D = 2048, K = 10 streams 8 GB of h).
//   (float64 with G_W and 12 < K <= 16 takes the wide shape instead, which would spill here.)
// * larger K: 8 rows x 4 classes a thread, 8 adjacent lanes a row group, 256 rows x 32 classes a
//   block; h is re-read (mostly from L2) once per class tile. The transposed W and G_W chunks are
//   stored in a swizzled order that keeps the stores free of bank conflicts (RowChunk::store).
// Precision: "ieee", float64 and K <= 16 run these SIMT (FFMA) kernels; float32 with K > 16 and
// "tf32x3" (the default) or "tf32" runs last_layer_tc_kernel below on TF32 tensor cores, where the
// device code has them (sm_80 on), and the SIMT wide shape elsewhere.
// At the end of a class tile each thread folds its values into one online-softmax state per row,
// the row group's lanes merge theirs by shuffles, and one lane merges the result into the row's
// state in shared memory; no N x K array exists. When the row tiles alone cannot fill the GPU
// (small N, large K), the class tiles are split over blockIdx.y, each split writes its per-row
// states, and a second kernel merges them.
//
// Online softmax, stable for confident rows: a state holds the max m (at index yhat, with c_yhat)
// and, over the classes k != yhat seen so far, s' = sum exp(z_k - m), s2' = sum exp(2 (z_k - m)),
// sc' = sum exp(z_k - m) c_k. States merge by keeping the earlier maximum (larger value, lower index
// on ties) and adding the other's sums scaled by r = exp(m_other - m) (r^2 for s2') together with
// the other maximum's own term (1, 1, c). With s = 1 + s' in the end:
//   ||e||^2 = s2'/s^2 + (s'/s)^2,   e . c = (sc' - c_yhat s') / s,
// sums of positive terms, where the textbook s2/s^2 - 2/s + 1 cancels to noise when p_yhat ~ 1.
// The states run in double whatever the input dtype: one exp per (row, class) is nothing next to
// the 2D multiply-adds behind each logit. The logits themselves are rounded to the GEMM dtype T, as
// the torch backend's are.
//
// Dtypes. h, W and b come in one dtype In: float32, float64, or (a half model's head) float16 or
// bfloat16; G_W, G_b, the GEMMs' sums and the outputs in T: In, or float32 for a half In (the dtype
// of a half model's G). A half chunk is converted to float32 as it goes from registers to shared
// memory, so every kernel below multiplies float32 whatever In is; global loads move half the bytes.
// On tensor cores a half value is exact in TF32 (11 or 8 significant bits fit TF32's 11), so z = W h
// runs as one TF32 product, exact, where "tf32x3" would add two products of zero low parts; c = G_W h
// keeps the requested precision (G_W is float32). "ieee" and K <= 16 stay SIMT, as for float32.
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "common.cuh"

namespace fastdal::cuda {
namespace {

struct SoftmaxState {
  acc_t m, c, s, s2, sc;  // max logit, c at it, s', s2', sc'
  int idx;                // yhat; -1 while no class has been seen
  bool bad;               // a non-finite logit was seen
};

__device__ __forceinline__ SoftmaxState empty_state() { return {0, 0, 0, 0, 0, -1, false}; }

// Whether the maximum (ma at ia) comes before (mb at ib) as argmax: the larger value, the lower index
// on ties, and NaN above everything, as torch.argmax has it.
__device__ __forceinline__ bool comes_first(acc_t ma, int ia, acc_t mb, int ib) {
  const bool na = isnan(ma), nb = isnan(mb);
  if (na || nb) return na && (!nb || ia < ib);
  return ma > mb || (ma == mb && ia < ib);
}

__device__ __forceinline__ void merge(SoftmaxState& a, const SoftmaxState& b) {
  if (b.idx < 0) return;
  if (a.idx < 0) {
    a = b;
    return;
  }
  // Field by field selects, not a reference to the winner: states stay in registers.
  const bool keep = comes_first(a.m, a.idx, b.m, b.idx);
  const acc_t win_s = keep ? a.s : b.s, win_s2 = keep ? a.s2 : b.s2, win_sc = keep ? a.sc : b.sc;
  const acc_t lose_m = keep ? b.m : a.m, lose_c = keep ? b.c : a.c;
  const acc_t lose_s = keep ? b.s : a.s, lose_s2 = keep ? b.s2 : a.s2, lose_sc = keep ? b.sc : a.sc;
  const acc_t win_m = keep ? a.m : b.m;
  const acc_t r = exp(lose_m - win_m);  // <= 1; NaN only where a logit is non-finite (bad)
  a.c = keep ? a.c : b.c;
  a.idx = keep ? a.idx : b.idx;
  a.m = win_m;
  a.s = win_s + r * (1 + lose_s);
  a.s2 = win_s2 + r * r * (1 + lose_s2);
  a.sc = win_sc + r * (lose_c + lose_sc);
  a.bad = a.bad || b.bad;
}

__device__ __forceinline__ void push(SoftmaxState& st, acc_t z, acc_t c, int k) {
  merge(st, SoftmaxState{z, c, 0, 0, 0, k, !isfinite(z)});
}

__device__ __forceinline__ SoftmaxState shfl_xor(const SoftmaxState& st, int offset) {
  constexpr unsigned all = 0xffffffffu;
  return {__shfl_xor_sync(all, st.m, offset),  __shfl_xor_sync(all, st.c, offset),
          __shfl_xor_sync(all, st.s, offset),  __shfl_xor_sync(all, st.s2, offset),
          __shfl_xor_sync(all, st.sc, offset), __shfl_xor_sync(all, st.idx, offset),
          __shfl_xor_sync(all, static_cast<int>(st.bad), offset) != 0};
}

template <typename T>
struct Outputs {
  T* score;
  T* sq;
  T* dot;
  int64_t* label;
};

// scale: ||h||^2 [G_W given] + 1 [G_b given].
template <typename T>
__device__ void write_row(const SoftmaxState& st, acc_t scale, double gamma, const Outputs<T>& out, int64_t row) {
  out.label[row] = st.idx;
  if (st.bad) {
    const T not_a_number = static_cast<T>(::nan(""));
    out.score[row] = out.sq[row] = out.dot[row] = not_a_number;
    return;
  }
  const acc_t s = 1 + st.s;
  const acc_t e_sq = st.s2 / (s * s) + (st.s / s) * (st.s / s);
  const acc_t sq = e_sq * scale;
  const acc_t dot = (st.sc - st.c * st.s) / s;
  out.sq[row] = static_cast<T>(sq);
  out.dot[row] = static_cast<T>(dot);
  out.score[row] = static_cast<T>(sq + gamma * dot);
}

// In: the dtype of h, W and b; T: that of G_W, G_b, the GEMMs and the outputs (see "Dtypes" above).
template <typename In, typename T>
struct HeadArgs {
  const In* h;
  const In* w;
  const In* b;  // nullable
  const T* gw;  // nullable
  const T* gb;  // nullable
  int64_t n, d;
  int k;
  int tiles_per_split;  // class tiles per blockIdx.y
  double gamma;
  Outputs<T> out;       // written directly when gridDim.y == 1
  SoftmaxState* part;   // (gridDim.y, n) per-split states otherwise ...
  acc_t* scale;         // ... and (n) the scale of each row
};

// A thread owns TM rows (ty, ty + NTY, ...) and TN consecutive classes of each class tile; the NTX
// threads of a row group are adjacent lanes. A block covers BLOCK_N = NTY TM rows and BLOCK_K = NTX TN
// classes. Per D step a thread loads TM values of h and TN of W and of G_W from shared memory and does
// 2 TM TN multiply-adds: shared memory returns one register a lane per cycle, so the micro-tile must
// be large for the multiply-adds, not the loads, to set the pace.
template <int TM_, int TN_, int NTX_>
struct Shape {
  static constexpr int TM = TM_, TN = TN_, NTX = NTX_;
  static constexpr int NTY = kThreads / NTX;
  static constexpr int BLOCK_N = NTY * TM;
  static constexpr int BLOCK_K = NTX * TN;
  // Shapes with one lane a row serve K <= BLOCK_K only: a single class tile, whose states are
  // folded once, at the end, and need no storage.
  static constexpr bool ONE_TILE = NTX == 1;
  static_assert(kThreads % NTX == 0 && 32 % NTX == 0, "the threads of a row group share a warp");
};

// K <= 16: one class tile; a thread computes all TN classes (K rounded up to 4, so that K = 10
// computes 12 columns, not 16) of 2 rows, and all lanes of a warp read the same W values (a
// broadcast). h is read from global memory once: the bandwidth-bound case.
template <int TN>
using NarrowShape = Shape<2, TN, 1>;
// Larger K: 8 rows x 4 classes a thread, 8 lanes a row group; 256 rows x 32 classes a block.
using WideShape = Shape<8, 4, 8>;

// VEC consecutive elements of T moved as one access: float4 or double2 (16 bytes), an aligned pack of
// 16-bit values (four halves: 8 bytes), or T itself for VEC = 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T x[VEC];
};
template <typename T, int VEC>
using Vec = std::conditional_t<
    VEC == 1, T,
    std::conditional_t<std::is_same_v<T, float> && VEC == 4, float4,
                       std::conditional_t<std::is_same_v<T, double> && VEC == 2, double2, Packed<T, VEC>>>>;

// A ROWS x COLS chunk of a row-major matrix of In (leading dimension ld) on its way to shared memory
// of T, in registers as In (converted to T by the store), loaded VEC elements at a time: COLS / VEC
// consecutive threads read a row's chunk (whole sectors), and a thread's loads are a few rows apart,
// so only a few addresses stay live. With VEC > 1 the caller guarantees ld % VEC == 0 and a matrix
// aligned to VEC elements.
template <typename In, typename T, int ROWS, int COLS, int VEC>
struct RowChunk {
  static constexpr int kVecsPerRow = COLS / VEC;
  static constexpr int kRowsPerPass = kThreads / kVecsPerRow;
  static constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
  static_assert(COLS % VEC == 0 && kThreads % kVecsPerRow == 0, "chunk shape");
  using V = Vec<In, VEC>;
  static_assert(sizeof(V) == VEC * sizeof(In), "VEC elements a vector");
  V v[kPasses];

  __device__ __forceinline__ static int row_of(int pass, int tid) { return tid / kVecsPerRow + pass * kRowsPerPass; }
  __device__ __forceinline__ static int col_of(int tid) { return tid % kVecsPerRow * VEC; }

  // Rows from `rows` on and columns from `cols` on read as zero.
  __device__ __forceinline__ void load(const In* __restrict__ base, int64_t ld, int64_t rows, int64_t cols, int tid) {
    const int c = col_of(tid);
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int r = row_of(pass, tid);
      if (ROWS % kRowsPerPass != 0 && r >= ROWS) break;
      if (r < rows && c < cols) {
        v[pass] = *reinterpret_cast<const V*>(base + r * ld + c);
      } else {
        v[pass] = V{};
      }
    }
  }

  // Into s[r * lds + c], or s[c * lds + r] when TRANSPOSED.
  //
  // Transposed float4 chunks (the W and G_W tiles of the wide shape, lds = 36): the 4 threads q of a
  // row hold columns 4q..4q+3, and storing element j of all of them at once would put q and q + 2 on
  // the same banks (4 q lds = 16 q mod 32), a 2-way conflict on every store. Threads with q & 2 store
  // their elements in the order j ^ 2 instead: for lds = 4 mod 32 the warp's 8 rows x 4 threads then
  // cover the 32 banks exactly once a store. (A select of two compile-time indices, not a
  // dynamically indexed array: the values stay in registers.)
  //
  // Row-major VEC > 1 chunks whose rows are whole vectors (lds % VEC == 0, the staging of the
  // tensor-core kernel) go as one 16-byte store a vector (after conversion, for a half In): a
  // quarter-warp then writes 128 contiguous bytes of one row, free of bank conflicts.
  template <bool TRANSPOSED>
  __device__ __forceinline__ void store(T* s, int lds, int tid) const {
    const int c = col_of(tid);
    if constexpr (!TRANSPOSED && VEC > 1) {
      if (lds % VEC == 0) {
#pragma unroll
        for (int pass = 0; pass < kPasses; ++pass) {
          const int r = row_of(pass, tid);
          if (ROWS % kRowsPerPass != 0 && r >= ROWS) break;
          if constexpr (std::is_same_v<In, T>) {
            *reinterpret_cast<V*>(s + r * lds + c) = v[pass];
          } else {
            const In* e = reinterpret_cast<const In*>(&v[pass]);
            Vec<T, VEC> out;
            T* o = reinterpret_cast<T*>(&out);
#pragma unroll
            for (int j = 0; j < VEC; ++j) o[j] = static_cast<T>(e[j]);
            *reinterpret_cast<Vec<T, VEC>*>(s + r * lds + c) = out;
          }
        }
        return;
      }
    }
    constexpr bool kSwizzle = TRANSPOSED && VEC == 4 && std::is_same_v<T, float>;
    const bool swap = kSwizzle && (c / VEC) % 4 >= 2;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int r = row_of(pass, tid);
      if (ROWS % kRowsPerPass != 0 && r >= ROWS) break;
      const In* e = reinterpret_cast<const In*>(&v[pass]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if constexpr (kSwizzle) {
          const int jj = swap ? (j ^ 2) : j;
          s[(c + jj) * lds + r] = static_cast<T>(swap ? e[j ^ 2] : e[j]);
        } else {
          s[TRANSPOSED ? (c + j) * lds + r : r * lds + c + j] = static_cast<T>(e[j]);
        }
      }
    }
  }
};

// A row's final state: to the outputs, or, when the class tiles are split over blockIdx.y, to the
// split's slot (with the row's scale, once) for merge_splits_kernel.
template <typename In, typename T>
__device__ __forceinline__ void finish_row(const HeadArgs<In, T>& p, const SoftmaxState& st, acc_t scale,
                                           int64_t row) {
  if (gridDim.y == 1) {
    write_row(st, scale, p.gamma, p.out, row);
  } else {
    p.part[blockIdx.y * p.n + row] = st;
    if (blockIdx.y == 0) p.scale[row] = scale;
  }
}

// VEC: elements of a global load (1, or 16 bytes when D and the pointers allow); fewer, wider loads
// keep the registers holding the next chunk few.
template <typename In, typename T, typename S, bool HAS_GW, int VEC>
__global__ void __launch_bounds__(kThreads, 1) last_layer_kernel(const HeadArgs<In, T> p) {
  constexpr int BN = S::BLOCK_N, BK = S::BLOCK_K, TM = S::TM, TN = S::TN, NTX = S::NTX, NTY = S::NTY;
  constexpr int BD = 64 / sizeof(T);  // 64 bytes of each row a chunk: two full sectors
  constexpr bool kOneTile = S::ONE_TILE;
  // h is stored as [row][d] with an odd row length: the rows of a warp at one d hit distinct banks.
  // W and G_W are stored transposed, [d][class]: a thread's TN classes at one d are contiguous
  // (vector loads), rows padded to 16 bytes.
  constexpr int LDH = BD + 1, LDW = BK + kPad<T>;
  __shared__ __align__(16) T hs[BN * LDH];
  __shared__ __align__(16) T ws[BD * LDW];
  __shared__ __align__(16) T gs[HAS_GW ? BD * LDW : 1];
  // Per row, owned by the row group's lane tx = 0 (no other thread touches it): ||h||^2 and, over
  // several class tiles, the online-softmax state.
  __shared__ acc_t row_hsq[BN];
  __shared__ SoftmaxState row_state[kOneTile ? 1 : BN];

  const int tid = threadIdx.x;
  const int ty = tid / NTX, tx = tid % NTX;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t d = p.d;
  const int k_tiles = static_cast<int>(ceil_div(p.k, BK));
  const int kt_begin = blockIdx.y * p.tiles_per_split;
  const int kt_end = min(kt_begin + p.tiles_per_split, k_tiles);
  const int d_chunks = d > 0 ? static_cast<int>(ceil_div(d, BD)) : 1;
  const int steps = (kt_end - kt_begin) * d_chunks;

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      row_hsq[ty + NTY * i] = 0;
      if constexpr (!kOneTile) row_state[ty + NTY * i] = empty_state();
    }
  }

  RowChunk<In, T, BN, BD, VEC> h_chunk;
  RowChunk<In, T, BK, BD, VEC> w_chunk;
  RowChunk<T, T, BK, BD, VEC> g_chunk;
  auto fetch = [&](int step) {
    const int64_t k0 = static_cast<int64_t>(kt_begin + step / d_chunks) * BK;
    const int64_t d0 = static_cast<int64_t>(step % d_chunks) * BD;
    h_chunk.load(p.h + row0 * d + d0, d, p.n - row0, d - d0, tid);
    w_chunk.load(p.w + k0 * d + d0, d, p.k - k0, d - d0, tid);
    if constexpr (HAS_GW) g_chunk.load(p.gw + k0 * d + d0, d, p.k - k0, d - d0, tid);
  };

  // The row's final state: to the outputs, or to the split's slot.
  auto finish = [&](const SoftmaxState& st, int local_row) {
    const int64_t row = row0 + local_row;
    if (row >= p.n) return;
    finish_row(p, st, (HAS_GW ? row_hsq[local_row] : acc_t(0)) + (p.gb ? 1 : 0), row);
  };

  T acc_z[TM][TN], acc_c[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc_z[i][j] = acc_c[i][j] = T(0);

  fetch(0);
  for (int step = 0; step < steps; ++step) {
    __syncthreads();  // the previous chunk has been read by all
    h_chunk.template store<false>(hs, LDH, tid);
    w_chunk.template store<true>(ws, LDW, tid);
    if constexpr (HAS_GW) g_chunk.template store<true>(gs, LDW, tid);
    __syncthreads();
    if (step + 1 < steps) fetch(step + 1);  // in flight while this chunk is multiplied

    const int kt = kt_begin + step / d_chunks;
    const bool first_tile = kt == kt_begin;  // ||h||^2 rides along the first class tile
    T h_sq[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) h_sq[i] = T(0);
#pragma unroll
    for (int dd = 0; dd < BD; ++dd) {
      T hv[TM], wv[TN], gv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) hv[i] = hs[(ty + NTY * i) * LDH + dd];
      load_vec(ws + dd * LDW + tx * TN, wv);
      if constexpr (HAS_GW) load_vec(gs + dd * LDW + tx * TN, gv);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          acc_z[i][j] = fma(hv[i], wv[j], acc_z[i][j]);
          if constexpr (HAS_GW) acc_c[i][j] = fma(hv[i], gv[j], acc_c[i][j]);
        }
        if (HAS_GW && first_tile) h_sq[i] = fma(hv[i], hv[i], h_sq[i]);
      }
    }
    if (HAS_GW && first_tile && tx == 0) {
#pragma unroll
      for (int i = 0; i < TM; ++i) row_hsq[ty + NTY * i] += h_sq[i];
    }

    if (step % d_chunks == d_chunks - 1) {  // the class tile is complete: fold it in, row by row
      const int k0 = kt * BK + tx * TN;
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        SoftmaxState st = empty_state();
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int k = k0 + j;
          if (k < p.k) {
            // The logit is rounded to T, as the torch backend's is.
            const T z = acc_z[i][j] + (p.b ? static_cast<T>(p.b[k]) : T(0));
            const acc_t c = (HAS_GW ? static_cast<acc_t>(acc_c[i][j]) : acc_t(0)) + (p.gb ? p.gb[k] : T(0));
            push(st, z, c, k);
          }
          acc_z[i][j] = acc_c[i][j] = T(0);
        }
        // Across the row group's lanes; the order only affects rounding, ties go to the lower
        // index whatever it is.
#pragma unroll
        for (int offset = 1; offset < NTX; offset *= 2) merge(st, shfl_xor(st, offset));
        if (tx == 0) {
          if constexpr (kOneTile) {
            finish(st, ty + NTY * i);
          } else {
            merge(row_state[ty + NTY * i], st);
          }
        }
      }
    }
  }
  if constexpr (!kOneTile) {
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < TM; ++i) finish(row_state[ty + NTY * i], ty + NTY * i);
    }
  }
}

// Tensor cores (float32, precision "tf32x3" or "tf32", K > 16: the GEMM-bound shapes). A block owns
// 128 rows x 32 classes a class tile; warp w computes rows 16 w.. of the tile: the 16 x 32 blocks of
// z = h W^T and c = h G_W^T as two 16 x 16 TF32 WMMA fragments each (tc::warp_mma, 3xTF32 by
// default), fed from 32-float chunks of D staged in shared memory (the next chunk is fetched into
// registers while the current one is multiplied). h is staged as [row][d] (matrix_a, row-major) and
// W, G_W as they lie in memory, [class][d], which is matrix_b (d x class) in column-major: no
// transposed stores. Fragment loads with a leading dimension of 36 floats hit 32 distinct banks.
// When the class tile is complete, the fragments go to a z and a c scratch tile in shared memory
// (overlaying the staging buffers, which are consumed by then), and each row is folded by the
// same 2 threads every tile, 16 classes each, into an online-softmax state that lives in the
// registers of those threads; ||h||^2 rides along the first class tile in the same threads.
// (K <= 16 stays on the SIMT narrow shape above: it reads h once and is bandwidth-bound, so tensor
// cores would not speed it up.) h is re-read, mostly from L2, once per class tile.
struct TcShape {
  static constexpr int BLOCK_N = 128, BLOCK_K = 32;
  static constexpr bool ONE_TILE = false;
  static constexpr int BD = 32;                 // floats of D a chunk
  static constexpr int LD = BD + 4;             // staging leading dimension (WMMA: multiple of 4 floats)
  static constexpr int LDS = BLOCK_K + 4;       // scratch leading dimension
  static constexpr int kWarps = kThreads / 32;  // 8 warps x 16 rows = BLOCK_N
  static_assert(kWarps * tc::kM == BLOCK_N && 2 * tc::kN == BLOCK_K, "a warp: 16 rows x 32 classes");
  static_assert(2 * BLOCK_N == kThreads, "two threads fold each row");
};

template <Precision P, typename In, bool HAS_GW, int VEC>
__global__ void __launch_bounds__(kThreads, 1) last_layer_tc_kernel(const HeadArgs<In, float> p) {
#if FASTDAL_TENSOR_CORES
  using S = TcShape;
  // A half h and W are exact in TF32: z's one TF32 product is exact ("Dtypes" above).
  constexpr Precision PZ = std::is_same_v<In, float> ? P : Precision::kTf32;
  constexpr int BN = S::BLOCK_N, BK = S::BLOCK_K, BD = S::BD, LD = S::LD, LDS = S::LDS;
  constexpr int kStage = (BN + (HAS_GW ? 2 : 1) * BK) * LD;   // h, W, G_W chunks
  constexpr int kScratch = (HAS_GW ? 2 : 1) * BN * LDS;        // z, c tiles
  __shared__ __align__(128) float smem[kStage > kScratch ? kStage : kScratch];
  float* const hs = smem;
  float* const ws = hs + BN * LD;
  float* const gs = ws + BK * LD;  // HAS_GW only
  float* const zs = smem;          // overlays the staging buffers once a class tile is multiplied
  float* const cs = zs + BN * LDS;  // HAS_GW only

  const int tid = threadIdx.x, warp = tid / 32;
  const int fold_row = tid / 2, half = tid % 2;  // this thread folds classes 16 half.. of row fold_row
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t d = p.d;
  const int k_tiles = static_cast<int>(ceil_div(p.k, BK));
  const int kt_begin = blockIdx.y * p.tiles_per_split;
  const int kt_end = min(kt_begin + p.tiles_per_split, k_tiles);
  const int d_chunks = d > 0 ? static_cast<int>(ceil_div(d, BD)) : 1;
  const int steps = (kt_end - kt_begin) * d_chunks;

  RowChunk<In, float, BN, BD, VEC> h_chunk;
  RowChunk<In, float, BK, BD, VEC> w_chunk;
  RowChunk<float, float, BK, BD, VEC> g_chunk;
  auto fetch = [&](int step) {
    const int64_t k0 = static_cast<int64_t>(kt_begin + step / d_chunks) * BK;
    const int64_t d0 = static_cast<int64_t>(step % d_chunks) * BD;
    h_chunk.load(p.h + row0 * d + d0, d, p.n - row0, d - d0, tid);
    w_chunk.load(p.w + k0 * d + d0, d, p.k - k0, d - d0, tid);
    if constexpr (HAS_GW) g_chunk.load(p.gw + k0 * d + d0, d, p.k - k0, d - d0, tid);
  };

  tc::Acc acc_z[1][2], acc_c[1][2];
  tc::fill_zero(acc_z);
  tc::fill_zero(acc_c);
  SoftmaxState state = empty_state();  // row fold_row, complete in the even thread after each fold
  acc_t h_sq = 0;                      // this thread's half of ||h||^2 of row fold_row

  fetch(0);
  for (int step = 0; step < steps; ++step) {
    __syncthreads();  // the previous chunk (or scratch tile) has been read by all
    h_chunk.template store<false>(hs, LD, tid);
    w_chunk.template store<false>(ws, LD, tid);
    if constexpr (HAS_GW) g_chunk.template store<false>(gs, LD, tid);
    __syncthreads();
    if (step + 1 < steps) fetch(step + 1);  // in flight while this chunk is multiplied

    const int kt = kt_begin + step / d_chunks;
    const float* const a = hs + warp * tc::kM * LD;
    tc::warp_mma<PZ, 1, 2, BD / tc::kK, tc::row_major, tc::col_major>(acc_z, a, LD, ws, LD);
    if constexpr (HAS_GW) {
      tc::warp_mma<P, 1, 2, BD / tc::kK, tc::row_major, tc::col_major>(acc_c, a, LD, gs, LD);
      if (kt == kt_begin) {  // ||h||^2 rides along the first class tile
#pragma unroll
        for (int j = 0; j < BD / 2; ++j) {
          const acc_t v = hs[fold_row * LD + half * (BD / 2) + j];
          h_sq = fma(v, v, h_sq);
        }
      }
    }

    if (step % d_chunks == d_chunks - 1) {  // the class tile is complete: fold it in
      __syncthreads();                      // every warp is done with the staging buffers
      tc::store(zs + warp * tc::kM * LDS, LDS, acc_z);
      if constexpr (HAS_GW) tc::store(cs + warp * tc::kM * LDS, LDS, acc_c);
      tc::fill_zero(acc_z);
      tc::fill_zero(acc_c);
      __syncthreads();
      SoftmaxState st = empty_state();
      const int k0 = kt * BK + half * (BK / 2);
#pragma unroll 4
      for (int j = 0; j < BK / 2; ++j) {
        const int k = k0 + j;
        if (k < p.k) {
          const int at = fold_row * LDS + half * (BK / 2) + j;
          const float z = zs[at] + (p.b ? static_cast<float>(p.b[k]) : 0.0f);  // rounded to float, as torch's
          const acc_t c = (HAS_GW ? static_cast<acc_t>(cs[at]) : acc_t(0)) + (p.gb ? p.gb[k] : 0.0f);
          push(st, z, c, k);
        }
      }
      merge(st, shfl_xor(st, 1));  // the row's other half; ties go to the lower index either way
      merge(state, st);
    }
  }

  const acc_t row_h_sq = h_sq + __shfl_xor_sync(0xffffffffu, h_sq, 1);
  const int64_t row = row0 + fold_row;
  if (half == 0 && row < p.n) finish_row(p, state, (HAS_GW ? row_h_sq : acc_t(0)) + (p.gb ? 1 : 0), row);
#endif
}

// Merges the per-split states of each row (one thread a row), in class order.
template <typename In, typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const HeadArgs<In, T> p, int splits) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= p.n) return;
  SoftmaxState st = p.part[row];
  for (int s = 1; s < splits; ++s) merge(st, p.part[s * p.n + row]);
  write_row(st, p.scale[row], p.gamma, p.out, row);
}

// Whether the kernels may load 16 bytes of T (kVec elements, 8 bytes of a half In) at a time: D a
// multiple of kVec and matrices aligned to kVec elements.
template <typename In, typename T>
bool vector_loads(const HeadArgs<In, T>& p) {
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* q, size_t bytes) { return reinterpret_cast<uintptr_t>(q) % bytes == 0; };
  return p.d % kVec == 0 && aligned(p.h, kVec * sizeof(In)) && aligned(p.w, kVec * sizeof(In)) &&
         (p.gw == nullptr || aligned(p.gw, 16));
}

// Launches kernel, whose tiles are S's, over the row tiles and (where needed) class-tile splits.
template <typename In, typename T, typename S>
void launch(HeadArgs<In, T> p, const at::Tensor& h, void (*kernel)(HeadArgs<In, T>)) {
  const int64_t row_tiles = ceil_div(p.n, S::BLOCK_N);
  const int64_t k_tiles = ceil_div(p.k, S::BLOCK_K);
  TORCH_CHECK(!S::ONE_TILE || k_tiles == 1, "fastdal (cuda): internal error: a one-tile shape for K = ", p.k);
  TORCH_CHECK(row_tiles <= INT_MAX, "fastdal (cuda): last_layer_score: too many rows (", p.n, ")");
  // Split the class tiles when the row tiles alone leave the GPU idle (two blocks an SM wanted).
  const int64_t wanted = 2 * static_cast<int64_t>(multiprocessor_count(h.get_device()));
  int64_t splits = 1;
  if (row_tiles < wanted && k_tiles > 1) splits = std::min(k_tiles, ceil_div(wanted, row_tiles));
  const int64_t per_split = ceil_div(k_tiles, splits);
  splits = ceil_div(k_tiles, per_split);  // no empty split
  p.tiles_per_split = static_cast<int>(per_split);

  at::Tensor part, scale;
  if (splits > 1) {
    part = at::empty({splits * p.n * static_cast<int64_t>(sizeof(SoftmaxState))}, h.options().dtype(at::kByte));
    scale = at::empty({p.n}, h.options().dtype(at::kDouble));
    p.part = reinterpret_cast<SoftmaxState*>(part.data_ptr<uint8_t>());
    p.scale = scale.data_ptr<acc_t>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    merge_splits_kernel<In, T><<<static_cast<unsigned>(ceil_div(p.n, kThreads)), kThreads, 0, stream>>>(
        p, static_cast<int>(splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename In, typename T, typename S, bool HAS_GW>
void launch_simt(const HeadArgs<In, T>& p, const at::Tensor& h) {
  constexpr int kVec = 16 / sizeof(T);
  launch<In, T, S>(p, h,
                   vector_loads(p) ? last_layer_kernel<In, T, S, HAS_GW, kVec> : last_layer_kernel<In, T, S, HAS_GW, 1>);
}

// The tensor-core kernel for a precision other than "ieee".
template <typename In, bool HAS_GW>
auto tc_kernel(Precision prec, bool vec) {
  if (prec == Precision::kTf32x3) {
    return vec ? last_layer_tc_kernel<Precision::kTf32x3, In, HAS_GW, 4>
               : last_layer_tc_kernel<Precision::kTf32x3, In, HAS_GW, 1>;
  }
  return vec ? last_layer_tc_kernel<Precision::kTf32, In, HAS_GW, 4> : last_layer_tc_kernel<Precision::kTf32, In, HAS_GW, 1>;
}

template <typename In, typename T, bool HAS_GW>
void dispatch_shape(const HeadArgs<In, T>& p, const at::Tensor& h, Precision prec) {
  if (p.k <= 4) return launch_simt<In, T, NarrowShape<4>, HAS_GW>(p, h);
  if (p.k <= 8) return launch_simt<In, T, NarrowShape<8>, HAS_GW>(p, h);
  if (p.k <= 12) return launch_simt<In, T, NarrowShape<12>, HAS_GW>(p, h);
  // float64 with G_W holds 2 x 16 doubles of z, of c and of W and G_W a step: more than 255
  // registers (ptxas spills). The wide shape serves K <= 32 as a single class tile too, so h is
  // still read once; it only computes 32 columns instead of 16.
  if constexpr (!(std::is_same_v<T, double> && HAS_GW)) {
    if (p.k <= 16) return launch_simt<In, T, NarrowShape<16>, HAS_GW>(p, h);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (prec != Precision::kIeee) {
      const auto kernel = tc_kernel<In, HAS_GW>(prec, vector_loads(p));
      if (has_tensor_cores(kernel)) return launch<In, float, TcShape>(p, h, kernel);
    }
  }
  launch_simt<In, T, WideShape, HAS_GW>(p, h);
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The dtype of G_W, G_b and the outputs: float32 for a half h, h's dtype otherwise ("Dtypes" above).
at::ScalarType accumulation_type(const at::Tensor& h) { return is_half(h.scalar_type()) ? at::kFloat : h.scalar_type(); }

void check_inputs(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& weight_grad, const std::optional<at::Tensor>& bias_grad) {
  TORCH_CHECK(h.is_cuda(), "fastdal (cuda): h must be a CUDA tensor, got one on ", h.device());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble || is_half(h.scalar_type()),
              "fastdal (cuda): h must be float32, float64, float16 or bfloat16, got ", h.scalar_type());
  TORCH_CHECK(h.dim() == 2, "fastdal (cuda): h must have 2 dimensions, got shape ", h.sizes());
  check_contiguous(h, "h");
  const int64_t d = h.size(1);
  TORCH_CHECK(weight.dim() == 2, "fastdal (cuda): weight must have 2 dimensions, got shape ", weight.sizes());
  check_like(weight, "weight", h, "h");
  check_contiguous(weight, "weight");
  const int64_t k = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, "fastdal (cuda): weight must be (K, ", d, ") to match h, got ", weight.sizes());
  TORCH_CHECK(k > 0 && k <= INT_MAX, "fastdal (cuda): weight must have between 1 and ", INT_MAX,
              " classes (rows), got ", weight.sizes());
  TORCH_CHECK(weight_grad.has_value() || bias_grad.has_value(),
              "fastdal (cuda): last_layer_score needs weight_grad, bias_grad or both");
  const at::ScalarType grad_type = accumulation_type(h);
  const auto check_grad_type = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == grad_type, "fastdal (cuda): ", name, " must be ", grad_type, " for an h of ",
                h.scalar_type(), " (float32 for a float16 or bfloat16 h, h's dtype otherwise), got ", t.scalar_type());
    TORCH_CHECK(t.device() == h.device(), "fastdal (cuda): ", name, " must be on the device of h (", h.device(),
                "), got ", t.device());
  };
  if (weight_grad.has_value()) {
    check_float_tensor(*weight_grad, "weight_grad", 2);
    check_grad_type(*weight_grad, "weight_grad");
    check_contiguous(*weight_grad, "weight_grad");
    TORCH_CHECK(weight_grad->sizes() == weight.sizes(), "fastdal (cuda): weight_grad must have the shape of weight ",
                weight.sizes(), ", got ", weight_grad->sizes());
  }
  for (const auto& [t, name] : {std::pair{&bias, "bias"}, std::pair{&bias_grad, "bias_grad"}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1, "fastdal (cuda): ", name, " must have 1 dimension, got shape ", (*t)->sizes());
    if (t == &bias) {
      check_like(**t, name, h, "h");
    } else {
      check_grad_type(**t, name);
    }
    check_contiguous(**t, name);
    TORCH_CHECK((*t)->size(0) == k, "fastdal (cuda): ", name, " must be (", k, ",) to match weight, got ",
                (*t)->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> last_layer_score_cuda(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& weight_grad, const std::optional<at::Tensor>& bias_grad, double gamma,
    std::string_view precision) {
  const Precision prec = precision_of(precision);
  check_inputs(h, weight, bias, weight_grad, bias_grad);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t n = h.size(0);
  const auto out = h.options().dtype(accumulation_type(h));
  auto score = at::empty({n}, out);
  auto sq = at::empty({n}, out);
  auto dot = at::empty({n}, out);
  auto label = at::empty({n}, h.options().dtype(at::kLong));
  if (n == 0) return {score, sq, dot, label};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "last_layer_score_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    HeadArgs<scalar_t, T> p{};
    p.h = h.data_ptr<scalar_t>();
    p.w = weight.data_ptr<scalar_t>();
    p.b = data_or_null<scalar_t>(bias);
    p.gw = data_or_null<T>(weight_grad);
    p.gb = data_or_null<T>(bias_grad);
    p.n = n;
    p.d = h.size(1);
    p.k = static_cast<int>(weight.size(0));
    p.gamma = gamma;
    p.out = {score.data_ptr<T>(), sq.data_ptr<T>(), dot.data_ptr<T>(), label.data_ptr<int64_t>()};
    if (p.gw != nullptr) {
      dispatch_shape<scalar_t, T, true>(p, h, prec);
    } else {
      dispatch_shape<scalar_t, T, false>(p, h, prec);
    }
  });
  return {score, sq, dot, label};
}

}  // namespace
}  // namespace fastdal::cuda

TORCH_LIBRARY_IMPL(fastdal, CUDA, m) { m.impl("last_layer_score", &fastdal::cuda::last_layer_score_cuda); }
