// The `fastdal` operator library: the schemas of fastdal's compiled ops. Their math is stated in
// fastdal/ops.py; the CPU implementations register in csrc/cpu/<op>.cpp, the CUDA ones in
// csrc/cuda/<op>.cu, and the fake (meta) implementations in fastdal/_ext.py.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string_view>

namespace fastdal {
// The `precision` argument of the GEMM-shaped ops (last_layer_score, linear_sample_score,
// kron_project): how a CUDA float32 GEMM multiplies. 0 "ieee": SIMT fused multiply-adds, exact fp32;
// 1 "tf32x3" (the default): tensor cores with each operand split into two TF32 parts,
// a = tf32(a) + tf32(a - tf32(a)), and the three larger partial products summed in fp32: fp32-class
// accuracy; 2 "tf32": one TF32 product, ~1e-3 relative, opt-in speed. The CPU kernels and float64
// ignore it (they stay exact) but still reject other values, so that a typo fails on every backend.
// Declared where it is used (csrc/cpu/*.cpp, csrc/cuda/common.cuh); `backend` prefixes the error.
int parse_precision(std::string_view precision, const char* backend) {
  const int code = precision == "ieee" ? 0 : precision == "tf32x3" ? 1 : precision == "tf32" ? 2 : -1;
  TORCH_CHECK(code >= 0, "fastdal (", backend, "): precision must be one of \"ieee\", \"tf32x3\", \"tf32\", got \"",
              precision, "\"");
  return code;
}
}  // namespace fastdal

// Importing fastdal._C loads this library and so registers the ops; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdal, m) {
  // The trailing `precision` of the first three ops ("ieee", "tf32x3", "tf32") selects how CUDA
  // multiplies float32 (see parse_precision above); its default keeps calls without it working.
  // Per row of h (N, D): z = W h + b, yhat = argmax z, e = softmax(z) - onehot(yhat),
  // c = G_W h + G_b; sq_norm = ||e||^2 (||h||^2 [G_W given] + 1 [G_b given]), dot = e . c,
  // score = sq_norm + gamma * dot. Streams over K: no N x K tensor. h, weight and bias share a dtype, and so
  // do weight_grad and bias_grad: h's, or float32 for a float16/bfloat16 h (CUDA only: a half model's head),
  // which is also the outputs' dtype.
  m.def(
      "last_layer_score(Tensor h, Tensor weight, Tensor? bias, Tensor? weight_grad, Tensor? bias_grad, "
      "float gamma, str precision=\"tf32x3\") -> (Tensor score, Tensor sq_norm, Tensor dot, Tensor pseudo_label)");
  // The same from the logits z (N, K) the model's forward made, instead of W and b (CPU only).
  m.def(
      "last_layer_score_logits(Tensor h, Tensor logits, Tensor? weight_grad, Tensor? bias_grad, float gamma, "
      "str precision=\"tf32x3\") -> (Tensor score, Tensor sq_norm, Tensor dot, Tensor pseudo_label)");
  // Per row n of a (N, T, d_in) and delta (N, T, d_out), g = delta[n]^T a[n] (d_out x d_in):
  // sq_norm = ||g||^2, dot = <g, weight_grad[n % groups]>. Ghost or direct, tile by tile.
  m.def(
      "linear_sample_score(Tensor a, Tensor delta, Tensor? weight_grad, int groups, bool ghost, "
      "str precision=\"tf32x3\") -> (Tensor sq_norm, Tensor dot)");
  // Per sample n of a Conv1d/Conv2d weight (K, C / groups, *kernel): g_n = sum over c of the weight
  // gradient of the unpadded convolution of inputs[c][n] with output gradient deltas[c][n];
  // sq_norm = ||g_n||^2, dot = <g_n, weight_grad> (CPU only).
  m.def(
      "conv_sample_score(Tensor[] inputs, Tensor[] deltas, Tensor weight, int[] stride, int[] dilation, "
      "int groups, Tensor? weight_grad) -> (Tensor sq_norm, Tensor dot)");
  // F.unfold of a 4-D x (N, C, H, W) without padding: (N, C kh kw, positions), row (c, i, j) (CPU only).
  m.def("unfold(Tensor x, int[] kernel_size, int[] stride, int[] dilation) -> Tensor");
  // Per row n of a (N, T, d_in) and delta (N, T, d_out), with p_in (r_in, d_in) and
  // p_out (groups, r_out, d_out): out[n] = sum_t (p_out[n % groups] delta[n, t]) (p_in a[n, t])^T,
  // an (r_out, r_in) projection of the row's weight gradient delta[n]^T a[n], never formed.
  m.def(
      "kron_project(Tensor a, Tensor delta, Tensor p_in, Tensor p_out, str precision=\"tf32x3\") -> Tensor");
  // k-means++ distance update over factored rows g_i = left_i (x) [right_i, sqrt(offset)]:
  // out_i = min(min_dist_i, max(0, sq_norm_i + sq_norm_c - 2 (left_i . left_c)(right_i . right_c + offset)))
  // with c = center.
  m.def(
      "factored_min_distance(Tensor left, Tensor right, float offset, Tensor sq_norm, int center, "
      "Tensor min_dist) -> Tensor");
  // The version (major * 10 + minor) of the device code this build runs as on the probe's GPU, 0 when it
  // has none that GPU can run (CUDA only: csrc/cuda/kernel_image.cu).
  m.def("cuda_kernel_image(Tensor probe) -> int");
}
