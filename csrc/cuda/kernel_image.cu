// fastdal::cuda_kernel_image: whether this build of fastdal._C holds device code that runs on a given GPU.
//
// The default build carries native code for a few architectures plus PTX for the newest (setup.py); on an
// older GPU none of it loads, and the first launch would fail with "no kernel image is available". Asked
// before any op runs (fastdal/backends.py), the answer lets the automatic choice fall back to another
// backend with the reason stated. The driver is asked about a kernel of this build itself, so the answer
// holds whatever the build's architecture list was (every .cu file of csrc/cuda is compiled with the same).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace fastdal::cuda {
namespace {

__global__ void kernel_image_probe() {}

// The version (major * 10 + minor) of the device code the probe kernel runs as on the probe tensor's GPU
// (its SASS, or the PTX JIT-compiled for it), or 0 when the build has none that this GPU can run.
int64_t cuda_kernel_image(const at::Tensor& probe) {
  TORCH_CHECK(probe.is_cuda(), "fastdal (cuda): cuda_kernel_image needs a CUDA tensor, got one on ", probe.device());
  const c10::cuda::CUDAGuard guard(probe.device());
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel_image_probe));
  if (status == cudaErrorInvalidDeviceFunction || status == cudaErrorNoKernelImageForDevice) {
    (void)cudaGetLastError();  // clear the error the query left, so that the next CUDA call does not see it
    return 0;
  }
  C10_CUDA_CHECK(status);
  return attributes.binaryVersion;
}

}  // namespace
}  // namespace fastdal::cuda

TORCH_LIBRARY_IMPL(fastdal, CUDA, m) { m.impl("cuda_kernel_image", &fastdal::cuda::cuda_kernel_image); }
