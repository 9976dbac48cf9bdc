// The portable CUDA kernel of pixel_text_score's forward (FMA units; float32, float64, and 16-bit types where the
// tensor-core kernel of score_tc.cuh cannot run), launched by score.cu; plain CUDA, no ATen, so that the CPU
// emulation test (tests/cuda_emulation) runs it too. See score.cu for the algorithm.
#pragma once

#include <cmath>
#include <cstdint>

namespace denseclip_fast {
namespace portable {

constexpr int kTileK = 64, kTileP = 64, kTileC = 16, kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void score_forward_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ t,
                                     scalar_t* __restrict__ out, acc_t* __restrict__ norm, int64_t C, int64_t P,
                                     int64_t K, int64_t s_vb, int64_t s_vc, int64_t s_vp, int64_t s_tb,
                                     int64_t s_tk, int64_t s_ob, int64_t s_ok, int64_t s_op, acc_t scale) {
  __shared__ acc_t vs[kTileC][kTileP];
  __shared__ acc_t ts[kTileK][kTileC + 1];
  __shared__ acc_t v_sq[kTileP], t_sq[kTileK];
  const int tid = threadIdx.x;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTileP, k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
  const int64_t b = blockIdx.z;
  const scalar_t* vb = v + b * s_vb;
  const scalar_t* tb = t + b * s_tb;
  const bool c_fastest = s_vc == 1;  // NHWC: consecutive threads walk the channels
  if (tid < kTileP) v_sq[tid] = 0;
  if (tid < kTileK) t_sq[tid] = 0;
  __syncthreads();
  acc_t acc[4][4] = {};
  const int tk = (tid / 16) * 4, tp = (tid % 16) * 4;  // this thread's 4 x 4 micro-tile
  for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
    for (int i = tid; i < kTileC * kTileP; i += kThreads) {
      const int c = c_fastest ? i % kTileC : i / kTileP, p = c_fastest ? i / kTileC : i % kTileP;
      const bool ok = c0 + c < C && p0 + p < P;
      vs[c][p] = ok ? static_cast<acc_t>(vb[(c0 + c) * s_vc + (p0 + p) * s_vp]) : acc_t(0);
    }
    for (int i = tid; i < kTileK * kTileC; i += kThreads) {
      const int k = i / kTileC, c = i % kTileC;
      const bool ok = k0 + k < K && c0 + c < C;
      ts[k][c] = ok ? static_cast<acc_t>(tb[(k0 + k) * s_tk + c0 + c]) : acc_t(0);
    }
    __syncthreads();
    if (tid < kTileP) {
      acc_t ss = 0;
      for (int c = 0; c < kTileC; ++c) ss += vs[c][tid] * vs[c][tid];
      v_sq[tid] += ss;
    } else if (tid < kTileP + kTileK) {
      const int k = tid - kTileP;
      acc_t ss = 0;
      for (int c = 0; c < kTileC; ++c) ss += ts[k][c] * ts[k][c];
      t_sq[k] += ss;
    }
    for (int c = 0; c < kTileC; ++c) {
      acc_t tv[4], vv[4];
      for (int i = 0; i < 4; ++i) tv[i] = ts[tk + i][c];
      for (int j = 0; j < 4; ++j) vv[j] = vs[c][tp + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += tv[i] * vv[j];
    }
    __syncthreads();
  }
  const acc_t eps = static_cast<acc_t>(1e-12);  // kNormEps (common.h), F.normalize's eps
  if (blockIdx.y == 0 && tid < kTileP && p0 + tid < P) norm[b * P + p0 + tid] = sqrt(v_sq[tid]);  // |v| (B, P)
  for (int i = 0; i < 4; ++i) {
    const int64_t k = k0 + tk + i;
    if (k >= K) continue;
    const acc_t ft = scale / max(sqrt(t_sq[tk + i]), eps);
    for (int j = 0; j < 4; ++j) {
      const int64_t p = p0 + tp + j;
      if (p >= P) continue;
      out[b * s_ob + k * s_ok + p * s_op] = static_cast<scalar_t>(acc[i][j] * ft / max(sqrt(v_sq[tp + j]), eps));
    }
  }
}

}  // namespace portable
}  // namespace denseclip_fast
