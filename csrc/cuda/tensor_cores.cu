// tensor_cores_for(): which 16-bit dtypes have working tensor-core kernels on a GPU (see tensor_cores.h).
#include "tensor_cores.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "tc_common.cuh"

namespace denseclip_fast {
namespace {

// An empty kernel, compiled (as every kernel of the extension) for the architectures of the build: the PTX version
// the driver reports for it is the one it picked for the tensor-core kernels too.
__global__ void arch_probe_kernel() {}

// The PTX version (as __CUDA_ARCH__) of the code the driver runs on the current device, 0 when there is none.
int ptx_arch() {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, arch_probe_kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // no code for this GPU at all: the portable kernel's launch reports it
    return 0;
  }
  return attr.ptxVersion * 10;
}

// Whether the tensor-core kernels for T have their bodies on a device of compute capability `arch` (as
// __CUDA_ARCH__): the GPU has the fragments, and the code the driver picks (a cubin, or PTX it compiles) was built
// for an architecture that has them (built for sm_75 only with +PTX, the bfloat16 kernels are empty and trap).
template <typename T>
bool tensor_core_kernels_run(int arch, int ptx) {
  return arch >= tc::kMinArch<T> && ptx >= tc::kMinArch<T>;
}

const TensorCoreGpu& tensor_core_gpu(int index) {
  static std::mutex mutex;
  static std::map<int, TensorCoreGpu> gpus;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = gpus.find(index);
  if (found != gpus.end()) return found->second;
  int major = 0, minor = 0;
  TensorCoreGpu gpu;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&gpu.sm_count, cudaDevAttrMultiProcessorCount, index));
  const int arch = 100 * major + 10 * minor;
  const int ptx = ptx_arch();
  gpu.half = tensor_core_kernels_run<__half>(arch, ptx);
  gpu.bf16 = tensor_core_kernels_run<__nv_bfloat16>(arch, ptx);
  return gpus.emplace(index, gpu).first->second;
}

// DENSECLIP_FAST_CUDA_TENSOR_CORES=0: the portable kernels for float16 and bfloat16 too, the path of a GPU without
// tensor-core kernels for the dtype (bfloat16 on a T4, a build without code for the GPU's tensor cores), so that a
// GPU that has them can test it. Read at every call (a getenv, against a launch's microseconds): a test switches
// it with os.environ, which sets the process environment.
bool tensor_cores_disabled() {
  const char* value = std::getenv("DENSECLIP_FAST_CUDA_TENSOR_CORES");
  return value != nullptr && std::strcmp(value, "0") == 0;
}

}  // namespace

const TensorCoreGpu* tensor_cores_for(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || tensor_cores_disabled()) return nullptr;
  const TensorCoreGpu& gpu = tensor_core_gpu(x.device().index());
  return (dtype == at::kHalf ? gpu.half : gpu.bf16) ? &gpu : nullptr;
}

}  // namespace denseclip_fast
