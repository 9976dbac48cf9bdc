// CUDA kernels of context_attention and its backward (no mask, scale 1/sqrt(D), head dim up to 128).
//
// float16 (sm_70+; sm_75+ with CUDA 13) and bfloat16 (sm_80+): the tensor-core kernels of attention_tc.cuh (WMMA,
// float accumulation): flash attention forward (64 queries per block, 32-key tiles, online softmax) and the
// FlashAttention-2 backward (a dQ kernel, a dK/dV kernel).
//
// float32, float64, and 16-bit types on older GPUs, on the FMA units (attention_kernels.cuh). Forward, flash-style:
// a block of 8 warps serves 8 query rows of one (batch, head); keys and values stream through shared memory in
// tiles of 32 rows (16 for float64), and each warp keeps its query row, running max, running sum and output
// accumulator in registers (D / 32 values per lane), updating them key by key (online softmax): no Lq x Lk matrix
// exists. Backward, recomputing the probabilities from the saved log-sum-exp: one kernel with a warp per query
// row accumulates dQ over the keys, and one with a warp per key row accumulates dK and dV over the queries.
//
// Every forward writes O and the row log-sum-exp (float32, float64 for float64 inputs); every backward takes
// delta_i = <dO_i, O_i> from ATen. ops.backends prefers the Triton kernels (denseclip_fast/ops/triton/attention.py)
// on sm_80+ when Triton is installed.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../common.h"
#include "attention_kernels.cuh"
#include "attention_tc.cuh"
#include "tensor_cores.h"

namespace denseclip_fast {
namespace {

using attn::kMaxD;
using attn::kWarps;

void check_head_dim(const AttentionShape& s, const char* op) {
  TORCH_CHECK(s.D <= kMaxD, op, ": the CUDA kernel supports head dims up to ", kMaxD, ", got D=", s.D);
  TORCH_CHECK(s.B * s.heads <= std::numeric_limits<int32_t>::max(), op,
              ": batch x heads must fit one launch (< 2^31), got ", s.B, " x ", s.heads);
  TORCH_CHECK((s.Lq + kWarps - 1) / kWarps <= 65535 && (s.Lk + kWarps - 1) / kWarps <= 65535, op,
              ": sequences longer than ", 65535 * kWarps, " tokens need several launches, got Lq=", s.Lq,
              ", Lk=", s.Lk);
}

// The tensor-core kernels' 1 / sqrt(D), in float.
float tc_scale(const AttentionShape& s) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.D))); }

std::tuple<at::Tensor, at::Tensor> context_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v) {
  const AttentionShape s = check_attention_inputs(q, k, v, "context_attention");
  check_head_dim(s, "context_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({s.B, s.heads, s.Lq}, q.options().dtype(lse_type(q)));
  if (out.numel() == 0) return {out, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (tensor_cores_for(qc) != nullptr) {
    namespace ta = tc::attention;
    const dim3 grid(s.B * s.heads, (s.Lq + ta::kBlockM - 1) / ta::kBlockM);
    const bool vec = ta::use_vec(s.D, {qc.data_ptr(), kc.data_ptr(), vc.data_ptr()});
    with_cuda_type(q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      ta::dispatch<T>(s.D, [&](auto kernels) {
        decltype(kernels)::forward<<<grid, ta::kThreads, 0, stream>>>(
            data_as<T>(qc), data_as<T>(kc), data_as<T>(vc), data_as<T>(out), lse.data_ptr<float>(), s.Lq, s.Lk,
            static_cast<int>(s.D), tc_scale(s), vec);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
  }
  const dim3 grid(s.B * s.heads, (s.Lq + kWarps - 1) / kWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    attn::attention_forward_kernel<scalar_t, acc_t><<<grid, kWarps * 32, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>(), s.Lq, s.Lk, static_cast<int>(s.D), acc_t(1) / std::sqrt(acc_t(s.D)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  const BelowAutograd below_autograd;
  const AttentionShape s = check_attention_backward_inputs(grad_out, q, k, v, out, lse);
  check_head_dim(s, "context_attention_backward");
  if (q.numel() == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), g = grad_out.contiguous();
  const at::Tensor lc = lse.contiguous();
  const at::Tensor delta = (g.to(lse_type(q)) * out.to(lse_type(q))).sum(-1).contiguous();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (tensor_cores_for(qc) != nullptr) {
    namespace ta = tc::attention;
    const dim3 grid_q(s.B * s.heads, (s.Lq + ta::kBlockM - 1) / ta::kBlockM);
    const dim3 grid_k(s.B * s.heads, (s.Lk + ta::kKvWarps * ta::kWarpRows - 1) / (ta::kKvWarps * ta::kWarpRows));
    const bool vec = ta::use_vec(s.D, {qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), g.data_ptr()});
    with_cuda_type(q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const float* lp = lc.data_ptr<float>();
      const float* dp = delta.data_ptr<float>();
      const int D = static_cast<int>(s.D);
      ta::dispatch<T>(s.D, [&](auto kernels) {
        using K = decltype(kernels);
        K::dq<<<grid_q, ta::kThreads, 0, stream>>>(data_as<T>(qc), data_as<T>(kc), data_as<T>(vc), data_as<T>(g), lp,
                                                    dp, data_as<T>(dq), s.Lq, s.Lk, D, tc_scale(s), vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        K::dkdv<<<grid_k, ta::kKvThreads, 0, stream>>>(data_as<T>(qc), data_as<T>(kc), data_as<T>(vc), data_as<T>(g),
                                                        lp, dp, data_as<T>(dk), data_as<T>(dv), s.Lq, s.Lk, D,
                                                        tc_scale(s), vec);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t scale = acc_t(1) / std::sqrt(acc_t(s.D));
    const dim3 grid_q(s.B * s.heads, (s.Lq + kWarps - 1) / kWarps), grid_k(s.B * s.heads, (s.Lk + kWarps - 1) / kWarps);
    attn::attention_dq_kernel<scalar_t, acc_t><<<grid_q, kWarps * 32, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        lc.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(), s.Lq, s.Lk, static_cast<int>(s.D),
        scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attn::attention_dkdv_kernel<scalar_t, acc_t><<<grid_k, kWarps * 32, 0, stream>>>(
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
