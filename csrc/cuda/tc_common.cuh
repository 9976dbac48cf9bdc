// What the tensor-core (WMMA) kernels share: the CUDA headers (or the CPU emulation's stand-ins), the architecture
// each 16-bit type needs, float conversions and the 16-byte load unit. Included by score_tc.cuh and attention_tc.cuh.
#pragma once

#include <cstdint>

#ifndef DCF_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#ifdef __CUDA_ARCH__
#define DCF_TC_ARCH __CUDA_ARCH__
#else
#define DCF_TC_ARCH 10000  // host pass of nvcc (the body is parsed, never run) and the CPU emulation
#endif

namespace denseclip_fast {
namespace tc {

constexpr int kFrag = 16;      // m = n = k of a WMMA fragment
constexpr int kPad = 8;        // 16-bit elements of padding per staged row (ldm stays a multiple of 16 bytes)
constexpr int kVecElems = 8;   // one 16-byte load

// Compute capability (as __CUDA_ARCH__, 10 * (10 * major + minor)) a dtype's tensor-core fragments need.
template <typename T>
constexpr int kMinArch = 800;  // __nv_bfloat16
template <>
constexpr int kMinArch<__half> = 700;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// max(x, lo) that keeps NaN, as torch's clamp_min (fmaxf returns lo for a NaN x: a NaN pixel's 1 / max(|v|, eps)
// would become 1e12 and its gradient finite).
__device__ __forceinline__ float clamp_min(float x, float lo) { return x < lo ? lo : x; }

template <typename T>
struct alignas(16) Pack {
  T v[kVecElems];
};

}  // namespace tc
}  // namespace denseclip_fast
