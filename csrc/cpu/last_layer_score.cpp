// fastdal::last_layer_score on CPU.
//
// Per row h_i of h (N, D), with W (K, D), b (K), G_W (K, D), G_b (K) (fastdal/ops.py states the op):
//   z = W h_i + b,  yhat = argmax z (first maximum),  e = softmax(z) - onehot(yhat),  c = G_W h_i + G_b,
//   sq_norm = ||e||^2 (||h_i||^2 [G_W given] + 1 [G_b given]),  dot = e . c,  score = sq_norm + gamma dot.
//
// Streaming: K can be tens of thousands, so no N x K (or N x 2K) array ever exists. Row blocks of h
// run in parallel; for each block the classes are walked in tiles, and one tile's z and c come out
// of GEMMs against W's and G_W's rows of the tile into a thread-local buffer of kRowBlock x
// 2 kClassTile, which an online softmax folds into a few numbers per row. The extra memory is
// O(threads x tile), whatever N and K are. When all of K fits in one tile, W and G_W are stacked
// into one (2K, D) matrix first: for a small head (K = 10) the GEMMs are thin and one call with
// twice the rows runs about 1.5x faster than two.
//
// The exponentials of a tile go through ATen's exp, one call for all rows of the block: it is
// vectorized for the machine's best instruction set (chosen at run time), where a scalar std::exp
// per element made the fold cost more than half the head's GEMM (K = 10000, D = 512).
//
// fastdal::last_layer_score_logits takes the logits z the model's forward already made instead of W and b:
// only c comes out of a GEMM, and the tile of z is copied into the buffer next to it (the same fold
// follows), so a pass that has the logits pays one GEMM of the head's size instead of two.
//
// Online softmax (stable for confident rows): per row the running max m (at index yhat, with
// c_yhat) and the sums over k != yhat of  s' = exp(z_k - m),  s2' = exp(2 (z_k - m)),  sc' =
// exp(z_k - m) c_k. A new strict maximum rescales them by exp(m_old - m_new) (squared for s2') and
// moves the old maximum's own term (1, 1, c_yhat) in. At the end, with s = 1 + s':
//   ||e||^2 = s2'/s^2 + (s'/s)^2,   e . c = (sc' - c_yhat s') / s,
// sums of positive terms: the textbook s2/s^2 - 2/s + 1 cancels to noise when p_yhat is near 1.
#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

#include "common.h"

// Defined in csrc/fastdal.cpp: validates the ops' `precision` argument ("ieee", "tf32x3", "tf32"),
// which the CPU kernels accept and ignore: they are exact whatever it says.
namespace fastdal {
int parse_precision(std::string_view precision, const char* backend);
}

