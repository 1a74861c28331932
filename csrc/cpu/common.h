// Helpers shared by the CPU kernels of csrc/cpu: argument checks and a GEMM on raw pointers.
//
// The kernels call GEMM on small thread-local tiles from inside at::parallel_for, up to thousands of
// times per op, so the call should cost no more than the BLAS routine itself; at::mm_out adds the
// dispatcher and a tensor wrapped around every pointer to each call. The Fortran BLAS that
// libtorch_cpu exports (MKL or OpenBLAS: sgemm_/dgemm_) is called directly when the loader finds it;
// the references are weak, so a torch without them still loads this library and falls back to
// at::mm_out. Inside at::parallel_for both run single-threaded, which the row-parallel kernels want.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastdal::cpu {

// Sums of products run in double for float32 inputs too: it costs little next to the GEMMs and keeps
// the kernels' rounding error below the float32 torch backend's.
using acc_t = double;

inline void check_float_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "fastdal (cpp): ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastdal (cpp): ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "fastdal (cpp): ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastdal (cpp): ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fastdal (cpp): ", name, " must be contiguous, got strides ", t.strides());
}

// Data pointer of an optional tensor, nullptr when it is absent.
template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

namespace detail {

inline int blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "fastdal (cpp): a GEMM dimension or stride (", v, ") exceeds the BLAS int range");
  return static_cast<int>(v);
}

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* a,
                         const int* lda, const float* b, const int* ldb, float* c, const int* ldc) {
  const float one = 1, zero = 0;
  sgemm_(ta, tb, m, n, k, &one, a, lda, b, ldb, &zero, c, ldc);
}

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* a,
                         const int* lda, const double* b, const int* ldb, double* c, const int* ldc) {
  const double one = 1, zero = 0;
  dgemm_(ta, tb, m, n, k, &one, a, lda, b, ldb, &zero, c, ldc);
}

template <typename scalar_t>
bool have_fortran_gemm() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// A column-major (rows x cols, ld) matrix as a tensor view, for the at::mm_out fallback.
template <typename scalar_t>
at::Tensor column_major(const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  auto view = at::from_blob(const_cast<scalar_t*>(p), {transposed ? cols : rows, transposed ? rows : cols},
                            {1, ld}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  return transposed ? view.t() : view;
}

}  // namespace detail

// Column-major C (m x n, leading dimension ldc) = op(A) op(B), op(X) = X^T when trans_x; the BLAS
// convention. op(A) is m x k, op(B) is k x n. Leading dimensions must satisfy BLAS's bounds.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum; BLAS implementations differ on whether they touch C then
    for (int64_t j = 0; j < n; ++j) std::fill(c + j * ldc, c + j * ldc + m, scalar_t(0));
    return;
  }
  if (detail::have_fortran_gemm<scalar_t>()) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = detail::blas_int(m), in = detail::blas_int(n), ik = detail::blas_int(k);
    const int ilda = detail::blas_int(lda), ildb = detail::blas_int(ldb), ildc = detail::blas_int(ldc);
    detail::fortran_gemm(&ta, &tb, &im, &in, &ik, a, &ilda, b, &ildb, c, &ildc);
    return;
  }
  auto out = detail::column_major(c, m, n, ldc, false);
  at::mm_out(out, detail::column_major(a, m, k, lda, trans_a), detail::column_major(b, k, n, ldb, trans_b));
}

// Tiling helpers shared by the kernels that multiply strided tiles with gemm.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The largest tile size <= max_tile that splits extent into equal tiles (up to rounding).
inline int64_t even_tile(int64_t extent, int64_t max_tile) {
  return ceil_div(extent, ceil_div(extent, max_tile));
}

// A strided matrix: element (i, j) at p[i * rs + j * cs].
template <typename T>
struct Mat {
  const T* p;
  int64_t rows, cols, rs, cs;

  Mat block(int64_t r0, int64_t nr, int64_t c0, int64_t nc) const { return {p + r0 * rs + c0 * cs, nr, nc, rs, cs}; }
  Mat t() const { return {p, cols, rows, cs, rs}; }
  // Whether BLAS can read it as stored, row by row or column by column (a stride of a dimension of
  // size 1 does not matter).
  bool row_major() const { return (cs == 1 || cols == 1) && (rows == 1 || rs >= cols); }
  bool col_major() const { return (rs == 1 || rows == 1) && (cols == 1 || cs >= rows); }
};

// m itself when BLAS can read it, else a row-major copy of it in scratch.
template <typename T>
Mat<T> blas_ready(const Mat<T>& m, std::vector<T>& scratch) {
  if (m.row_major() || m.col_major()) return m;
  scratch.resize(m.rows * m.cols);
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t j = 0; j < m.cols; ++j) scratch[i * m.cols + j] = m.p[i * m.rs + j * m.cs];
  return {scratch.data(), m.rows, m.cols, m.cols, 1};
}

// Column-major C (x.rows x y.cols, leading dimension ldc) = x y, for BLAS-ready x and y.
template <typename T>
void matmul(const Mat<T>& x, const Mat<T>& y, T* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY((x.row_major() || x.col_major()) && (y.row_major() || y.col_major()));
  // A column-major matrix is passed as is; a row-major one as the transpose of its column-major view.
  const bool tx = !x.col_major(), ty = !y.col_major();
  const int64_t ldx = tx ? (x.rows == 1 ? x.cols : x.rs) : (x.cols == 1 ? x.rows : x.cs);
  const int64_t ldy = ty ? (y.rows == 1 ? y.cols : y.rs) : (y.cols == 1 ? y.rows : y.cs);
  gemm<T>(tx, ty, x.rows, y.cols, x.cols, x.p, std::max<int64_t>(ldx, 1), y.p, std::max<int64_t>(ldy, 1), c,
          std::max<int64_t>(ldc, 1));
}

// sum_j x[j] y[j], accumulated in acc_t.
template <typename T>
acc_t sum_of_products(const T* x, const T* y, int64_t len) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < len; ++j) s += static_cast<acc_t>(x[j]) * y[j];
  return s;
}

}  // namespace fastdal::cpu
