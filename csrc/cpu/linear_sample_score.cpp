// fastdal::linear_sample_score on CPU.
//
// Row r has inputs a[r] (T, d_in) and output gradients delta[r] (T, d_out); its weight gradient is
// g_r = delta[r]^T a[r] (d_out, d_in), and the op returns ||g_r||^2 and <g_r, G[r % groups]>
// (fastdal/ops.py states it). Two ways, chosen by the caller:
//
// * direct: g_r is formed tile by tile (at most kGradTileElems entries of (d_out, d_in)), each tile
//   a GEMM over T into a thread-local buffer that is reduced into both sums while it is still in
//   cache. The N x d_out x d_in per-sample gradients the torch backend writes and reads back never
//   exist. Tiles are as large as the budget allows and split evenly: for conv layers (T = 1024,
//   d_in up to 576) one GEMM per row runs 5-10% faster than 256-wide tiles plus a thin remainder.
// * ghost: ||g_r||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s) over kPosTile x kPosTile tiles of the
//   two Gram matrices (upper-triangular tiles only, off-diagonal ones counted twice), and
//   <g_r, G> = sum_t delta_t . (G a_t). The second is one GEMM against G for a tile of positions
//   gathered from several rows of the same group: for T = 1 (a Linear layer) a per-row product would
//   be a matrix-vector product that reads all of G for every row.
//
// a and delta may have any strides (unfold gives (N, d, T) storage seen as (N, T, d)): a row is
// handed to BLAS as it lies whenever one of its strides is 1, and copied to a thread-local buffer
// otherwise. Rows (or, in ghost mode, blocks of rows of one group) run in parallel.
//
// In direct mode, float32 rows in the unfold layout skip BLAS where direct_avx2.cpp says it is faster:
// that kernel forms g in registers with the positions in the SIMD lanes.
#include <algorithm>
#include <string_view>
#include <vector>

#include "common.h"
#include "direct_avx2.h"

// Defined in csrc/fastdal.cpp: validates the ops' `precision` argument ("ieee", "tf32x3", "tf32"),
// which the CPU kernels accept and ignore: they are exact whatever it says.
namespace fastdal {
int parse_precision(std::string_view precision, const char* backend);
}

namespace fastdal::cpu {
namespace {

constexpr int64_t kGradTileElems = 1 << 17;  // direct: entries of g per tile (512 KiB in float32, L2-sized)
constexpr int64_t kGradTileOut = 512;         // direct: rows (d_out) of g per tile, at most
constexpr int64_t kPosTile = 128;             // ghost: Gram tiles, and positions per dot GEMM
constexpr int64_t kOutTile = 512;             // ghost: rows of G per dot GEMM


template <typename T>
struct Problem {
  const T* a;
  const T* delta;
  // G, contiguous: (groups, d_out, d_in), or (groups, d_in, d_out) in direct mode through BLAS when the
  // tiles of g are held d_out-fastest (kOutFastest); null without weight_grad.
  const T* grad;
  int64_t n, t, d_in, d_out, groups;
  int64_t sa[3], sd[3];