namespace fastdal::cpu {
namespace {

// 128 rows x 1024 classes x {z, c} is 1 MiB in float32 per thread. Tiles of 256 classes kept it in
// L2, but their thin GEMMs ran about 20% slower than one of the head's whole size, which costs more
// than the buffer's trips to L3; a 1024 x D slice of W is reused by 128 rows.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kClassTile = 1024;

template <typename scalar_t>
struct Head {
  const scalar_t* h;
  const scalar_t* w;
  const scalar_t* b;   // nullable
  const scalar_t* gw;  // nullable; null also when given but empty (D = 0), hence has_gw
  const scalar_t* gb;  // nullable
  const scalar_t* stacked;  // [W; G_W] (2K, D) when K <= kClassTile and G_W is given, else null
  const scalar_t* z;        // the logits (N, K) when given (last_layer_score_logits): W and b are then unused
  bool has_gw;
  int64_t n, d, k;
  int64_t rows_per_block;
};

template <typename scalar_t>
struct Outputs {
  scalar_t* score;
  scalar_t* sq;
  scalar_t* dot;
  int64_t* label;
};

struct RowState {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t yhat = 0;
  acc_t c_yhat = 0;
  acc_t s1 = 0, s2 = 0, sc = 0;  // s', s2', sc' of the header
  bool finite = true;
};

// Adds the bias to the tile's logits in place; returns their max, and whether all are finite.
template <typename scalar_t>
scalar_t add_bias_and_max(scalar_t* z, const scalar_t* b, int64_t kt, bool* finite) {
  scalar_t top = -std::numeric_limits<scalar_t>::infinity();
  scalar_t probe = 0;  // z * 0 is NaN exactly for a non-finite z
#pragma omp simd reduction(max : top) reduction(+ : probe)
  for (int64_t j = 0; j < kt; ++j) {
    const scalar_t v = b ? z[j] + b[j] : z[j];
    z[j] = v;
    top = v > top ? v : top;
    probe += v * scalar_t(0);
  }
  *finite = probe == scalar_t(0);
  return top;
}

// Moves a row's running maximum to the tile's `top` of classes k0.. if it is larger (rescaling the sums),
// then turns the tile's logits z into z - m, with -inf at the maximum's own class: after the exponential
// that entry is 0, so the sums over k != yhat need no branch in their loop.
template <typename scalar_t>
void shift_tile(RowState& st, scalar_t* z, const scalar_t* c, int64_t k0, int64_t kt, scalar_t top) {
  if (static_cast<acc_t>(top) > st.m) {
    const acc_t scale = std::exp(st.m - static_cast<acc_t>(top));  // 0 on the first tile (m = -inf)
    st.s1 = (st.s1 + 1) * scale;
    st.s2 = (st.s2 + 1) * scale * scale;
    st.sc = (st.sc + st.c_yhat) * scale;
    int64_t j = 0;
    while (j + 1 < kt && z[j] != top) ++j;  // the first maximum (top is one of the z, never NaN)
    st.m = top;
    st.yhat = k0 + j;
    st.c_yhat = c[j];
  }
  const scalar_t m = static_cast<scalar_t>(st.m);
#pragma omp simd
  for (int64_t j = 0; j < kt; ++j) z[j] -= m;
  const int64_t skip = st.yhat - k0;  // outside [0, kt) when the maximum lies in another tile
  if (skip >= 0 && skip < kt) z[skip] = -std::numeric_limits<scalar_t>::infinity();
}

// exp in place of `rows` rows of `kt` entries, `stride` apart: one vectorized ATen call for the block
// (inside at::parallel_for it runs on the calling thread).
template <typename scalar_t>
void exp_rows(scalar_t* z, int64_t rows, int64_t kt, int64_t stride) {
  at::from_blob(z, {rows, kt}, {stride, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value))
      .exp_();
}

// Adds a tile's p = exp(z_k - m) (0 at yhat) and their products with c to the row's sums.
template <typename scalar_t>
void add_tile(RowState& st, const scalar_t* p, const scalar_t* c, int64_t kt) {
  acc_t s1 = 0, s2 = 0, sc = 0;
#pragma omp simd reduction(+ : s1, s2, sc)
  for (int64_t j = 0; j < kt; ++j) {
    const acc_t pj = p[j];
    s1 += pj;
    s2 += pj * pj;
    sc += pj * c[j];
  }
  st.s1 += s1;
  st.s2 += s2;
  st.sc += sc;
}

template <typename scalar_t>
acc_t squared_norm(const scalar_t* x, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += static_cast<acc_t>(x[j]) * x[j];
  return sum;
}

template <typename scalar_t>
void finish_row(const RowState& st, acc_t norm_scale, double gamma, const Outputs<scalar_t>& out, int64_t i) {
  out.label[i] = st.yhat;
  if (!st.finite) {
    const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
    out.score[i] = out.sq[i] = out.dot[i] = nan;
    return;
  }
  const acc_t s = 1 + st.s1;
  const acc_t e_sq = st.s2 / (s * s) + (st.s1 / s) * (st.s1 / s);
  const acc_t sq = e_sq * norm_scale;
  const acc_t dot = (st.sc - st.c_yhat * st.s1) / s;
  out.sq[i] = static_cast<scalar_t>(sq);
  out.dot[i] = static_cast<scalar_t>(dot);
  out.score[i] = static_cast<scalar_t>(sq + gamma * dot);
}

// Rows [r0, r0 + rows) of h; buf holds rows x 2 kClassTile scalars.
template <typename scalar_t>
void score_block(const Head<scalar_t>& p, double gamma, int64_t r0, int64_t rows, scalar_t* buf,
                 std::vector<RowState>& states, const Outputs<scalar_t>& out) {
  std::fill(states.begin(), states.begin() + rows, RowState{});
  const scalar_t* h = p.h + r0 * p.d;
  for (int64_t k0 = 0; k0 < p.k; k0 += kClassTile) {
    const int64_t kt = std::min(kClassTile, p.k - k0);
    const int64_t width = p.has_gw ? 2 * kt : kt;  // row i of buf: z of the tile, then G_W h_i
    // buf^T (width x rows, column-major) = [W_tile; G_W_tile] h_block^T.
    if (p.z) {
      if (p.has_gw) gemm<scalar_t>(true, false, kt, rows, p.d, p.gw + k0 * p.d, p.d, h, p.d, buf + kt, width);
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* zi = p.z + (r0 + i) * p.k + k0;
        std::copy(zi, zi + kt, buf + i * width);  // the fold writes into its z: never into the caller's
      }
    } else if (p.stacked) {
      gemm<scalar_t>(true, false, 2 * kt, rows, p.d, p.stacked, p.d, h, p.d, buf, width);
    } else {
      gemm<scalar_t>(true, false, kt, rows, p.d, p.w + k0 * p.d, p.d, h, p.d, buf, width);
      if (p.has_gw) gemm<scalar_t>(true, false, kt, rows, p.d, p.gw + k0 * p.d, p.d, h, p.d, buf + kt, width);
    }
    const scalar_t* b = p.b ? p.b + k0 : nullptr;
    const scalar_t* gb = p.gb ? p.gb + k0 : nullptr;
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* z = buf + i * width;
      const scalar_t* c = gb;
      if (p.has_gw) {
        scalar_t* cw = z + kt;
        if (gb) {
#pragma omp simd
          for (int64_t j = 0; j < kt; ++j) cw[j] += gb[j];
        }
        c = cw;
      }
      bool finite = true;
      const scalar_t top = add_bias_and_max(z, b, kt, &finite);
      states[i].finite = states[i].finite && finite;
      shift_tile(states[i], z, c, k0, kt, top);
    }
    exp_rows(buf, rows, kt, width);
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* z = buf + i * width;
      add_tile(states[i], z, p.has_gw ? z + kt : gb, kt);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t norm_scale = (p.has_gw ? squared_norm(h + i * p.d, p.d) : acc_t(0)) + (p.gb ? 1 : 0);
    finish_row(states[i], norm_scale, gamma, out, r0 + i);
  }
}

