// Fake CUDA for a CPU build of PyTorch, for tests (tests/fake_cuda/boot.py loads it before torch).
//
// FakeTensorMode can make tensors on cuda:0 without a GPU, but autograd asks the device guard registered for CUDA
// and the CUDA hooks whether such a device exists. This library registers c10's own FakeGuardImpl as the CUDA
// device guard and CUDA hooks that report one device, so that fastdal's forward and backward run on fake CUDA
// tensors. No kernel runs: fake tensors carry shapes, dtypes and devices only.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace at {

// The registry's key is the class name: at::detail::getCUDAHooks() creates "CUDAHooks".
struct CUDAHooks final : CUDAHooksInterface {
  explicit CUDAHooks(CUDAHooksArgs) {}
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex deviceCount() const override { return 1; }
  DeviceIndex current_device() const override { return 0; }
  DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(DeviceIndex) const override {}
  DeviceIndex exchangeDevice(DeviceIndex) const override { return 0; }
  DeviceIndex maybeExchangeDevice(DeviceIndex) const override { return 0; }
  bool isPinnedPtr(const void*) const override { return false; }
};
REGISTER_CUDA_HOOKS(CUDAHooks);

}  // namespace at

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
