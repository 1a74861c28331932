// Helpers shared by the CUDA kernels of csrc/cuda: argument checks, the `precision` argument, a
// strided tile loader that stages global memory through registers into shared memory, vector loads
// from shared memory, tensor-core (TF32 WMMA) warp tiles, and block reductions.
//
// Every kernel of csrc/cuda is a small GEMM: a block stages a chunk of two operand tiles in shared
// memory and multiplies them, and the next chunk is fetched into registers while the current one is
// being multiplied (one shared buffer, two barriers a chunk). The multiply is either SIMT (each
// thread accumulates a micro-tile in registers with FFMA: precision "ieee", and always for float64)
// or, for float32 on sm_80+, tensor cores (each warp accumulates 16 x 16 WMMA fragments: "tf32x3",
// the default, or "tf32"; see the Tc section below). Inner products run in the input dtype, as the
// torch backend's GEMMs do; what is summed after them (softmax statistics, squared norms, dot
// products over a tile) runs in double, which costs little next to the GEMM and keeps float32
// results as accurate as the torch backend's.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mma.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

namespace fastdal {
// Defined in csrc/fastdal.cpp: 0 "ieee", 1 "tf32x3", 2 "tf32"; any other value is an error naming
// `precision` and the values allowed.
int parse_precision(std::string_view precision, const char* backend);
}  // namespace fastdal

namespace fastdal::cuda {

using acc_t = double;

constexpr int kThreads = 256;  // every kernel of csrc/cuda runs blocks of 256 threads

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Host side: argument checks
// ---------------------------------------------------------------------------------------------

inline void check_float_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "fastdal (cuda): ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastdal (cuda): ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "fastdal (cuda): ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastdal (cuda): ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastdal (cuda): ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fastdal (cuda): ", name, " must be contiguous, got strides ", t.strides());
}

inline int multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// How a float32 GEMM multiplies (the ops' `precision` argument); float64 is always kIeee.
enum class Precision : int { kIeee = 0, kTf32x3 = 1, kTf32 = 2 };

inline Precision precision_of(std::string_view precision) {
  return static_cast<Precision>(parse_precision(precision, "cuda"));
}

// Whether a kernel's code on this device came from sm_80+ (PTX or SASS), i.e. has its tensor-core
// path compiled in: device code below sm_80 compiles that path out (the TF32 WMMA instructions do
// not exist there), so the host launches the SIMT (kIeee) instantiation instead. Asked of the
// kernel itself, not of the device, since a build for older architectures may run on a newer GPU.
template <typename Kernel>
bool has_tensor_cores(Kernel* kernel) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)));
  return attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
}

// Data pointer of an optional tensor, nullptr when it is absent.
template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------

// Shared-memory rows are padded by 16 bytes: a transposed store then spreads over all banks, and
// rows stay 16-byte aligned for vector loads.
template <typename T>
constexpr int kPad = 16 / sizeof(T);

// N consecutive elements of shared memory into registers, in 16- or 8-byte loads where N and the
// (caller-guaranteed) alignment of p allow: a quarter of the load instructions of scalar loads.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  constexpr int kBytes = N * sizeof(T);
  if constexpr (kBytes % 16 == 0) {
    using V = std::conditional_t<std::is_same_v<T, float>, float4, double2>;
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < N / kPer; ++v) {
      const V x = reinterpret_cast<const V*>(p)[v];
      if constexpr (kPer == 4) {
        out[4 * v] = x.x, out[4 * v + 1] = x.y, out[4 * v + 2] = x.z, out[4 * v + 3] = x.w;
      } else {
        out[2 * v] = x.x, out[2 * v + 1] = x.y;
      }
    }
  } else if constexpr (std::is_same_v<T, float> && kBytes % 8 == 0) {
#pragma unroll
    for (int v = 0; v < N / 2; ++v) {
      const float2 x = reinterpret_cast<const float2*>(p)[v];
      out[2 * v] = x.x, out[2 * v + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v) out[v] = p[v];
  }
}

// Rows of a tile given by a stride: row r of the tile lies at r * stride; rows from `count` on are
// outside the matrix and read as zero.
struct StridedRows {
  int64_t stride;
  int64_t count;
  __device__ __forceinline__ int64_t offset(int r) const { return r < count ? r * stride : -1; }
};

// Rows of a tile given by a table in shared memory (-1: outside the matrix), for tiles whose rows
// are gathered from several samples.
struct TableRows {
  const int64_t* table;
  __device__ __forceinline__ int64_t offset(int r) const { return table[r]; }
};

