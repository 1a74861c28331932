// The `fastdal` operator library: op schemas are declared here, implementations register in
// csrc/cpu/<op>.cpp (OpenMP) and csrc/cuda/<op>.cu. No compiled op exists yet; every op runs on the
// `torch` backend (fastdal/backends.py).
#include <torch/library.h>

TORCH_LIBRARY(fastdal, m) {
  (void)m;  // schemas come with the first compiled op
}