  Mat<T> a_row(int64_t r) const { return {a + r * sa[0], t, d_in, sa[1], sa[2]}; }
  Mat<T> delta_row(int64_t r) const { return {delta + r * sd[0], t, d_out, sd[1], sd[2]}; }
  const T* grad_of(int64_t r) const { return grad ? grad + (r % groups) * d_out * d_in : nullptr; }
};

// Sums of g^2 and of g * G over a tile of g held column-major (rows x cols, leading dimension rows)
// in g, with the matching entries of G at grad (same layout, leading dimension ld; null: no dot).
template <typename T>
void reduce_tile(const T* g, int64_t rows, int64_t cols, const T* grad, int64_t ld, acc_t* sq, acc_t* dot) {
  acc_t s = 0, d = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const T* gj = g + j * rows;
    if (grad) {
      const T* Gj = grad + j * ld;
#pragma omp simd reduction(+ : s, d)
      for (int64_t i = 0; i < rows; ++i) {
        s += static_cast<acc_t>(gj[i]) * gj[i];
        d += static_cast<acc_t>(gj[i]) * Gj[i];
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < rows; ++i) s += static_cast<acc_t>(gj[i]) * gj[i];
    }
  }
  *sq += s;
  *dot += d;
}

// Direct: tile sizes (d_out, d_in) of g.
struct GradTile {
  int64_t out, in;
};

GradTile direct_tile(int64_t d_out, int64_t d_in) {
  const int64_t out = even_tile(d_out, kGradTileOut);
  return {out, even_tile(d_in, std::max<int64_t>(1, kGradTileElems / out))};
}

// Direct: whether tiles of g are computed d_out-fastest (d_out as BLAS's m) or d_in-fastest. Both are
// exact; measured with MKL on AMD Zen 4 over conv-layer shapes, float32 GEMMs run as fast or up to
// 1.4x faster (d_in = 27, d_out = 32) with d_out there, float64 ones 15-20% faster with d_in there.
template <typename T>
constexpr bool kOutFastest = std::is_same_v<T, float>;

// Direct: ||g||^2 and <g, G> of one row from tiles of g = delta^T a (buf: tile.out x tile.in
// scalars). grad is this row's G, laid out as the tiles are (see Problem::grad).
template <typename T>
void direct_row(const Problem<T>& p, GradTile tile, const Mat<T>& a, const Mat<T>& delta, const T* grad, T* buf,
                acc_t* sq, acc_t* dot) {
  for (int64_t i0 = 0; i0 < p.d_in; i0 += tile.in) {
    const int64_t ni = std::min(tile.in, p.d_in - i0);
    for (int64_t o0 = 0; o0 < p.d_out; o0 += tile.out) {
      const int64_t no = std::min(tile.out, p.d_out - o0);
      const Mat<T> a_tile = a.block(0, p.t, i0, ni), delta_tile = delta.block(0, p.t, o0, no);
      if constexpr (kOutFastest<T>) {  // buf (no x ni, column-major) = delta_tile^T a_tile
        matmul(delta_tile.t(), a_tile, buf, no);
        reduce_tile(buf, no, ni, grad ? grad + i0 * p.d_out + o0 : nullptr, p.d_out, sq, dot);
      } else {  // buf (ni x no, column-major) = a_tile^T delta_tile
        matmul(a_tile.t(), delta_tile, buf, ni);
        reduce_tile(buf, ni, no, grad ? grad + o0 * p.d_in + i0 : nullptr, p.d_in, sq, dot);
      }
    }
  }
}

// Direct: whether direct_row_avx2 serves these rows: float32, positions contiguous in a and delta,
// at least one SIMD vector of them, and a CPU where that kernel beats BLAS.
template <typename T>
bool direct_in_registers(const at::Tensor& a, const at::Tensor& delta) {
  constexpr int64_t kMinPositions = 8;
  return std::is_same_v<T, float> && a.size(1) >= kMinPositions && a.stride(1) == 1 && delta.stride(1) == 1 &&
         direct_avx2_usable();
}

// Direct: each row in registers (float32 only, see direct_in_registers; G then laid out (d_out, d_in))
// or tile by tile through BLAS.
template <typename T>
void direct_rows(const Problem<T>& p, bool in_registers, T* sq_out, T* dot_out) {
  const GradTile tile = direct_tile(p.d_out, p.d_in);
  at::parallel_for(0, p.n, 1, [&](int64_t first, int64_t last) {
    std::vector<T> buf(in_registers ? 0 : tile.out * tile.in), a_copy, delta_copy;
    for (int64_t r = first; r < last; ++r) {
      acc_t sq = 0, dot = 0;
      if (in_registers) {
        if constexpr (std::is_same_v<T, float>) {
          direct_row_avx2(p.a + r * p.sa[0], p.sa[2], p.delta + r * p.sd[0], p.sd[2], p.t, p.d_in, p.d_out,
                          p.grad_of(r), &sq, &dot);
        }
      } else {
        direct_row(p, tile, blas_ready(p.a_row(r), a_copy), blas_ready(p.delta_row(r), delta_copy), p.grad_of(r),
                   buf.data(), &sq, &dot);
      }
      sq_out[r] = static_cast<T>(sq);
      if (dot_out) dot_out[r] = static_cast<T>(dot);
    }
  });
}

// Ghost: ||g||^2 of one row from tiles of the Gram matrices a a^T and delta delta^T (each buffer
// kPosTile^2 scalars).
template <typename T>
acc_t ghost_sq(const Problem<T>& p, const Mat<T>& a, const Mat<T>& delta, T* gram_a, T* gram_d) {
  acc_t sq = 0;
  for (int64_t t0 = 0; t0 < p.t; t0 += kPosTile) {
    const int64_t nt = std::min(kPosTile, p.t - t0);
    for (int64_t s0 = t0; s0 < p.t; s0 += kPosTile) {
      const int64_t ns = std::min(kPosTile, p.t - s0);
      matmul(a.block(t0, nt, 0, p.d_in), a.block(s0, ns, 0, p.d_in).t(), gram_a, nt);
      matmul(delta.block(t0, nt, 0, p.d_out), delta.block(s0, ns, 0, p.d_out).t(), gram_d, nt);
      sq += (s0 == t0 ? 1 : 2) * sum_of_products(gram_a, gram_d, nt * ns);
    }
  }
  return sq;
}

// Ghost: <g_j, G> for the rows rows[0..count) of one group: positions (row, t) are taken kPosTile at
// a time, their a_t copied into `gathered` (kPosTile x d_in), and G a_t (columns of `proj`,
// kOutTile x kPosTile) reduced against delta_t.
template <typename T>
void ghost_dots(const Problem<T>& p, const int64_t* rows, int64_t count, const T* grad, T* gathered, T* proj,
                acc_t* dots) {
  const int64_t positions = count * p.t;
  for (int64_t q0 = 0; q0 < positions; q0 += kPosTile) {
    const int64_t nq = std::min(kPosTile, positions - q0);
    for (int64_t q = 0; q < nq; ++q) {
      const Mat<T> a = p.a_row(rows[(q0 + q) / p.t]);
      const T* src = a.p + ((q0 + q) % p.t) * a.rs;
      T* dst = gathered + q * p.d_in;
      for (int64_t i = 0; i < p.d_in; ++i) dst[i] = src[i * a.cs];
    }
    const Mat<T> positions_mat{gathered, nq, p.d_in, p.d_in, 1};
    for (int64_t o0 = 0; o0 < p.d_out; o0 += kOutTile) {
      const int64_t no = std::min(kOutTile, p.d_out - o0);
      const Mat<T> g_tile{grad + o0 * p.d_in, no, p.d_in, p.d_in, 1};
      matmul(g_tile, positions_mat.t(), proj, no);  // column q: (G a_q) over the o-tile
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t j = (q0 + q) / p.t;
        const Mat<T> d = p.delta_row(rows[j]);
        const T* dq = d.p + ((q0 + q) % p.t) * d.rs + o0 * d.cs;
        const T* col = proj + q * no;
        acc_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t o = 0; o < no; ++o) s += static_cast<acc_t>(col[o]) * dq[o * d.cs];
        dots[j] += s;
      }
    }
  }
}

