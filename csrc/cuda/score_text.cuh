// The text side of pixel_text_score's tensor-core backward (launched by score.cu), the twins of the Triton kernels
// _text_normalize_kernel and _text_grad_kernel in denseclip_fast/ops/triton/score.py; plain CUDA, no ATen, so that
// the CPU emulation test (tests/cuda_emulation/score_text_main.cpp) runs them too. One warp per row of the dense
// (R, C) text (R = K, or B * K for per-image text), the lanes striding over the channels.
//   text_normalize_kernel: t^ = t / max(|t|, eps) in float32 (for the Jacobian) and in T (for the tensor-core
//                          kernel), and |t|.
//   text_grad_kernel:      grad_t = (g - t^ <t^, g>) / |t| where |t| >= eps, g / eps below (F.normalize's clamp),
//                          g (R, C) float32 the gradient with respect to t^ (already summed over the batch for
//                          text shared by it), written in T.
// max(|t|, eps) keeps NaN (tc::clamp_min), as torch's clamp_min.
#pragma once

#include <cstdint>

#include "tc_common.cuh"  // the CUDA headers (or the emulation's), to_float / from_float

namespace denseclip_fast {
namespace text {

using tc::clamp_min;
using tc::from_float;
using tc::to_float;

constexpr int kWarps = 8;  // rows per block
constexpr float kEps = 1e-12f;

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    text_normalize_kernel(const T* __restrict__ t, float* __restrict__ t_hat32, T* __restrict__ t_hat,
                          float* __restrict__ norm, int64_t R, int64_t C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= R) return;  // whole warps leave together: the shuffles below see all 32 lanes
  const T* tr = t + row * C;
  float sq = 0.0f;
  for (int64_t c = lane; c < C; c += 32) {
    const float x = to_float(tr[c]);
    sq += x * x;
  }
  const float n = sqrtf(warp_sum(sq)), inv = 1.0f / clamp_min(n, kEps);
  if (lane == 0) norm[row] = n;
  for (int64_t c = lane; c < C; c += 32) {
    const float x = to_float(tr[c]) * inv;
    t_hat32[row * C + c] = x;
    t_hat[row * C + c] = from_float<T>(x);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    text_grad_kernel(const float* __restrict__ gt, const float* __restrict__ t_hat32, const float* __restrict__ norm,
                     T* __restrict__ out, int64_t R, int64_t C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= R) return;
  const float* g = gt + row * C;
  const float* h = t_hat32 + row * C;
  float dot = 0.0f;
  for (int64_t c = lane; c < C; c += 32) dot += g[c] * h[c];
  dot = warp_sum(dot);
  const float n = norm[row], inv = 1.0f / clamp_min(n, kEps), radial = n >= kEps ? dot : 0.0f;
  for (int64_t c = lane; c < C; c += 32) out[row * C + c] = from_float<T>((g[c] - h[c] * radial) * inv);
}

}  // namespace text
}  // namespace denseclip_fast
