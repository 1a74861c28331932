// fastdal::kron_project on CPU.
//
// Row r has inputs a[r] (T, d_in) and output gradients delta[r] (T, d_out); with P_in = p_in
// (r_in, d_in) and P_out = p_out[r % groups] (r_out, d_out) the op returns (fastdal/ops.py states it)
//   out[r] = P_out (delta[r]^T a[r]) P_in^T = sum_t (P_out delta_t)(P_in a_t)^T   (r_out, r_in),
// at T (d_in r_in + d_out r_out + r_in r_out) per row. The weight gradient delta^T a (d_out, d_in),
// which would cost T d_in d_out, is never formed.
//
// Tiling: positions are taken kPosTile at a time. A tile's a_t and delta_t are projected with two
// GEMMs against P_in^T and P_out^T into thread-local (positions x r_in) and (positions x r_out)
// buffers, and the outer-product sum of the tile is one more GEMM into an (r_in x r_out) buffer,
// added into the row's float64 accumulator; a row's projections never leave L1/L2. A tile is a slice
// of one row (rows of T > kPosTile / 2 are split into even tiles), or, for small T, whole rows of one
// group: for T = 1 (a Linear layer) a tile per row would make every projection a matrix-vector
// product, while a tile of kPosTile rows makes it a GEMM, faster than the torch backend's batched
// one. Rows share tiles where they lie in memory as more positions would (T = 1, or contiguous rows
// and one group), and for T < kGatherBelow also where they must be gathered into a buffer.
//
// a and delta may have any strides (unfold gives (N, d, T) storage seen as (N, T, d)): a tile is
// handed to BLAS as it lies whenever one of its strides is 1, and copied to a thread-local buffer
// otherwise. Blocks of rows (one row each unless tiles span rows) run in parallel.
#include <algorithm>
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

// Positions per tile. With MKL on AMD Zen 5 (2 cores), conv shapes (T = 64 to 1024, d_in 288 to
// 1152, r = 16 or 32) run within a few percent of each other for 64, 128 and 256.
constexpr int64_t kPosTile = 128;

// Rows shorter than this share tiles even where they must be gathered into a buffer to do so. At
// T = 4 or 9 (unfold layout) a tile per row runs 2.5-3x slower, its thin GEMMs costing little more
// than the call; from T = 16 on the copy mostly costs more than it saves (7-25% at T = 16, 36, 49,
// 64; T = 25 gains 15%).
constexpr int64_t kGatherBelow = 16;


// Whether the rows of a group follow each other in memory as more positions would (T = 1, or
// contiguous rows and one group): a tile of several rows is then one strided matrix that BLAS reads
// in place.
bool end_to_end(int64_t t, int64_t groups, const int64_t* s) { return t == 1 || groups * s[0] == t * s[1]; }

template <typename T>
struct Problem {
  const T* a;
  const T* delta;
  const T* p_in;   // (r_in, d_in), contiguous
  const T* p_out;  // (groups, r_out, d_out), contiguous
  int64_t n, t, d_in, d_out, r_in, r_out, groups;
  int64_t sa[3], sd[3];
  // A tile holds up to rows_per_tile whole rows of one group when that is > 1, else a slice of one
  // row; pos_tile positions at most either way.
  int64_t rows_per_tile, pos_tile;
};