template <typename T>
void ghost_rows(const Problem<T>& p, T* sq_out, T* dot_out) {
  const int64_t samples = p.n / p.groups;
  // Rows per block: enough for a full position tile (each tile reads all of G), but no fewer blocks
  // than threads. Blocks cost the same, so one per thread balances.
  const int64_t per_block = std::clamp<int64_t>(
      std::min(ceil_div(kPosTile, p.t), ceil_div(p.n, at::get_num_threads())), 1, samples);
  const int64_t blocks_per_group = ceil_div(samples, per_block);
  at::parallel_for(0, p.groups * blocks_per_group, 1, [&](int64_t first, int64_t last) {
    std::vector<T> gram_a(kPosTile * kPosTile), gram_d(kPosTile * kPosTile), a_copy, delta_copy;
    std::vector<T> gathered(p.grad ? kPosTile * p.d_in : 0), proj(p.grad ? kOutTile * kPosTile : 0);
    std::vector<int64_t> rows(per_block);
    std::vector<acc_t> dots(per_block);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t group = blk / blocks_per_group, s0 = (blk % blocks_per_group) * per_block;
      const int64_t count = std::min(per_block, samples - s0);
      for (int64_t j = 0; j < count; ++j) {
        rows[j] = (s0 + j) * p.groups + group;
        const Mat<T> a = blas_ready(p.a_row(rows[j]), a_copy), d = blas_ready(p.delta_row(rows[j]), delta_copy);
        sq_out[rows[j]] = static_cast<T>(ghost_sq(p, a, d, gram_a.data(), gram_d.data()));
      }
      if (!p.grad) continue;
      std::fill(dots.begin(), dots.end(), acc_t(0));
      ghost_dots(p, rows.data(), count, p.grad_of(group), gathered.data(), proj.data(), dots.data());
      for (int64_t j = 0; j < count; ++j) dot_out[rows[j]] = static_cast<T>(dots[j]);
    }
  });
}

