// fastdal::conv_sample_score on CPU (fastdal/ops.py states the op).
//
// Per sample n, g_n = the sum over the module's calls c of the weight gradient of an unpadded convolution of
// inputs[c][n] with output gradient deltas[c][n]; sq_norm[n] = ||g_n||^2 and dot[n] = <g_n, weight_grad>.
//
// Each g_n is formed group by group as delta_n (K_g x T) times the sample's unfolded input (T x C_g k), one
// GEMM on one sample's data in a thread's own buffers, and reduced to its two numbers at once, so nothing
// larger than one weight and one sample's unfolded input per thread is allocated. The samples are split over
// torch's threads (torch.set_num_threads) by one at::parallel_for: calling PyTorch's convolution backward once
// per sample from Python opened one parallel region per sample and layer, and with another process competing
// for the cores every one of them waited for its slowest thread (the vanilla CNN's score slowed down 5.6x
// where a training step slowed down 2x). ATen's convolution backward cannot run inside that loop: oneDNN's
// weight gradient, called from a thread of a parallel region, split its reduction for the region's threads and
// summed only its own part (half the gradient with two threads).
#include <algorithm>
#include <utility>
#include <vector>

#include "common.h"
#include "unfold.h"

namespace fastdal::cpu {
namespace {

void check_pair(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, int64_t n, size_t c) {
  const int64_t dim = weight.dim();
  TORCH_CHECK(x.device().is_cpu() && delta.device().is_cpu(), "fastdal (cpp): inputs[", c, "] and deltas[", c,
              "] must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && delta.scalar_type() == weight.scalar_type(),
              "fastdal (cpp): inputs[", c, "] and deltas[", c, "] must have the weight's dtype (",
              weight.scalar_type(), "), got ", x.scalar_type(), " and ", delta.scalar_type());
  TORCH_CHECK(x.dim() == dim && delta.dim() == dim, "fastdal (cpp): inputs[", c, "] and deltas[", c, "] must have ",
              dim, " dimensions like the weight, got shapes ", x.sizes(), " and ", delta.sizes());
  TORCH_CHECK(x.size(0) == n && delta.size(0) == n, "fastdal (cpp): inputs[", c, "] and deltas[", c,
              "] must hold the ", n, " samples of inputs[0], got shapes ", x.sizes(), " and ", delta.sizes());
  TORCH_CHECK(delta.size(1) == weight.size(0), "fastdal (cpp): deltas[", c, "] must have ", weight.size(0),
              " channels (the weight's output channels), got shape ", delta.sizes());
}

// ||x||^2 and <x, y> (y may be null: 0) in acc_t.
template <typename scalar_t>
std::pair<acc_t, acc_t> norm_and_dot(const scalar_t* x, const scalar_t* y, int64_t size) {
  acc_t s = 0, d = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < size; ++j) s += static_cast<acc_t>(x[j]) * x[j];
  if (y != nullptr) {
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < size; ++j) d += static_cast<acc_t>(x[j]) * y[j];
  }
  return {s, d};
}

