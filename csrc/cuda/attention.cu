// CUDA kernels of context_attention and its backward (no mask, scale 1/sqrt(D), head dim up to 128).
//
// Forward, flash-style: a block of 8 warps serves 8 query rows of one (batch, head); keys and values stream through
// shared memory in tiles of 32 rows (16 for float64), and each warp keeps its query row, running max, running sum and output
// accumulator in registers (D / 32 values per lane), updating them key by key (online softmax): no Lq x Lk matrix
// exists. Outputs O and the row log-sum-exp (float32, float64 for float64 inputs).
//
// Backward, recomputing the probabilities from the saved log-sum-exp: delta_i = <dO_i, O_i> (ATen), then one kernel
// with a warp per query row accumulates dQ over the keys, and one with a warp per key row accumulates dK and dV over
// the queries. Dot products are warp reductions on the FMA units; this is the portable backend, the tensor-core path
// being the Triton kernels (denseclip_fast/ops/triton/attention.py), which ops.backends prefers on CUDA.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace denseclip_fast {
namespace {

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

void check_head_dim(const AttentionShape& s, const char* op) {
  TORCH_CHECK(s.D <= kMaxD, op, ": the CUDA kernel supports head dims up to ", kMaxD, ", got D=", s.D);
  TORCH_CHECK((s.Lq + kWarps - 1) / kWarps <= 65535 && (s.Lk + kWarps - 1) / kWarps <= 65535, op,
              ": sequences longer than ", 65535 * kWarps, " tokens need several launches, got Lq=", s.Lq, ", Lk=", s.Lk);
}

std::tuple<at::Tensor, at::Tensor> context_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v) {
  const AttentionShape s = check_attention_inputs(q, k, v, "context_attention");
  check_head_dim(s, "context_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({s.B, s.heads, s.Lq}, q.options().dtype(lse_type(q)));
  if (out.numel() == 0) return {out, lse};
  const dim3 grid(s.B * s.heads, (s.Lq + kWarps - 1) / kWarps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    attention_forward_kernel<scalar_t, acc_t><<<grid, kWarps * 32, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>(), s.Lq, s.Lk, static_cast<int>(s.D), acc_t(1) / std::sqrt(acc_t(s.D)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  const AttentionShape s = check_attention_backward_inputs(grad_out, q, k, v, out, lse);
  check_head_dim(s, "context_attention_backward");
  if (q.numel() == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), g = grad_out.contiguous();
  const at::Tensor lc = lse.contiguous();
  const at::Tensor delta = (g.to(lse_type(q)) * out.to(lse_type(q))).sum(-1).contiguous();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t scale = acc_t(1) / std::sqrt(acc_t(s.D));
    const dim3 grid_q(s.B * s.heads, (s.Lq + kWarps - 1) / kWarps), grid_k(s.B * s.heads, (s.Lk + kWarps - 1) / kWarps);
    attention_dq_kernel<scalar_t, acc_t><<<grid_q, kWarps * 32, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        lc.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(), s.Lq, s.Lk, static_cast<int>(s.D),
        scale);
    attention_dkdv_kernel<scalar_t, acc_t><<<grid_k, kWarps * 32, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        lc.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), s.Lq, s.Lk,
        static_cast<int>(s.D), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CUDA, m) {
  m.impl("context_attention", &context_attention_cuda);
  m.impl("context_attention_backward", &context_attention_backward_cuda);
}

}  // namespace denseclip_fast