void check_inputs(const at::Tensor& a, const at::Tensor& delta, const std::optional<at::Tensor>& weight_grad,
                  int64_t groups) {
  check_float_tensor(a, "a", 3);
  check_float_tensor(delta, "delta", 3);
  check_same_dtype(delta, "delta", a, "a");
  const int64_t n = a.size(0), t = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  TORCH_CHECK(delta.size(0) == n && delta.size(1) == t, "fastdal (cpp): delta must be (", n, ", ", t,
              ", d_out) to match a, got ", delta.sizes());
  TORCH_CHECK(groups >= 1 && n % groups == 0, "fastdal (cpp): groups must be a positive integer dividing N=", n,
              ", got ", groups);
  if (weight_grad.has_value()) {
    check_float_tensor(*weight_grad, "weight_grad", 3);
    check_same_dtype(*weight_grad, "weight_grad", a, "a");
    check_contiguous(*weight_grad, "weight_grad");
    TORCH_CHECK(weight_grad->size(0) == groups && weight_grad->size(1) == d_out && weight_grad->size(2) == d_in,
                "fastdal (cpp): weight_grad must be (groups, d_out, d_in) = (", groups, ", ", d_out, ", ", d_in,
                "), got ", weight_grad->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> linear_sample_score_cpu(const at::Tensor& a, const at::Tensor& delta,
                                                           const std::optional<at::Tensor>& weight_grad,
                                                           int64_t groups, bool ghost,
                                                           std::string_view precision) {
  parse_precision(precision, "cpp");
  check_inputs(a, delta, weight_grad, groups);
  const int64_t n = a.size(0);
  auto sq = at::zeros({n}, a.options());
  auto dot = at::zeros({n}, a.options());
  if (a.numel() == 0 || delta.numel() == 0) return {sq, dot};  // g is empty or zero
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_sample_score_cpu", [&] {
    const bool in_registers = !ghost && direct_in_registers<scalar_t>(a, delta);
    at::Tensor grad;
    if (weight_grad.has_value()) {
      const bool transpose = !ghost && !in_registers && kOutFastest<scalar_t>;
      grad = transpose ? weight_grad->transpose(1, 2).contiguous() : *weight_grad;
    }
    const Problem<scalar_t> p{a.data_ptr<scalar_t>(),
                              delta.data_ptr<scalar_t>(),
                              grad.defined() ? grad.data_ptr<scalar_t>() : nullptr,
                              n,
                              a.size(1),
                              a.size(2),
                              delta.size(2),
                              groups,
                              {a.stride(0), a.stride(1), a.stride(2)},
                              {delta.stride(0), delta.stride(1), delta.stride(2)}};
    scalar_t* dot_out = grad.defined() ? dot.data_ptr<scalar_t>() : nullptr;
    if (ghost) {
      ghost_rows(p, sq.data_ptr<scalar_t>(), dot_out);
    } else {
      direct_rows(p, in_registers, sq.data_ptr<scalar_t>(), dot_out);
    }
  });
  return {sq, dot};
}

}  // namespace
}  // namespace fastdal::cpu

TORCH_LIBRARY_IMPL(fastdal, CPU, m) { m.impl("linear_sample_score", &fastdal::cpu::linear_sample_score_cpu); }
