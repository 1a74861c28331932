// fastdal::factored_min_distance on CPU.
//
// Row i stands for the gradient g_i = left_i (x) [right_i, sqrt(offset)], so that
// <g_i, g_c> = (left_i . left_c)(right_i . right_c + offset), and the op returns, for c = center
// (fastdal/ops.py states it),
//   out_i = min(min_dist_i, max(0, sq_norm_i + sq_norm_c - 2 (left_i . left_c)(right_i . right_c + offset))).
//
// One k-means++ step reads every row once and does two flops per element read: the op is bound by
// memory bandwidth, so it is one streaming pass over left and right, rows in parallel, with row c
// (read by every row) staying in cache. The dot products are summed in float64 (acc_t), which is
// free at this arithmetic intensity.
#include <cmath>

#include "common.h"

namespace fastdal::cpu {
namespace {

// Rows per parallel chunk: about this many elements of left and right, so that short rows are not
// handed out one by one.
constexpr int64_t kChunkElems = 1 << 15;

template <typename T>
void update_rows(const T* left, const T* right, acc_t offset, const T* sq_norm, int64_t center, const T* min_dist,
                 int64_t n, int64_t k, int64_t d, T* out) {
  const T* left_c = left + center * k;
  const T* right_c = right + center * d;
  const acc_t sq_c = sq_norm[center];
  const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, k + d));
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const acc_t left_dot = sum_of_products(left + i * k, left_c, k);
      const acc_t inner = left_dot * (sum_of_products(right + i * d, right_c, d) + offset);
      acc_t dist = sq_norm[i] + sq_c - 2 * inner;
      if (dist < 0) dist = 0;  // rounding; a NaN passes on, as in the torch backend
      const T current = min_dist[i];
      // torch.minimum: NaN in either wins.
      out[i] = (std::isnan(current) || current < dist) ? current : static_cast<T>(dist);
    }
  });
}

void check_inputs(const at::Tensor& left, const at::Tensor& right, double offset, const at::Tensor& sq_norm,
                  int64_t center, const at::Tensor& min_dist) {
  check_float_tensor(left, "left", 2);
  check_float_tensor(right, "right", 2);
  check_float_tensor(sq_norm, "sq_norm", 1);
  check_float_tensor(min_dist, "min_dist", 1);
  check_same_dtype(right, "right", left, "left");
  check_same_dtype(sq_norm, "sq_norm", left, "left");
  check_same_dtype(min_dist, "min_dist", left, "left");
  const int64_t n = left.size(0);
  TORCH_CHECK(right.size(0) == n, "fastdal (cpp): right must be (", n, ", D) to match left, got ", right.sizes());
  TORCH_CHECK(sq_norm.size(0) == n, "fastdal (cpp): sq_norm must be (", n, ",) to match left, got ", sq_norm.sizes());
  TORCH_CHECK(min_dist.size(0) == n, "fastdal (cpp): min_dist must be (", n, ",) to match left, got ",
              min_dist.sizes());
  check_contiguous(left, "left");
  check_contiguous(right, "right");
  check_contiguous(sq_norm, "sq_norm");
  check_contiguous(min_dist, "min_dist");
  TORCH_CHECK(std::isfinite(offset), "fastdal (cpp): offset must be finite, got ", offset);
  TORCH_CHECK(center >= 0 && center < n, "fastdal (cpp): center must be a row index in [0, ", n, "), got ", center);
}

at::Tensor factored_min_distance_cpu(const at::Tensor& left, const at::Tensor& right, double offset,
                                     const at::Tensor& sq_norm, int64_t center, const at::Tensor& min_dist) {
  check_inputs(left, right, offset, sq_norm, center, min_dist);
  auto out = at::empty_like(min_dist);
  AT_DISPATCH_FLOATING_TYPES(left.scalar_type(), "factored_min_distance_cpu", [&] {
    update_rows(left.data_ptr<scalar_t>(), right.data_ptr<scalar_t>(), static_cast<acc_t>(offset),
                sq_norm.data_ptr<scalar_t>(), center, min_dist.data_ptr<scalar_t>(), left.size(0), left.size(1),
                right.size(1), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace fastdal::cpu

TORCH_LIBRARY_IMPL(fastdal, CPU, m) { m.impl("factored_min_distance", &fastdal::cpu::factored_min_distance_cpu); }