template <typename scalar_t>
void score_rows(const Head<scalar_t>& p, double gamma, const Outputs<scalar_t>& out) {
  const int64_t per_block = p.rows_per_block;
  const int64_t blocks = (p.n + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<scalar_t> buf(per_block * 2 * std::min(kClassTile, p.k));
    std::vector<RowState> states(per_block);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t r0 = blk * per_block;
      score_block(p, gamma, r0, std::min(per_block, p.n - r0), buf.data(), states, out);
    }
  });
}

void check_grads(const at::Tensor& h, int64_t k, const std::optional<at::Tensor>& weight_grad,
                 const std::optional<at::Tensor>& bias_grad) {
  TORCH_CHECK(weight_grad.has_value() || bias_grad.has_value(),
              "fastdal (cpp): last_layer_score needs weight_grad, bias_grad or both");
  if (weight_grad.has_value()) {
    check_float_tensor(*weight_grad, "weight_grad", 2);
    check_same_dtype(*weight_grad, "weight_grad", h, "h");
    check_contiguous(*weight_grad, "weight_grad");
    TORCH_CHECK(weight_grad->size(0) == k && weight_grad->size(1) == h.size(1), "fastdal (cpp): weight_grad must be (",
                k, ", ", h.size(1), "), got ", weight_grad->sizes());
  }
  if (bias_grad.has_value()) {
    check_float_tensor(*bias_grad, "bias_grad", 1);
    check_same_dtype(*bias_grad, "bias_grad", h, "h");
    check_contiguous(*bias_grad, "bias_grad");
    TORCH_CHECK(bias_grad->size(0) == k, "fastdal (cpp): bias_grad must be (", k, ",), got ", bias_grad->sizes());
  }
}