// Per sample i: its weight gradient, group by group, as delta_i (K_g x T) times its unfolded input
// (T x C_g k), one GEMM of the weight's size on one sample's data, summed over the calls, then reduced.
template <typename scalar_t>
void score_samples(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& deltas,
                   const std::vector<Geometry>& shapes, int64_t out_channels, int64_t groups, const at::Tensor& flat_grad,
                   at::Tensor& sq, at::Tensor& dot) {
  const int64_t out_per_group = out_channels / groups;
  const int64_t weight_size = out_channels * shapes[0].rows();
  int64_t cols_size = 0;
  for (const Geometry& g : shapes) cols_size = std::max(cols_size, g.rows() * g.positions());
  scalar_t* sq_out = sq.data_ptr<scalar_t>();
  scalar_t* dot_out = dot.data_ptr<scalar_t>();
  const scalar_t* grad = flat_grad.defined() ? flat_grad.const_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, sq.size(0), 1, [&](int64_t first, int64_t last) {
    std::vector<scalar_t> cols(cols_size), sample_grad(weight_size), part(inputs.size() > 1 ? weight_size : 0);
    for (int64_t i = first; i < last; ++i) {
      for (size_t c = 0; c < inputs.size(); ++c) {
        const Geometry& g = shapes[c];
        const int64_t t = g.positions(), rows = g.rows();
        const scalar_t* x = inputs[c].const_data_ptr<scalar_t>() + i * inputs[c].stride(0);
        const scalar_t* delta = deltas[c].const_data_ptr<scalar_t>() + i * deltas[c].stride(0);
        scalar_t* out = c == 0 ? sample_grad.data() : part.data();
        for (int64_t group = 0; group < groups; ++group) {
          unfold(x + group * g.channels * g.height * g.width, g, cols.data());
          // Column-major: out_group^T (rows x K_g) = cols^T-as-stored (rows x T) delta_group^T (T x K_g).
          gemm<scalar_t>(true, false, rows, out_per_group, t, cols.data(), t, delta + group * out_per_group * t, t,
                         out + group * out_per_group * rows, rows);
        }
        if (c > 0) {
#pragma omp simd
          for (int64_t j = 0; j < weight_size; ++j) sample_grad[j] += part[j];
        }
      }
      const auto [s, d] = norm_and_dot(sample_grad.data(), grad, weight_size);
      sq_out[i] = static_cast<scalar_t>(s);
      dot_out[i] = static_cast<scalar_t>(d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv_sample_score_cpu(at::TensorList inputs, at::TensorList deltas,
                                                         const at::Tensor& weight, at::IntArrayRef stride,
                                                         at::IntArrayRef dilation, int64_t groups,
                                                         const std::optional<at::Tensor>& weight_grad) {
  TORCH_CHECK(!inputs.empty() && inputs.size() == deltas.size(),
              "fastdal (cpp): conv_sample_score needs one delta per input and at least one of each, got ",
              inputs.size(), " inputs and ", deltas.size(), " deltas");
  TORCH_CHECK(weight.dim() == 3 || weight.dim() == 4, "fastdal (cpp): weight must be a Conv1d or Conv2d weight, got ",
              "shape ", weight.sizes());
  check_float_tensor(weight, "weight", weight.dim());
  const auto spatial = static_cast<size_t>(weight.dim() - 2);
  TORCH_CHECK(stride.size() == spatial && dilation.size() == spatial, "fastdal (cpp): stride and dilation must have ",
              spatial, " entries, got ", stride.size(), " and ", dilation.size());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "fastdal (cpp): groups must divide the ", weight.size(0),
              " output channels, got ", groups);
  const int64_t n = inputs[0].size(0);
  for (size_t c = 0; c < inputs.size(); ++c) check_pair(inputs[c], deltas[c], weight, n, c);
  at::Tensor flat_grad;
  if (weight_grad.has_value()) {
    check_same_dtype(*weight_grad, "weight_grad", weight, "weight");
    TORCH_CHECK(weight_grad->sizes() == weight.sizes(), "fastdal (cpp): weight_grad must have the weight's shape ",
                weight.sizes(), ", got ", weight_grad->sizes());
    flat_grad = weight_grad->contiguous().view(-1);
  }
  // The kernel reads plain row-major samples: a copy where autograd handed over another layout.
  const bool one_d = weight.dim() == 3;
  std::vector<at::Tensor> xs, ds;
  std::vector<Geometry> shapes;
  for (size_t c = 0; c < inputs.size(); ++c) {
    xs.push_back(inputs[c].contiguous());
    ds.push_back(deltas[c].contiguous());
    Geometry g{weight.size(1),
               one_d ? 1 : inputs[c].size(2),
               inputs[c].size(-1),
               one_d ? 1 : weight.size(2),
               weight.size(-1),
               one_d ? 1 : stride[0],
               stride.back(),
               one_d ? 1 : dilation[0],
               dilation.back(),
               one_d ? 1 : deltas[c].size(2),
               deltas[c].size(-1)};
    TORCH_CHECK(inputs[c].size(1) == g.channels * groups, "fastdal (cpp): inputs[", c, "] must have ",
                g.channels * groups, " channels (the weight's input channels times groups), got shape ",
                inputs[c].sizes());
    TORCH_CHECK(g.out_h == (g.height - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1 &&
                    g.out_w == (g.width - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1,
                "fastdal (cpp): deltas[", c, "] has shape ", deltas[c].sizes(),
                ", not the output shape of the unpadded convolution of inputs[", c, "] ", inputs[c].sizes());
    shapes.push_back(g);
  }
  auto sq = at::empty({n}, weight.options());
  auto dot = at::empty({n}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv_sample_score_cpu", [&] {
    score_samples<scalar_t>(xs, ds, shapes, weight.size(0), groups, flat_grad, sq, dot);
  });
  return {sq, dot};
}

}  // namespace
}  // namespace fastdal::cpu

TORCH_LIBRARY_IMPL(fastdal, CPU, m) { m.impl("conv_sample_score", &fastdal::cpu::conv_sample_score_cpu); }