// The positions q0 .. q0 + nq of a block of rows (rows[0], rows[1], ...: one group, equally spaced)
// laid end to end, as a (nq x features) matrix of x (row stride s[0], position stride s[1], feature
// stride s[2]). A tile that spans rows starts at a row's first position; its positions are equally
// spaced in memory where the rows lie end to end (see end_to_end), else they are gathered into
// scratch.
template <typename T>
Mat<T> positions(const Problem<T>& p, const T* x, const int64_t* s, int64_t features, const int64_t* rows, int64_t q0,
                 int64_t nq, std::vector<T>& scratch) {
  const T* base = x + rows[q0 / p.t] * s[0] + (q0 % p.t) * s[1];
  if (nq <= p.t || end_to_end(p.t, p.groups, s)) return {base, nq, features, p.t == 1 ? p.groups * s[0] : s[1], s[2]};
  scratch.resize(nq * features);
  T* dst = scratch.data();
  // Copied in the order of memory: column-major from the unfold layout, row-major otherwise.
  const bool col_major = s[1] == 1 && s[2] != 1;
  for (int64_t q = 0; q < nq; q += p.t) {
    const T* src = x + rows[(q0 + q) / p.t] * s[0];
    if (col_major) {
      for (int64_t f = 0; f < features; ++f) std::copy_n(src + f * s[2], p.t, dst + f * nq + q);
    } else if (s[2] == 1) {
      for (int64_t t = 0; t < p.t; ++t) std::copy_n(src + t * s[1], features, dst + (q + t) * features);
    } else {
      for (int64_t t = 0; t < p.t; ++t)
        for (int64_t f = 0; f < features; ++f) dst[(q + t) * features + f] = src[t * s[1] + f * s[2]];
    }
  }
  return col_major ? Mat<T>{dst, nq, features, 1, nq} : Mat<T>{dst, nq, features, features, 1};
}

// Per-thread buffers, for tiles of up to pos_tile positions.
template <typename T>
struct Scratch {
  std::vector<T> a_copy, delta_copy;
  std::vector<T> ap, dp, outer;  // (positions x r_in), (positions x r_out), (r_in x r_out); column-major
  std::vector<acc_t> acc;        // (r_out, r_in) of the row being summed

  explicit Scratch(const Problem<T>& p)
      : ap(p.pos_tile * p.r_in), dp(p.pos_tile * p.r_out), outer(p.r_in * p.r_out), acc(p.r_in * p.r_out) {}
};

// Projects the positions q0 .. q0 + nq of the block `rows` (one group) and adds their outer
// products to the rows they belong to; a row is written to out once its last position is in.
template <typename T>
void project_tile(const Problem<T>& p, const int64_t* rows, int64_t q0, int64_t nq, Scratch<T>& s, T* out) {
  const Mat<T> a = blas_ready(positions(p, p.a, p.sa, p.d_in, rows, q0, nq, s.a_copy), s.a_copy);
  const Mat<T> delta = blas_ready(positions(p, p.delta, p.sd, p.d_out, rows, q0, nq, s.delta_copy), s.delta_copy);
  const Mat<T> p_in{p.p_in, p.r_in, p.d_in, p.d_in, 1};
  const Mat<T> p_out{p.p_out + (rows[0] % p.groups) * p.r_out * p.d_out, p.r_out, p.d_out, p.d_out, 1};
  matmul(a, p_in.t(), s.ap.data(), nq);         // ap = a P_in^T
  matmul(delta, p_out.t(), s.dp.data(), nq);    // dp = delta P_out^T
  const Mat<T> ap{s.ap.data(), nq, p.r_in, 1, nq}, dp{s.dp.data(), nq, p.r_out, 1, nq};
  const int64_t entries = p.r_in * p.r_out;
  for (int64_t q = q0; q < q0 + nq;) {  // one segment of positions of one row at a time
    const int64_t t0 = q % p.t, len = std::min(p.t - t0, q0 + nq - q);
    // outer (r_in x r_out, column-major) is out's (r_out, r_in) layout.
    matmul(ap.block(q - q0, len, 0, p.r_in).t(), dp.block(q - q0, len, 0, p.r_out), s.outer.data(), p.r_in);
    if (t0 == 0) std::fill(s.acc.begin(), s.acc.end(), acc_t(0));
    const T* outer = s.outer.data();
    acc_t* acc = s.acc.data();
#pragma omp simd
    for (int64_t e = 0; e < entries; ++e) acc[e] += outer[e];
    if (t0 + len == p.t) {
      T* dst = out + rows[q / p.t] * entries;
      for (int64_t e = 0; e < entries; ++e) dst[e] = static_cast<T>(acc[e]);
    }
    q += len;
  }
}

