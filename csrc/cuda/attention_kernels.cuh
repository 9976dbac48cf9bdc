// The CUDA kernels of context_attention and its backward (launched by attention.cu); plain CUDA, no ATen, so that
// the CPU emulation test (tests/cuda_emulation) runs them too. See attention.cu for the algorithms.
#pragma once

#include <cmath>
#include <cstdint>

namespace denseclip_fast {
namespace attn {

constexpr int kWarps = 8, kMaxD = 128, kPerLane = kMaxD / 32;

// Rows per shared-memory tile: two (tile x 128) tiles must fit the 48 KB of static shared memory.
template <typename acc_t>
constexpr int tile_rows() {
  return sizeof(acc_t) == 8 ? 16 : 32;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Loads rows [r0, r0 + tile_rows) of a (L, D) matrix into shared memory (zeros past L).
template <typename scalar_t, typename acc_t>
__device__ void load_tile(acc_t (*dst)[kMaxD], const scalar_t* src, int64_t r0, int64_t L, int D) {
  constexpr int kTile = tile_rows<acc_t>();
  for (int i = threadIdx.x; i < kTile * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    dst[r][d] = r0 + r < L ? static_cast<acc_t>(src[(r0 + r) * D + d]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                         const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                         acc_t* __restrict__ lse, int64_t Lq, int64_t Lk, int D, acc_t scale) {
  constexpr int kTile = tile_rows<acc_t>();
  __shared__ acc_t ks[kTile][kMaxD], vs[kTile][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, row = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  const bool active = row < Lq;
  const scalar_t* kb = k + bh * Lk * D;
  const scalar_t* vb = v + bh * Lk * D;
  acc_t qr[kPerLane], acc[kPerLane];
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    qr[e] = active && d < D ? static_cast<acc_t>(q[(bh * Lq + row) * D + d]) * scale : acc_t(0);
    acc[e] = 0;
  }
  acc_t m = -INFINITY, l = 0;
  for (int64_t j0 = 0; j0 < Lk; j0 += kTile) {
    load_tile<scalar_t, acc_t>(ks, kb, j0, Lk, D);
    load_tile<scalar_t, acc_t>(vs, vb, j0, Lk, D);
    __syncthreads();
    const int n = static_cast<int>(Lk - j0 < kTile ? Lk - j0 : kTile);
    for (int j = 0; j < n; ++j) {
      acc_t part = 0;
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) part += qr[e] * ks[j][d];
      }
      const acc_t s = warp_sum(part);
      const acc_t m_new = max(m, s);
      const acc_t correction = exp(m - m_new), p = exp(s - m_new);
      l = l * correction + p;
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + 32 * e;
        acc[e] = acc[e] * correction + (d < D ? p * vs[j][d] : acc_t(0));
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (!active) return;
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < D) out[(bh * Lq + row) * D + d] = static_cast<scalar_t>(acc[e] / l);
  }
  if (lane == 0) lse[bh * Lq + row] = m + log(l);
}

// dQ_i = scale * sum_j P_ij (<dO_i, V_j> - delta_i) K_j, a warp per query row.
template <typename scalar_t, typename acc_t>
__global__ void attention_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                    const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                                    const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                                    scalar_t* __restrict__ dq, int64_t Lq, int64_t Lk, int D, acc_t scale) {
  constexpr int kTile = tile_rows<acc_t>();
  __shared__ acc_t ks[kTile][kMaxD], vs[kTile][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, row = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  const bool active = row < Lq;
  acc_t qr[kPerLane], gr[kPerLane], acc[kPerLane];
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    const bool ok = active && d < D;
    qr[e] = ok ? static_cast<acc_t>(q[(bh * Lq + row) * D + d]) : acc_t(0);
    gr[e] = ok ? static_cast<acc_t>(dout[(bh * Lq + row) * D + d]) : acc_t(0);
    acc[e] = 0;
  }
  const acc_t li = active ? lse[bh * Lq + row] : acc_t(0), di = active ? delta[bh * Lq + row] : acc_t(0);
  for (int64_t j0 = 0; j0 < Lk; j0 += kTile) {
    load_tile<scalar_t, acc_t>(ks, k + bh * Lk * D, j0, Lk, D);
    load_tile<scalar_t, acc_t>(vs, v + bh * Lk * D, j0, Lk, D);
    __syncthreads();
    const int n = static_cast<int>(Lk - j0 < kTile ? Lk - j0 : kTile);
    for (int j = 0; j < n; ++j) {
      acc_t s_part = 0, g_part = 0;
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) {
          s_part += qr[e] * ks[j][d];
          g_part += gr[e] * vs[j][d];
        }
      }
      const acc_t s = warp_sum(s_part) * scale, dp = warp_sum(g_part);
      const acc_t ds = exp(s - li) * (dp - di) * scale;
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) acc[e] += ds * ks[j][d];
      }
    }
    __syncthreads();
  }
  if (!active) return;
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < D) dq[(bh * Lq + row) * D + d] = static_cast<scalar_t>(acc[e]);
  }
}

// dK_j = scale * sum_i dS_ij Q_i and dV_j = sum_i P_ij dO_i, a warp per key row.
template <typename scalar_t, typename acc_t>
__global__ void attention_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                      const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                                      const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                                      scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int64_t Lq, int64_t Lk,
                                      int D, acc_t scale) {
  constexpr int kTile = tile_rows<acc_t>();
  __shared__ acc_t qs[kTile][kMaxD], gs[kTile][kMaxD];
  __shared__ acc_t ls[kTile], ds_[kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, row = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  const bool active = row < Lk;
  acc_t kr[kPerLane], vr[kPerLane], dka[kPerLane], dva[kPerLane];
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    const bool ok = active && d < D;
    kr[e] = ok ? static_cast<acc_t>(k[(bh * Lk + row) * D + d]) : acc_t(0);
    vr[e] = ok ? static_cast<acc_t>(v[(bh * Lk + row) * D + d]) : acc_t(0);
    dka[e] = dva[e] = 0;
  }
  for (int64_t i0 = 0; i0 < Lq; i0 += kTile) {
    load_tile<scalar_t, acc_t>(qs, q + bh * Lq * D, i0, Lq, D);
    load_tile<scalar_t, acc_t>(gs, dout + bh * Lq * D, i0, Lq, D);
    if (threadIdx.x < kTile) {
      const bool ok = i0 + threadIdx.x < Lq;
      ls[threadIdx.x] = ok ? lse[bh * Lq + i0 + threadIdx.x] : acc_t(0);
      ds_[threadIdx.x] = ok ? delta[bh * Lq + i0 + threadIdx.x] : acc_t(0);
    }
    __syncthreads();
    const int n = static_cast<int>(Lq - i0 < kTile ? Lq - i0 : kTile);
    for (int i = 0; i < n; ++i) {
      acc_t s_part = 0, g_part = 0;
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) {
          s_part += qs[i][d] * kr[e];
          g_part += gs[i][d] * vr[e];
        }
      }
      const acc_t s = warp_sum(s_part) * scale, dp = warp_sum(g_part);
      const acc_t p = exp(s - ls[i]), ds = p * (dp - ds_[i]) * scale;
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < D) {
          dka[e] += ds * qs[i][d];
          dva[e] += p * gs[i][d];
        }
      }
    }
    __syncthreads();
  }
  if (!active) return;
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < D) {
      dk[(bh * Lk + row) * D + d] = static_cast<scalar_t>(dka[e]);
      dv[(bh * Lk + row) * D + d] = static_cast<scalar_t>(dva[e]);
    }
  }
}

}  // namespace attn
}  // namespace denseclip_fast
