// Whether the tensor-core (WMMA) kernels of score_tc.cuh and attention_tc.cuh run on a GPU: one decision, queried
// once per device, that the score forward, the score backward and the attention forward share.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace denseclip_fast {

// What the tensor-core path needs to know of a GPU.
struct TensorCoreGpu {
  bool half = false, bf16 = false;  // the tensor-core kernels of that dtype run there
  int sm_count = 0;
};

// The GPU's tensor-core facts when the dtype of `x` (a CUDA tensor on the current device) has tensor-core kernels
// there, else nullptr (also for every dtype when DENSECLIP_FAST_CUDA_TENSOR_CORES=0: the portable kernels).
const TensorCoreGpu* tensor_cores_for(const at::Tensor& x);

// A tensor's data as the CUDA type T of the tensor-core kernels (__half, __nv_bfloat16).
template <typename T>
T* data_as(const at::Tensor& x) {
  return reinterpret_cast<T*>(x.data_ptr());
}

// Calls f(T{}) with T the CUDA type of a 16-bit dtype (__half for float16, else __nv_bfloat16).
template <typename F>
void with_cuda_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) {
    f(__half{});
  } else {
    f(__nv_bfloat16{});
  }
}

}  // namespace denseclip_fast
