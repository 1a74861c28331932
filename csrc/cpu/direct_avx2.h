// The direct norm of linear_sample_score for float32 rows whose positions are contiguous (the unfold
// layout of conv layers), without BLAS: see direct_avx2.cpp.
#pragma once

#include <cstdint>

namespace fastdal::cpu {

// Whether direct_row_avx2 runs on this CPU and is the faster choice: x86-64 with AVX2 and FMA, and
// no AVX-512 (there MKL's 512-bit kernels can outrun these 256-bit ones; see direct_avx2.cpp).
bool direct_avx2_usable();

// ||g||^2 and <g, G> of g = delta^T a for one row, where position s of input i is a[i * a_ld + s]
// and of output o is delta[o * d_ld + s] (0 <= s < t); grad is G, (d_out, d_in) contiguous, or null
// (then *dot is left at 0). Only call it when direct_avx2_usable().
void direct_row_avx2(const float* a, int64_t a_ld, const float* delta, int64_t d_ld, int64_t t, int64_t d_in,
                     int64_t d_out, const float* grad, double* sq, double* dot);

}  // namespace fastdal::cpu