// A ROWS x COLS tile of a strided matrix on its way to shared memory, held in registers: each of
// the kThreads threads holds ROWS * COLS / kThreads elements. Element (r, c) lies at
// base + rows.offset(r) + c * col_stride in global memory and goes to s[r * ld + c] in shared memory,
// or to s[c * ld + r] when TRANSPOSED.
//
// A warp's 32 elements run along the dimension of unit stride (`rows_fast` when that is the rows),
// so that it reads whole 32-byte sectors. Where that dimension is also contiguous in shared memory
// the warp takes up to 32 consecutive elements of one line; where it is not, 8 consecutive elements
// of 4 lines, which a row padding of kPad spreads over all 32 banks (float32).
template <typename T, int ROWS, int COLS, bool TRANSPOSED>
struct Tile {
  static_assert(ROWS % 8 == 0 && COLS % 8 == 0, "tile extents must be multiples of 8");
  static constexpr int kSize = ROWS * COLS;
  static constexpr int kPerThread = (kSize + kThreads - 1) / kThreads;
  T v[kPerThread];

  __host__ __device__ static constexpr int wide(int extent) { return extent % 32 == 0 ? 32 : (extent % 16 == 0 ? 16 : 8); }

  // (row, col) of the i-th element of thread tid.
  static __device__ __forceinline__ void position(int i, int tid, bool rows_fast, int& r, int& c) {
    const int e = i * kThreads + tid;
    const int warp = e / 32, lane = e % 32;
    const int extent = rows_fast ? ROWS : COLS;
    const int width = rows_fast == TRANSPOSED ? wide(extent) : 8;
    const int fast = (warp % (extent / width)) * width + lane % width;
    const int slow = (warp / (extent / width)) * (32 / width) + lane / width;
    r = rows_fast ? fast : slow;
    c = rows_fast ? slow : fast;
  }

  template <typename Rows>
  __device__ __forceinline__ void load(const T* __restrict__ base, const Rows& rows, int64_t col_stride,
                                       int64_t cols, bool rows_fast, int tid) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (kSize % kThreads != 0 && i * kThreads + tid >= kSize) break;
      int r, c;
      position(i, tid, rows_fast, r, c);
      const int64_t off = rows.offset(r);
      v[i] = (off >= 0 && c < cols) ? base[off + c * col_stride] : T(0);
    }
  }

  __device__ __forceinline__ void store(T* s, int ld, bool rows_fast, int tid) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (kSize % kThreads != 0 && i * kThreads + tid >= kSize) break;
      int r, c;
      position(i, tid, rows_fast, r, c);
      s[TRANSPOSED ? c * ld + r : r * ld + c] = v[i];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Tensor cores (float32 only): TF32 WMMA m16n16k8 with fp32 accumulation
// ---------------------------------------------------------------------------------------------
//
// kTf32x3 splits each operand x into x_hi = tf32(x) (10 explicit mantissa bits, rounded to nearest)
// and x_lo = tf32(x - x_hi), and sums a_lo b_hi + a_hi b_lo + a_hi b_hi in fp32 (small terms
// first); the dropped a_lo b_lo is ~2^-22 relative, so the product is as accurate as fp32 FFMA
// (both are limited by the fp32 accumulation). kTf32 is the single product a_hi b_hi (~1e-3).
// Fragments are loaded from shared memory with an explicit leading dimension: ldm a multiple of 4
// floats and every fragment pointer 32-byte aligned, which the callers' layouts guarantee (tiles of
// 16 or 8 along the strided dimension times an ldm of 4k floats, buffers __align__(128)).
// FASTDAL_TENSOR_CORES is 1 where device code may use them; the host launches a tensor-core
// instantiation only where has_tensor_cores() says its device code has them.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTDAL_TENSOR_CORES 0
#else
#define FASTDAL_TENSOR_CORES 1
#endif

