// CPU implementation of pixel_text_score, its backward and score_concat.
//
// s[b,k,p] = scale * <t_k, v_p> / (max(|t_k|, eps) * max(|v_p|, eps)) equals F.normalize on both sides followed by
// the dot product, so the visual map is never normalised in memory: the pixel norms come from one pass over it,
// the product of the normalised text (K x C, small) with the raw visual map is one batched GEMM (BLAS, in the
// layout the map already has: (K x C)(C x P) for NCHW, (P x C)(C x K) for NHWC, whose result is the NHWC output),
// and the norms and scale are applied to the small K x P result while it is written into the output (or into the
// score channels of score_concat's buffer). Computation in float32 (float64 for float64 inputs); ATen vectorises and
// threads every step.
//
// Backward, with v^ = v / max(|v|, eps) and g^ = scale * T^^T G (one batched GEMM):
//   dv = (g^ - v^ <v^, g^>) / |v|  if |v| >= eps,  g^ / eps otherwise;
//   dt^ = scale * sum_p (G / max(|v|, eps)) v^T (one batched GEMM, summed over the batch for shared text), then the
//   same Jacobian for the text rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common.h"

namespace denseclip_fast {
namespace {

at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x / max(|x|, eps) along `dim`, and the clamped norms (keepdim).
std::pair<at::Tensor, at::Tensor> normalize(const at::Tensor& x, int64_t dim) {
  const at::Tensor norm = at::linalg_vector_norm(x, 2, {dim}, /*keepdim=*/true);
  const at::Tensor clamped = norm.clamp_min(kNormEps);
  return {x / clamped, clamped};
}

// Backward of x / max(|x|, eps) along `dim` for an upstream gradient g_hat of the normalised tensor.
at::Tensor normalize_backward(const at::Tensor& g_hat, const at::Tensor& x_hat, const at::Tensor& x_norm_clamped,
                              const at::Tensor& x_norm, int64_t dim) {
  const at::Tensor radial = (x_hat * g_hat).sum(dim, /*keepdim=*/true) * x_norm.ge(kNormEps);
  return (g_hat - x_hat * radial) / x_norm_clamped;
}

void score_forward_into(at::Tensor out, const at::Tensor& visual, const at::Tensor& text, const ScoreShape& s,
                        double scale) {
  if (out.numel() == 0) return;
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor t_hat = normalize(text.to(ct), -1).first;                      // (K, C) or (B, K, C)
  const at::Tensor t_b = s.text_batched ? t_hat : t_hat.unsqueeze(0).expand({s.B, s.K, s.C});
  if (s.channels_last) {
    const at::Tensor v = visual.contiguous(at::MemoryFormat::ChannelsLast).to(ct).permute({0, 2, 3, 1})
                             .reshape({s.B, s.P(), s.C});                          // (B, P, C), no copy for float
    const at::Tensor inv = at::linalg_vector_norm(v, 2, {2}, true).clamp_min(kNormEps).reciprocal_();
    const at::Tensor score = at::bmm(v, t_b.transpose(1, 2)).mul_(inv).mul_(scale);  // (B, P, K)
    out.copy_(score.view({s.B, s.H, s.W, s.K}).permute({0, 3, 1, 2}));
  } else {
    const at::Tensor v = visual.contiguous().to(ct).view({s.B, s.C, s.P()});      // (B, C, P)
    const at::Tensor inv = at::linalg_vector_norm(v, 2, {1}, true).clamp_min(kNormEps).reciprocal_();
    const at::Tensor score = at::bmm(t_b, v).mul_(inv).mul_(scale);               // (B, K, P)
    out.copy_(score.view({s.B, s.K, s.H, s.W}));
  }
}

at::Tensor pixel_text_score_cpu(const at::Tensor& visual, const at::Tensor& text, double scale) {
  return score_with(visual, text, scale, score_forward_into);
}

at::Tensor score_concat_cpu(const at::Tensor& feature, const at::Tensor& visual, const at::Tensor& text,
                            double scale) {
  return score_concat_with(feature, visual, text, scale, score_forward_into);
}

std::tuple<at::Tensor, at::Tensor> pixel_text_score_backward_cpu(const at::Tensor& grad, const at::Tensor& visual,
                                                                 const at::Tensor& text, double scale) {
  const ScoreShape s = check_score_inputs(visual, text, "pixel_text_score_backward");
  check_score_grad(grad, visual, s, "pixel_text_score_backward");
  if (visual.numel() == 0) return {at::zeros_like(visual), at::zeros_like(text)};
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor v = visual.to(ct).contiguous().view({s.B, s.C, s.P()});
  const at::Tensor g = grad.to(ct).contiguous().view({s.B, s.K, s.P()});
  const at::Tensor t = text.to(ct);
  const at::Tensor t_norm = at::linalg_vector_norm(t, 2, {-1}, true);
  const auto [t_hat, t_clamped] = normalize(t, -1);
  const at::Tensor t_b = s.text_batched ? t_hat : t_hat.unsqueeze(0).expand({s.B, s.K, s.C});
  const at::Tensor v_norm = at::linalg_vector_norm(v, 2, {1}, true);  // (B, 1, P)
  const at::Tensor v_clamped = v_norm.clamp_min(kNormEps);
  const at::Tensor v_hat = v / v_clamped;
  const at::Tensor gv_hat = at::bmm(t_b.transpose(1, 2), g).mul_(scale);                  // (B, C, P)
  const at::Tensor grad_visual = normalize_backward(gv_hat, v_hat, v_clamped, v_norm, 1);
  at::Tensor gt_hat = at::bmm(g / v_clamped, v.transpose(1, 2)).mul_(scale);            // (B, K, C)
  if (!s.text_batched) gt_hat = gt_hat.sum(0);
  const at::Tensor grad_text = normalize_backward(gt_hat, t_hat, t_clamped, t_norm, -1);
  return {grad_visual.view({s.B, s.C, s.H, s.W}).to(visual.scalar_type()).contiguous(score_memory_format(visual)),
          grad_text.to(text.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) {
  m.impl("pixel_text_score", &pixel_text_score_cpu);
  m.impl("pixel_text_score_backward", &pixel_text_score_backward_cpu);
  m.impl("score_concat", &score_concat_cpu);
}

}  // namespace denseclip_fast