template <typename T>
void project_rows(const Problem<T>& p, T* out) {
  const int64_t samples = p.n / p.groups;
  // Rows per block: a whole tile's worth for small T, but no fewer blocks than threads.
  const int64_t per_block =
      std::clamp<int64_t>(std::min(p.rows_per_tile, ceil_div(p.n, at::get_num_threads())), 1, samples);
  const int64_t blocks_per_group = ceil_div(samples, per_block);
  const int64_t tile = per_block > 1 ? per_block * p.t : p.pos_tile;
  at::parallel_for(0, p.groups * blocks_per_group, 1, [&](int64_t first, int64_t last) {
    Scratch<T> scratch(p);
    std::vector<int64_t> rows(per_block);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t group = blk / blocks_per_group, s0 = (blk % blocks_per_group) * per_block;
      const int64_t count = std::min(per_block, samples - s0);
      for (int64_t j = 0; j < count; ++j) rows[j] = (s0 + j) * p.groups + group;
      const int64_t positions = count * p.t;
      for (int64_t q0 = 0; q0 < positions; q0 += tile)
        project_tile(p, rows.data(), q0, std::min(tile, positions - q0), scratch, out);
    }
  });
}

void check_inputs(const at::Tensor& a, const at::Tensor& delta, const at::Tensor& p_in, const at::Tensor& p_out) {
  check_float_tensor(a, "a", 3);
  check_float_tensor(delta, "delta", 3);
  check_float_tensor(p_in, "p_in", 2);
  check_float_tensor(p_out, "p_out", 3);
  check_same_dtype(delta, "delta", a, "a");
  check_same_dtype(p_in, "p_in", a, "a");
  check_same_dtype(p_out, "p_out", a, "a");
  const int64_t n = a.size(0), t = a.size(1), d_in = a.size(2), d_out = delta.size(2);
  TORCH_CHECK(delta.size(0) == n && delta.size(1) == t, "fastdal (cpp): delta must be (", n, ", ", t,
              ", d_out) to match a, got ", delta.sizes());
  TORCH_CHECK(p_in.size(1) == d_in, "fastdal (cpp): p_in must be (r_in, ", d_in, ") to match a, got ", p_in.sizes());
  TORCH_CHECK(p_out.size(2) == d_out, "fastdal (cpp): p_out must be (groups, r_out, ", d_out,
              ") to match delta, got ", p_out.sizes());
  const int64_t groups = p_out.size(0);
  TORCH_CHECK(groups >= 1 && n % groups == 0, "fastdal (cpp): p_out's first dimension (groups) must divide N=", n,
              ", got ", groups);
  check_contiguous(p_in, "p_in");
  check_contiguous(p_out, "p_out");
}

at::Tensor kron_project_cpu(const at::Tensor& a, const at::Tensor& delta, const at::Tensor& p_in,
                            const at::Tensor& p_out, std::string_view precision) {
  parse_precision(precision, "cpp");
  check_inputs(a, delta, p_in, p_out);
  const int64_t n = a.size(0), t = a.size(1), r_in = p_in.size(0), r_out = p_out.size(1);
  auto out = at::zeros({n, r_out, r_in}, a.options());
  if (out.numel() == 0 || t == 0) return out;  // an empty sum over positions
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kron_project_cpu", [&] {
    const bool several = t < kGatherBelow || (end_to_end(t, p_out.size(0), a.strides().data()) &&
                                              end_to_end(t, p_out.size(0), delta.strides().data()));
    const int64_t rows_per_tile = several ? std::max<int64_t>(1, kPosTile / t) : 1;
    const Problem<scalar_t> p{a.data_ptr<scalar_t>(),
                              delta.data_ptr<scalar_t>(),
                              p_in.data_ptr<scalar_t>(),
                              p_out.data_ptr<scalar_t>(),
                              n,
                              t,
                              a.size(2),
                              delta.size(2),
                              r_in,
                              r_out,
                              p_out.size(0),
                              {a.stride(0), a.stride(1), a.stride(2)},
                              {delta.stride(0), delta.stride(1), delta.stride(2)},
                              rows_per_tile,
                              rows_per_tile > 1 ? rows_per_tile * t : even_tile(t, kPosTile)};
    project_rows(p, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace fastdal::cpu

TORCH_LIBRARY_IMPL(fastdal, CPU, m) { m.impl("kron_project", &fastdal::cpu::kron_project_cpu); }
