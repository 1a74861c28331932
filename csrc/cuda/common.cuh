// Helpers shared by the CUDA kernels of csrc/cuda: argument checks, a strided tile loader that
// stages global memory through registers into shared memory, vector loads from shared memory, and
// block reductions.
//
// Every kernel of csrc/cuda is a small SIMT GEMM: a block stages a chunk of two operand tiles in
// shared memory, each thread accumulates a micro-tile in registers, and the next chunk is fetched
// into registers while the current one is being multiplied (one shared buffer, two barriers a chunk).
// Inner products run in the input dtype, as the torch backend's GEMMs do; what is summed after them
// (softmax statistics, squared norms, dot products over a tile) runs in double, which costs little
// next to the GEMM and keeps float32 results as accurate as the torch backend's.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <type_traits>

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
