// CPU implementation of pixel_text_score and score_concat (the backward, ATen on any device, is in
// csrc/score_backward.cpp).
//
// s[b,k,p] = scale * <t_k, v_p> / (max(|t_k|, eps) * max(|v_p|, eps)) equals F.normalize on both sides followed by
// the dot product, so the visual map is never normalised in memory: the pixel norms come from one pass over it
// (and are returned, for the backward), the product of the normalised text (K x C, small) with the raw visual map
// is one batched GEMM (BLAS, in the layout the map already has: (K x C)(C x P) for NCHW, (P x C)(C x K) for NHWC,
// whose result is the NHWC output), and the norms and scale are applied to the small K x P result while it is
// written into the output (or into the score channels of score_concat's buffer). Computation in float32 (float64
// for float64 inputs); ATen vectorises and threads every step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common.h"

namespace denseclip_fast {
namespace {

void score_forward_into(at::Tensor out, at::Tensor norm, const at::Tensor& visual, const at::Tensor& text,
                        const ScoreShape& s, double scale) {
  if (out.numel() == 0) return;  // B or H * W is 0 (K >= 1), and so is norm
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor t_hat = normalize_along(text.to(ct), -1).first;                      // (K, C) or (B, K, C)
  const at::Tensor t_b = s.text_batched ? t_hat : t_hat.unsqueeze(0).expand({s.B, s.K, s.C});
  at::Tensor pixel_norm = norm.view({s.B, s.P()});
  if (s.channels_last) {
    const at::Tensor v = visual.contiguous(at::MemoryFormat::ChannelsLast).to(ct).permute({0, 2, 3, 1})
                             .reshape({s.B, s.P(), s.C});                          // (B, P, C), no copy for float
    at::linalg_vector_norm_out(pixel_norm, v, 2, {2});
    const at::Tensor inv = pixel_norm.clamp_min(kNormEps).reciprocal_().unsqueeze(2);
    const at::Tensor score = at::bmm(v, t_b.transpose(1, 2)).mul_(inv).mul_(scale);  // (B, P, K)
    out.copy_(score.view({s.B, s.H, s.W, s.K}).permute({0, 3, 1, 2}));
  } else {
    const at::Tensor v = visual.contiguous().to(ct).view({s.B, s.C, s.P()});      // (B, C, P)
    at::linalg_vector_norm_out(pixel_norm, v, 2, {1});
    const at::Tensor inv = pixel_norm.clamp_min(kNormEps).reciprocal_().unsqueeze(1);
    const at::Tensor score = at::bmm(t_b, v).mul_(inv).mul_(scale);               // (B, K, P)
    out.copy_(score.view({s.B, s.K, s.H, s.W}));
  }
}

std::tuple<at::Tensor, at::Tensor> pixel_text_score_cpu(const at::Tensor& visual, const at::Tensor& text,
                                                        double scale) {
  return score_with(visual, text, scale, score_forward_into);
}

std::tuple<at::Tensor, at::Tensor> score_concat_cpu(const at::Tensor& feature, const at::Tensor& visual,
                                                    const at::Tensor& text, double scale) {
  return score_concat_with(feature, visual, text, scale, score_forward_into);
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) {
  m.impl("pixel_text_score", &pixel_text_score_cpu);
  m.impl("score_concat", &score_concat_cpu);
}

}  // namespace denseclip_fast
