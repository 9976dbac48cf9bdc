// Backward of pixel_text_score in ATen calls (batched GEMMs on cuBLAS, and elementwise work on the small and the
// pixel-sized results): the fallback of the CUDA registration (csrc/cuda/score.cu) where its kernels do not apply.
// The CPU registration is the tiled one-pass backward in csrc/cpu/score_backward.cpp, of the same formulas.
//
// With v^ = v / max(|v|, eps), t^ = t / max(|t|, eps) and s = scale <t^, v^>:
//   g^_v = scale * T^^T G                      (one batched GEMM, (C x K)(K x P) per image)
//   dv   = (g^_v - v^ <v^, g^_v>) / |v|         if |v| >= eps, g^_v / eps otherwise (F.normalize's clamp: its
//                                               gradient passes at equality)
//   g^_t = scale * sum_p (G / max(|v_p|, eps)) v_p^T   (one batched GEMM on the raw map, summed over the batch
//                                               when the text is shared), then the same Jacobian for the rows of t.
// |v| comes from the forward (norm) when autograd passes it, else from a pass over the map.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace denseclip_fast {

std::tuple<at::Tensor, at::Tensor> score_backward_aten(const at::Tensor& grad, const at::Tensor& visual,
                                                       const at::Tensor& text, double scale,
                                                       const std::optional<at::Tensor>& score_map,
                                                       const std::optional<at::Tensor>& norm) {
  const BelowAutograd below_autograd;
  const ScoreShape s = check_score_backward_inputs(grad, visual, text, score_map, norm);
  if (visual.numel() == 0) return zero_score_gradients(visual, text);
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor v = visual.to(ct).contiguous().view({s.B, s.C, s.P()});
  const at::Tensor g = grad.to(ct).contiguous().view({s.B, s.K, s.P()});
  const at::Tensor t = text.to(ct);
  const Normalized t_n = normalize_along(t, -1);
  const at::Tensor t_b = s.text_batched ? t_n.hat : t_n.hat.unsqueeze(0).expand({s.B, s.K, s.C});
  const Normalized v_n =  // norms (B, 1, P)
      normalize_along(v, 1, norm ? std::optional<at::Tensor>(norm->reshape({s.B, 1, s.P()})) : std::nullopt);
  const at::Tensor gv_hat = at::bmm(t_b.transpose(1, 2), g).mul_(scale);          // (B, C, P)
  const at::Tensor grad_visual = normalize_backward(gv_hat, v_n, 1);
  at::Tensor gt_hat = at::bmm(g / v_n.clamped, v.transpose(1, 2)).mul_(scale);  // (B, K, C)
  if (!s.text_batched) gt_hat = gt_hat.sum(0);
  const at::Tensor grad_text = normalize_backward(gt_hat, t_n, -1);
  return {grad_visual.view({s.B, s.C, s.H, s.W}).to(visual.scalar_type()).contiguous(score_memory_format(visual)),
          grad_text.to(text.scalar_type())};
}

// A test hook, not part of the API: the ATen backward registered for every device under a namespace of its own, so
// that CI, which has no GPU, checks the CUDA registration's fallback (float32, more than tc::kMaxBwdK classes, GPUs
// without its tensor-core kernels) against the reference on CPU tensors (tests/test_ops.py).
TORCH_LIBRARY(denseclip_fast_testing, m) {
  m.def("score_backward_aten(Tensor grad, Tensor visual, Tensor text, float scale, Tensor? score_map=None, "
        "Tensor? norm=None) -> (Tensor, Tensor)",
        &score_backward_aten);
}

}  // namespace denseclip_fast
