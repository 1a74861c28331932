// One sample's unfolded convolution input (im2col), shared by the CPU kernels that form per-sample
// convolution gradients (conv_sample_score.cpp) and the unfold op (unfold.cpp).
#pragma once

#include <cstdint>

namespace fastdal::cpu {

// A convolution's shape, 1-D ones as 2-D with a height of one.
struct Geometry {
  int64_t channels, height, width;        // of one group's input
  int64_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w;
  int64_t out_h, out_w;                   // positions of the output
  int64_t rows() const { return channels * kernel_h * kernel_w; }  // of the unfolded input
  int64_t positions() const { return out_h * out_w; }
};

// The unfolded input of one sample's group: row (c, i, j) holds x[c, y * stride_h + i * dilation_h,
// x * stride_w + j * dilation_w] over the output positions (y, x); `cols` is rows() x positions().
template <typename scalar_t>
void unfold(const scalar_t* x, const Geometry& g, scalar_t* cols) {
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t i = 0; i < g.kernel_h; ++i)
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        scalar_t* row = cols + ((c * g.kernel_h + i) * g.kernel_w + j) * g.positions();
        for (int64_t y = 0; y < g.out_h; ++y) {
          const scalar_t* src = x + (c * g.height + y * g.stride_h + i * g.dilation_h) * g.width + j * g.dilation_w;
          scalar_t* dst = row + y * g.out_w;
          for (int64_t o = 0; o < g.out_w; ++o) dst[o] = src[o * g.stride_w];
        }
      }
}

}  // namespace fastdal::cpu