void check_inputs(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& weight_grad, const std::optional<at::Tensor>& bias_grad) {
  check_float_tensor(h, "h", 2);
  check_contiguous(h, "h");
  const int64_t d = h.size(1);
  check_float_tensor(weight, "weight", 2);
  check_same_dtype(weight, "weight", h, "h");
  check_contiguous(weight, "weight");
  const int64_t k = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, "fastdal (cpp): weight must be (K, ", d, ") to match h, got ", weight.sizes());
  TORCH_CHECK(k > 0, "fastdal (cpp): weight must have at least one class (row), got ", weight.sizes());
  if (bias.has_value()) {
    check_float_tensor(*bias, "bias", 1);
    check_same_dtype(*bias, "bias", h, "h");
    check_contiguous(*bias, "bias");
    TORCH_CHECK(bias->size(0) == k, "fastdal (cpp): bias must be (", k, ",) to match weight, got ", bias->sizes());
  }
  check_grads(h, k, weight_grad, bias_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> last_layer_score_logits_cpu(
    const at::Tensor& h, const at::Tensor& logits, const std::optional<at::Tensor>& weight_grad,
    const std::optional<at::Tensor>& bias_grad, double gamma, std::string_view precision) {
  parse_precision(precision, "cpp");
  check_float_tensor(h, "h", 2);
  check_contiguous(h, "h");
  check_float_tensor(logits, "logits", 2);
  check_same_dtype(logits, "logits", h, "h");
  check_contiguous(logits, "logits");
  const int64_t n = h.size(0), k = logits.size(1);
  TORCH_CHECK(logits.size(0) == n, "fastdal (cpp): logits must have one row per row of h (", n, "), got ",
              logits.sizes());
  TORCH_CHECK(k > 0, "fastdal (cpp): logits must have at least one class (column), got ", logits.sizes());
  check_grads(h, k, weight_grad, bias_grad);
  auto score = at::empty({n}, h.options());
  auto sq = at::empty({n}, h.options());
  auto dot = at::empty({n}, h.options());
  auto label = at::empty({n}, h.options().dtype(at::kLong));
  if (n == 0) return {score, sq, dot, label};
  const int64_t rows_per_block = std::min(kRowBlock, (n + at::get_num_threads() - 1) / at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "last_layer_score_logits_cpu", [&] {
    const Head<scalar_t> p{h.data_ptr<scalar_t>(),
                           nullptr,
                           nullptr,
                           data_or_null<scalar_t>(weight_grad),
                           data_or_null<scalar_t>(bias_grad),
                           nullptr,
                           logits.data_ptr<scalar_t>(),
                           weight_grad.has_value(),
                           n,
                           h.size(1),
                           k,
                           rows_per_block};
    const Outputs<scalar_t> out{score.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(), dot.data_ptr<scalar_t>(),
                                label.data_ptr<int64_t>()};
    score_rows(p, gamma, out);
  });
  return {score, sq, dot, label};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> last_layer_score_cpu(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& weight_grad, const std::optional<at::Tensor>& bias_grad, double gamma,
    std::string_view precision) {
  parse_precision(precision, "cpp");
  check_inputs(h, weight, bias, weight_grad, bias_grad);
  const int64_t n = h.size(0);
  auto score = at::empty({n}, h.options());
  auto sq = at::empty({n}, h.options());
  auto dot = at::empty({n}, h.options());
  auto label = at::empty({n}, h.options().dtype(at::kLong));
  if (n == 0) return {score, sq, dot, label};
  const int64_t k = weight.size(0);
  const bool stack = weight_grad.has_value() && k <= kClassTile && h.size(1) > 0;
  const at::Tensor stacked = stack ? at::cat({weight, *weight_grad}) : at::Tensor();
  // Full blocks for large N; for small N, one block per thread rather than one block in all.
  const int64_t rows_per_block = std::min(kRowBlock, (n + at::get_num_threads() - 1) / at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "last_layer_score_cpu", [&] {
    const Head<scalar_t> p{h.data_ptr<scalar_t>(),
                           weight.data_ptr<scalar_t>(),
                           data_or_null<scalar_t>(bias),
                           data_or_null<scalar_t>(weight_grad),
                           data_or_null<scalar_t>(bias_grad),
                           stacked.defined() ? stacked.data_ptr<scalar_t>() : nullptr,
                           nullptr,
                           weight_grad.has_value(),
                           n,
                           h.size(1),
                           k,
                           rows_per_block};
    const Outputs<scalar_t> out{score.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(), dot.data_ptr<scalar_t>(),
                                label.data_ptr<int64_t>()};
    score_rows(p, gamma, out);
  });
  return {score, sq, dot, label};
}

}  // namespace
}  // namespace fastdal::cpu

TORCH_LIBRARY_IMPL(fastdal, CPU, m) {
  m.impl("last_layer_score", &fastdal::cpu::last_layer_score_cpu);
  m.impl("last_layer_score_logits", &fastdal::cpu::last_layer_score_logits_cpu);
}