namespace tc {
namespace wmma = nvcuda::wmma;
constexpr int kM = 16, kN = 16, kK = 8;  // the TF32 WMMA shape
using row_major = wmma::row_major;
using col_major = wmma::col_major;
#if FASTDAL_TENSOR_CORES
using Acc = wmma::fragment<wmma::accumulator, kM, kN, kK, float>;
template <typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, kM, kN, kK, wmma::precision::tf32, Layout>;
template <typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, kM, kN, kK, wmma::precision::tf32, Layout>;
#else
// Device code below sm_80 (a build including 7.5, for Turing GPUs) has no TF32 fragments. The tensor-core
// instantiations still compile there, to empty bodies (every use of a fragment below is behind
// FASTDAL_TENSOR_CORES), and the host never launches them on such a device (has_tensor_cores); so stand-ins
// of the same names suffice.
template <int Elements>
struct StandIn {
  static constexpr int num_elements = Elements;
  float x[Elements];
};
using Acc = StandIn<8>;
template <typename Layout>
using FragA = StandIn<4>;
template <typename Layout>
using FragB = StandIn<4>;
#endif

// Offset of element (i, j) of a matrix stored with leading dimension ld in the given layout.
template <typename Layout>
__device__ __forceinline__ int offset(int i, int j, int ld) {
  return std::is_same_v<Layout, row_major> ? i * ld + j : j * ld + i;
}

// A fragment as loaded (fp32 values) becomes its TF32 high part, and lo its low part (kTf32x3 only).
template <Precision P, typename Frag>
__device__ __forceinline__ void split(Frag& hi, Frag& lo) {
#if FASTDAL_TENSOR_CORES
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float x = hi.x[e];
    const float h = wmma::__float_to_tf32(x);
    hi.x[e] = h;
    if constexpr (P == Precision::kTf32x3) lo.x[e] = wmma::__float_to_tf32(x - h);
  }
#endif
}

// acc[i][j] += A[16 i.., :] B[:, 16 j..] over kK * K_STEPS of the inner dimension, for a warp tile of
// MF x NF fragments: A (rows x inner) at a with leading dimension lda in LayoutA, B (inner x
// columns) at b with ldb in LayoutB, both already offset to the warp's tile. Each A and B fragment
// is loaded and split once per k-step and used NF (MF) times.
template <Precision P, int MF, int NF, int K_STEPS, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void warp_mma(Acc (&acc)[MF][NF], const float* a, int lda, const float* b, int ldb) {
#if FASTDAL_TENSOR_CORES
  static_assert(P != Precision::kIeee, "the SIMT path does not come here");
#pragma unroll
  for (int kk = 0; kk < K_STEPS; ++kk) {
    FragA<LayoutA> a_hi[MF], a_lo[MF];
    FragB<LayoutB> b_hi[NF], b_lo[NF];
#pragma unroll
    for (int i = 0; i < MF; ++i) {
      wmma::load_matrix_sync(a_hi[i], a + offset<LayoutA>(i * kM, kk * kK, lda), lda);
      split<P>(a_hi[i], a_lo[i]);
    }
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      wmma::load_matrix_sync(b_hi[j], b + offset<LayoutB>(kk * kK, j * kN, ldb), ldb);
      split<P>(b_hi[j], b_lo[j]);
    }
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        if constexpr (P == Precision::kTf32x3) {
          wmma::mma_sync(acc[i][j], a_lo[i], b_hi[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], a_hi[i], b_lo[j], acc[i][j]);
        }
        wmma::mma_sync(acc[i][j], a_hi[i], b_hi[j], acc[i][j]);
      }
  }
#endif
}

template <int MF, int NF>
__device__ __forceinline__ void fill_zero(Acc (&acc)[MF][NF]) {
#if FASTDAL_TENSOR_CORES
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
#endif
}

// Stores the warp tile row-major at c (leading dimension ldc, a multiple of 4, 32-byte aligned rows of 16).
template <int MF, int NF>
__device__ __forceinline__ void store(float* c, int ldc, const Acc (&acc)[MF][NF]) {
#if FASTDAL_TENSOR_CORES
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      wmma::store_matrix_sync(c + i * kM * ldc + j * kN, acc[i][j], ldc, wmma::mem_row_major);
    }
#endif
}
}  // namespace tc

template <typename V>
__device__ __forceinline__ V warp_sum(V x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of x over the block (kThreads threads); the result is valid in thread 0. All threads must call.
template <typename V>
__device__ __forceinline__ V block_sum(V x) {
  __shared__ V partial[kThreads / 32];
  x = warp_sum(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  V total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  }
  return total;
}

// atomicAdd on double is native from sm_60; older targets (should a build include them) take a
// compare-and-swap loop.
__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  auto* bits = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *bits, seen;
  do {
    seen = old;
    old = atomicCAS(bits, seen, __double_as_longlong(__longlong_as_double(seen) + v));
  } while (old != seen);
#else
  atomicAdd(p, v);
#endif
}

}  // namespace fastdal::cuda
