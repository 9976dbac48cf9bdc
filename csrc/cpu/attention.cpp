// CPU kernels of context_attention and its backward: softmax(q k^T / sqrt(D)) v, flash-style.
//
// Forward. Each query row streams over the keys in blocks of 64: scores of the block, the running maximum m and
// sum l updated once per block (the accumulator rescaled by exp(m_old - m_new)), so no Lq x Lk matrix is ever
// stored. Rows are independent and spread over threads. Outputs O and the row log-sum-exp L = m + log(l), which
// the backward needs to recompute the probabilities.
//
// Backward (per batch and head, one thread): delta_i = <dO_i, O_i>; for every pair P_ij = exp(s_ij - L_i),
//   dV_j += P_ij dO_i;  dS_ij = P_ij (<dO_i, V_j> - delta_i);  dQ_i += scale dS_ij K_j;  dK_j += scale dS_ij Q_i.
// Accumulation in float (double for float64 inputs); any head dim.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"

namespace denseclip_fast {
namespace {

constexpr int64_t kKeyBlock = 64;

template <typename scalar_t, typename acc_t>
void attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                              at::Tensor& lse, const AttentionShape& s) {
  const int64_t Lq = s.Lq, Lk = s.Lk, D = s.D;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  at::parallel_for(0, s.B * s.heads * Lq, 4, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> qrow(D), acc(D);
    acc_t scores[kKeyBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / Lq;
      const scalar_t* kb = kp + bh * Lk * D;
      const scalar_t* vb = vp + bh * Lk * D;
      for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<acc_t>(qp[r * D + d]) * scale;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t m = -std::numeric_limits<acc_t>::infinity(), l = 0;
      for (int64_t j0 = 0; j0 < Lk; j0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, Lk - j0);
        acc_t block_max = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* kr = kb + (j0 + j) * D;
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qrow[d] * static_cast<acc_t>(kr[d]);
          scores[j] = dot;
          block_max = std::max(block_max, dot);
        }
        const acc_t m_new = std::max(m, block_max);
        const acc_t correction = std::exp(m - m_new);  // exp(-inf) = 0 on the first block
        l *= correction;
        for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t p = std::exp(scores[j] - m_new);
          l += p;
          const scalar_t* vr = vb + (j0 + j) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<acc_t>(vr[d]);
        }
        m = m_new;
      }
      for (int64_t d = 0; d < D; ++d) op[r * D + d] = static_cast<scalar_t>(acc[d] / l);
      lp[r] = m + std::log(l);
    }
  });
}

at::ScalarType lse_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> context_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const AttentionShape s = check_attention_inputs(q, k, v, "context_attention");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({s.B, s.heads, s.Lq}, q.options().dtype(lse_type(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    attention_forward_kernel<scalar_t, acc_t>(qc, kc, vc, out, lse, s);
  });
  return {out, lse};
}

template <typename scalar_t, typename acc_t>
void attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                               at::Tensor& dk, at::Tensor& dv, const AttentionShape& s) {
  const int64_t Lq = s.Lq, Lk = s.Lk, D = s.D;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t* lp = lse.data_ptr<acc_t>();
  at::parallel_for(0, s.B * s.heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<acc_t> qa(Lq * D), ga(Lq * D), ka(Lk * D), va(Lk * D), dqa(Lq * D), dka(Lk * D), dva(Lk * D);
    std::vector<acc_t> delta(Lq);
    for (int64_t bh = h0; bh < h1; ++bh) {
      for (int64_t i = 0; i < Lq * D; ++i) {
        qa[i] = static_cast<acc_t>(qp[bh * Lq * D + i]);
        ga[i] = static_cast<acc_t>(gp[bh * Lq * D + i]);
      }
      for (int64_t i = 0; i < Lk * D; ++i) {
        ka[i] = static_cast<acc_t>(kp[bh * Lk * D + i]);
        va[i] = static_cast<acc_t>(vp[bh * Lk * D + i]);
      }
      for (int64_t i = 0; i < Lq; ++i) {
        acc_t dlt = 0;
        for (int64_t d = 0; d < D; ++d) dlt += ga[i * D + d] * static_cast<acc_t>(op[(bh * Lq + i) * D + d]);
        delta[i] = dlt;
      }
      std::fill(dqa.begin(), dqa.end(), acc_t(0));
      std::fill(dka.begin(), dka.end(), acc_t(0));
      std::fill(dva.begin(), dva.end(), acc_t(0));
      for (int64_t i = 0; i < Lq; ++i) {
        const acc_t* qi = qa.data() + i * D;
        const acc_t* gi = ga.data() + i * D;
        const acc_t li = lp[bh * Lq + i];
        acc_t* dqi = dqa.data() + i * D;
        for (int64_t j = 0; j < Lk; ++j) {
          const acc_t* kj = ka.data() + j * D;
          const acc_t* vj = va.data() + j * D;
          acc_t sdot = 0, gdot = 0;
          for (int64_t d = 0; d < D; ++d) {
            sdot += qi[d] * kj[d];
            gdot += gi[d] * vj[d];
          }
          const acc_t p = std::exp(sdot * scale - li);
          const acc_t ds = p * (gdot - delta[i]) * scale;
          acc_t* dkj = dka.data() + j * D;
          acc_t* dvj = dva.data() + j * D;
          for (int64_t d = 0; d < D; ++d) {
            dvj[d] += p * gi[d];
            dqi[d] += ds * kj[d];
            dkj[d] += ds * qi[d];
          }
        }
      }
      for (int64_t i = 0; i < Lq * D; ++i) dq.data_ptr<scalar_t>()[bh * Lq * D + i] = static_cast<scalar_t>(dqa[i]);
      for (int64_t i = 0; i < Lk * D; ++i) {
        dk.data_ptr<scalar_t>()[bh * Lk * D + i] = static_cast<scalar_t>(dka[i]);
        dv.data_ptr<scalar_t>()[bh * Lk * D + i] = static_cast<scalar_t>(dva[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  const AttentionShape s = check_attention_inputs(q, k, v, "context_attention_backward");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "context_attention_backward: grad_out and out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "context_attention_backward: grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.heads && lse.size(2) == s.Lq &&
                  lse.scalar_type() == lse_type(q),
              "context_attention_backward: lse must be (B, heads, Lq) ", lse_type(q), ", got ", lse.sizes(), " ",
              lse.scalar_type());
  const at::Tensor g = grad_out.contiguous(), qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "context_attention_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    attention_backward_kernel<scalar_t, acc_t>(g, qc, kc, vc, oc, lc, dq, dk, dv, s);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) {
  m.impl("context_attention", &context_attention_cpu);
  m.impl("context_attention_backward", &context_attention_backward_cpu);
}

}  // namespace denseclip_fast
