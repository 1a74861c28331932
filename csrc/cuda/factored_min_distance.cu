// fastdal::factored_min_distance on CUDA.
//
// Row i stands for the gradient g_i = left_i (x) [right_i, sqrt(offset)], so that
// <g_i, g_c> = (left_i . left_c)(right_i . right_c + offset), and the op returns, for c = center
// (fastdal/ops.py states it),
//   out_i = min(min_dist_i, max(0, sq_norm_i + sq_norm_c - 2 (left_i . left_c)(right_i . right_c + offset))).
//
// Bound by memory bandwidth, as on CPU (csrc/cpu/factored_min_distance.cpp): one warp per row
// streams left_i and right_i with consecutive lanes on consecutive elements (whole 128-byte lines),
// sums in double and reduces with shuffles; row c, read by every warp, stays in L1/L2. Eight rows a
// block, no shared memory, no atomics: each output has one writer.
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastdal::cuda {
namespace {

constexpr int kRowsPerBlock = kThreads / 32;  // a warp per row

template <typename T>
__device__ __forceinline__ acc_t lane_sum_of_products(const T* __restrict__ x, const T* __restrict__ y, int64_t len,
                                                      int lane) {
  acc_t s = 0;
  for (int64_t j = lane; j < len; j += 32) s += static_cast<acc_t>(x[j]) * y[j];
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    min_distance_kernel(const T* __restrict__ left, const T* __restrict__ right, acc_t offset,
                        const T* __restrict__ sq_norm, int64_t center, const T* __restrict__ min_dist, int64_t n,
                        int64_t k, int64_t d, T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= n) return;  // the whole warp: the shuffles below see all 32 lanes
  const acc_t left_dot = warp_sum(lane_sum_of_products(left + row * k, left + center * k, k, lane));
  const acc_t right_dot = warp_sum(lane_sum_of_products(right + row * d, right + center * d, d, lane));
  if (lane != 0) return;
  acc_t dist = static_cast<acc_t>(sq_norm[row]) + sq_norm[center] - 2 * left_dot * (right_dot + offset);
  if (dist < 0) dist = 0;  // rounding; a NaN passes on, as in the torch backend
  const T current = min_dist[row];
  // torch.minimum: NaN in either wins.
  out[row] = (isnan(current) || current < dist) ? current : static_cast<T>(dist);
}

at::Tensor factored_min_distance_cuda(const at::Tensor& left, const at::Tensor& right, double offset,
                                      const at::Tensor& sq_norm, int64_t center, const at::Tensor& min_dist) {
  check_float_tensor(left, "left", 2);
  check_float_tensor(right, "right", 2);
  check_float_tensor(sq_norm, "sq_norm", 1);
  check_float_tensor(min_dist, "min_dist", 1);
  check_like(right, "right", left, "left");
  check_like(sq_norm, "sq_norm", left, "left");
  check_like(min_dist, "min_dist", left, "left");
  const int64_t n = left.size(0);
  TORCH_CHECK(right.size(0) == n, "fastdal (cuda): right must be (", n, ", D) to match left, got ", right.sizes());
  TORCH_CHECK(sq_norm.size(0) == n, "fastdal (cuda): sq_norm must be (", n, ",) to match left, got ", sq_norm.sizes());
  TORCH_CHECK(min_dist.size(0) == n, "fastdal (cuda): min_dist must be (", n, ",) to match left, got ",
              min_dist.sizes());
  check_contiguous(left, "left");
  check_contiguous(right, "right");
  check_contiguous(sq_norm, "sq_norm");
  check_contiguous(min_dist, "min_dist");
  TORCH_CHECK(std::isfinite(offset), "fastdal (cuda): offset must be finite, got ", offset);
  TORCH_CHECK(center >= 0 && center < n, "fastdal (cuda): center must be a row index in [0, ", n, "), got ", center);
  const c10::cuda::CUDAGuard guard(left.device());
  auto out = at::empty_like(min_dist);
  const int64_t blocks = ceil_div(n, kRowsPerBlock);
  TORCH_CHECK(blocks <= INT_MAX, "fastdal (cuda): factored_min_distance: too many blocks (", blocks, ")");
  AT_DISPATCH_FLOATING_TYPES(left.scalar_type(), "factored_min_distance_cuda", [&] {
    min_distance_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        left.data_ptr<scalar_t>(), right.data_ptr<scalar_t>(), static_cast<acc_t>(offset),
        sq_norm.data_ptr<scalar_t>(), center, min_dist.data_ptr<scalar_t>(), n, left.size(1), right.size(1),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdal::cuda

TORCH_LIBRARY_IMPL(fastdal, CUDA, m) {
  m.impl("factored_min_distance", &fastdal::cuda::factored_min_distance_cuda);
}
