// fastdal::conv_sample_score on CPU (fastdal/ops.py states the op).
//
// Per sample n, g_n = the sum over the module's calls c of the weight gradient of an unpadded convolution of
// inputs[c][n] with output gradient deltas[c][n]; sq_norm[n] = ||g_n||^2 and dot[n] = <g_n, weight_grad>.
//
// Each g_n comes from ATen's own convolution backward on a batch of one (no im2col copy, which costs more
// than the convolution on CPU) and is reduced to its two numbers at once, so nothing larger than one
// weight per thread is allocated. The samples are split over the threads by one at::parallel_for, inside
// which each backward runs on its calling thread: calling the backward once per sample from Python opened
// one parallel region per sample and layer, and with another process competing for the cores every one of
// them waited for its slowest thread (the vanilla CNN's score slowed down 5.6x where a training step slowed
// down 2x). The threads are torch's (torch.set_num_threads).
#include <array>
#include <utility>
#include <vector>

#include "common.h"

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

template <typename scalar_t>
void score_samples(at::TensorList inputs, at::TensorList deltas, const at::Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef dilation, int64_t groups, const at::Tensor& flat_grad, at::Tensor& sq,
                   at::Tensor& dot) {
  const std::vector<int64_t> no_padding(weight.dim() - 2, 0);
  const std::array<bool, 3> weight_only{false, true, false};
  scalar_t* sq_out = sq.data_ptr<scalar_t>();
  scalar_t* dot_out = dot.data_ptr<scalar_t>();
  const scalar_t* grad = flat_grad.defined() ? flat_grad.const_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, sq.size(0), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      at::Tensor g;
      for (size_t c = 0; c < inputs.size(); ++c) {
        at::Tensor part = std::get<1>(at::convolution_backward(deltas[c].narrow(0, i, 1), inputs[c].narrow(0, i, 1),
                                                               weight, std::nullopt, stride, no_padding, dilation,
                                                               false, no_padding, groups, weight_only));
        g = g.defined() ? g.add_(part) : part;
      }
      g = g.contiguous();
      const auto [s, d] = norm_and_dot(g.const_data_ptr<scalar_t>(), grad, g.numel());
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
  auto sq = at::empty({n}, weight.options());
  auto dot = at::empty({n}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv_sample_score_cpu", [&] {
    score_samples<scalar_t>(inputs, deltas, weight, stride, dilation, groups, flat_grad, sq, dot);
  });
  return {sq, dot};
}

}  // namespace
}  // namespace fastdal::cpu

TORCH_LIBRARY_IMPL(fastdal, CPU, m) { m.impl("conv_sample_score", &fastdal::cpu::conv_sample_score_cpu); }
