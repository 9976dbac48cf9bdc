// CPU implementation of context_attention and its backward: softmax(q k^T / sqrt(D)) v, flash-style.
//
// Forward. All (batch, head) pairs and all queries advance together through the keys in blocks of 512 (a single
// block, Lk <= 512, is a plain softmax of its scores): the block's
// scores are one batched GEMM (BLAS), the running row maximum m and sum l are updated once per block and the
// accumulator rescaled by exp(m_old - m_new) before the block's probabilities times its values (a second GEMM) are
// added. Memory holds at most Lq x 512 scores per head, never Lq x Lk. Outputs O = acc / l and the row
// log-sum-exp L = m + log l.
//
// Backward, block by block over the keys, recomputing P = exp(S - L) from the saved L:
//   delta = rowsum(dO * O);  dV_j = P^T dO;  dS = P * (dO V_j^T - delta);  dQ += scale dS K_j;  dK_j = scale dS^T Q.
// Computation in float32 (float64 for float64 inputs); ATen vectorises and threads every step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common.h"

namespace denseclip_fast {
namespace {

constexpr int64_t kKeyBlock = 512;

std::tuple<at::Tensor, at::Tensor> context_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const AttentionShape s = check_attention_inputs(q, k, v, "context_attention");
  const at::ScalarType ct = lse_type(q);
  const int64_t bh = s.B * s.heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  const at::Tensor qs = q.to(ct).reshape({bh, s.Lq, s.D}) * scale;
  const at::Tensor kc = k.to(ct).reshape({bh, s.Lk, s.D}), vc = v.to(ct).reshape({bh, s.Lk, s.D});
  if (s.Lk <= kKeyBlock) {  // one block: the online update degenerates to a plain softmax
    const at::Tensor scores = at::bmm(qs, kc.transpose(1, 2));
    const at::Tensor lse = scores.logsumexp(-1, /*keepdim=*/true);
    const at::Tensor out = at::bmm((scores - lse).exp_(), vc);
    return {out.view({s.B, s.heads, s.Lq, s.D}).to(q.scalar_type()), lse.view({s.B, s.heads, s.Lq})};
  }
  at::Tensor m = at::full({bh, s.Lq, 1}, -std::numeric_limits<double>::infinity(), qs.options());
  at::Tensor l = at::zeros({bh, s.Lq, 1}, qs.options());
  at::Tensor acc = at::zeros({bh, s.Lq, s.D}, qs.options());
  for (int64_t j0 = 0; j0 < s.Lk; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, s.Lk - j0);
    const at::Tensor scores = at::bmm(qs, kc.narrow(1, j0, n).transpose(1, 2));  // (BH, Lq, n)
    const at::Tensor m_new = at::maximum(m, std::get<0>(scores.max(-1, /*keepdim=*/true)));
    const at::Tensor p = (scores - m_new).exp_();
    const at::Tensor correction = (m - m_new).exp_();  // exp(-inf) = 0 on the first block
    l = l * correction + p.sum(-1, /*keepdim=*/true);
    acc = acc * correction + at::bmm(p, vc.narrow(1, j0, n));
    m = m_new;
  }
  at::Tensor out = (acc / l).view({s.B, s.heads, s.Lq, s.D}).to(q.scalar_type());
  at::Tensor lse = (m + l.log()).view({s.B, s.heads, s.Lq});
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  const AttentionShape s = check_attention_backward_inputs(grad_out, q, k, v, out, lse);
  const at::ScalarType ct = lse_type(q);
  const int64_t bh = s.B * s.heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  const at::Tensor qc = q.to(ct).reshape({bh, s.Lq, s.D}), kc = k.to(ct).reshape({bh, s.Lk, s.D});
  const at::Tensor vc = v.to(ct).reshape({bh, s.Lk, s.D}), g = grad_out.to(ct).reshape({bh, s.Lq, s.D});
  const at::Tensor l = lse.reshape({bh, s.Lq, 1});
  const at::Tensor delta = (g * out.to(ct).reshape({bh, s.Lq, s.D})).sum(-1, /*keepdim=*/true);
  at::Tensor dq = at::zeros({bh, s.Lq, s.D}, qc.options());
  at::Tensor dk = at::empty({bh, s.Lk, s.D}, qc.options()), dv = at::empty({bh, s.Lk, s.D}, qc.options());
  for (int64_t j0 = 0; j0 < s.Lk; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, s.Lk - j0);
    const at::Tensor kj = kc.narrow(1, j0, n), vj = vc.narrow(1, j0, n);
    const at::Tensor p = (at::bmm(qc, kj.transpose(1, 2)).mul_(scale) - l).exp_();  // (BH, Lq, n)
    dv.narrow(1, j0, n).copy_(at::bmm(p.transpose(1, 2), g));
    const at::Tensor ds = p.mul_(at::bmm(g, vj.transpose(1, 2)) - delta).mul_(scale);
    dq.add_(at::bmm(ds, kj));
    dk.narrow(1, j0, n).copy_(at::bmm(ds.transpose(1, 2), qc));
  }
  const auto shaped = [&](const at::Tensor& x, int64_t L) {
    return x.view({s.B, s.heads, L, s.D}).to(q.scalar_type());
  };
  return {shaped(dq, s.Lq), shaped(dk, s.Lk), shaped(dv, s.Lk)};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) {
  m.impl("context_attention", &context_attention_cpu);
  m.impl("context_attention_backward", &context_attention_backward_cpu);
}

}  // namespace denseclip_fast
