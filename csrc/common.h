// Shared by every backend of the denseclip_fast operators: input checks with messages that name the argument,
// and the output layout rules. Implemented in registration.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

namespace denseclip_fast {

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's eps

// Held by the backward kernels, whose operators have no autograd formula: the ATen calls inside them (normalising
// the text, matrix products into preallocated outputs) run below autograd, also on at::parallel_for's threads. Under
// autograd (torch.autograd.grad(..., create_graph=True) with a text that requires grad) they recorded a graph, and
// the out= products failed ("functions with out=... arguments don't support automatic differentiation").
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// The shapes of a pixel_text_score call. visual (B, C, H, W); text (K, C) shared or (B, K, C) per batch.
struct ScoreShape {
  int64_t B, C, H, W, K;
  bool text_batched;
  bool channels_last;  // visual (and every (B, *, H, W) tensor of the call) is NHWC in memory
  int64_t P() const { return H * W; }
};

// Throws c10::Error (RuntimeError in Python) naming `op` and the offending argument.
ScoreShape check_score_inputs(const at::Tensor& visual, const at::Tensor& text, const char* op);

// Element strides of a visual tensor made contiguous in the layout of s (NCHW or NHWC), as (batch, channel, pixel)
// with pixel p = h * W + w. Computed from the shape: a contiguous tensor may carry arbitrary strides on its
// size-1 dimensions, so its own stride(3) is not the pixel stride when W == 1.
struct VisualStrides {
  int64_t b, c, p;
};
inline VisualStrides dense_visual_strides(const ScoreShape& s) {
  return s.channels_last ? VisualStrides{s.P() * s.C, 1, s.C} : VisualStrides{s.C * s.P(), s.P(), 1};
}

// NHWC when each image of visual has channels_last strides and not also NCHW ones, else NCHW. The batch stride is
// not looked at, so that the answer does not change when the batch size becomes 1 (a graph compiled by
// torch.export/AOTInductor at batch B relies on the layout it saw when it runs at batch 1).
at::MemoryFormat score_memory_format(const at::Tensor& visual);

// Checks feature (B, C_feat, H, W) against visual and returns the empty (B, C_feat + K, H, W) output of score_concat
// in visual's memory format.
at::Tensor empty_concat_output(const at::Tensor& feature, const at::Tensor& visual, const ScoreShape& s);

// float32 for float16/bfloat16/float32 tensors, float64 for float64: the type the ATen-based parts compute in, and
// the dtype of the pixel norms the score operators return.
inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The second output of pixel_text_score and score_concat: the pixel norms |v| (unclamped), (B, H, W) contiguous in
// compute_type(visual), for the backward (which then needs no pass over visual of its own to find them).
inline at::Tensor empty_norm(const at::Tensor& visual, const ScoreShape& s) {
  return at::empty({s.B, s.H, s.W}, visual.options().dtype(compute_type(visual)));
}

// pixel_text_score_backward's arguments, checked as every backend checks them: visual and text as the forward's;
// grad and score_map (the forward's output) (B, K, H, W) with visual's dtype and device; norm what the forward
// returned, (B, H, W) in compute_type(visual) on visual's device.
ScoreShape check_score_backward_inputs(const at::Tensor& grad, const at::Tensor& visual, const at::Tensor& text,
                                       const std::optional<at::Tensor>& score_map,
                                       const std::optional<at::Tensor>& norm);

// The backward's results for an empty visual: zeros, in the layouts of the fake kernel (library.py) and of the
// non-empty results (grad_visual in visual's memory format, grad_text contiguous).
inline std::tuple<at::Tensor, at::Tensor> zero_score_gradients(const at::Tensor& visual, const at::Tensor& text) {
  return {at::zeros_like(visual, score_memory_format(visual)), at::zeros_like(text, at::MemoryFormat::Contiguous)};
}

// pixel_text_score and score_concat for a backend whose `into(out, norm, visual, text, shape, scale)` writes the
// scores into a (B, K, H, W) tensor or view (out.stride(2) == W * out.stride(3)) and the pixel norms into norm:
// the allocation and the feature copy are the same for every backend.
template <typename Into>
std::tuple<at::Tensor, at::Tensor> score_with(const at::Tensor& visual, const at::Tensor& text, double scale,
                                              Into into) {
  const ScoreShape s = check_score_inputs(visual, text, "pixel_text_score");
  at::Tensor out = at::empty({s.B, s.K, s.H, s.W}, visual.options().memory_format(score_memory_format(visual)));
  at::Tensor norm = empty_norm(visual, s);
  into(out, norm, visual, text, s, scale);
  return {out, norm};
}

template <typename Into>
std::tuple<at::Tensor, at::Tensor> score_concat_with(const at::Tensor& feature, const at::Tensor& visual,
                                                     const at::Tensor& text, double scale, Into into) {
  const ScoreShape s = check_score_inputs(visual, text, "score_concat");
  at::Tensor out = empty_concat_output(feature, visual, s);
  at::Tensor norm = empty_norm(visual, s);
  out.narrow(1, 0, feature.size(1)).copy_(feature);
  into(out.narrow(1, feature.size(1), s.K), norm, visual, text, s, scale);
  return {out, norm};
}

// x / max(|x|, eps) along `dim` (F.normalize), with the plain and the clamped norms (keepdim) its backward needs.
struct Normalized {
  at::Tensor hat, norm, clamped;
};

// `norm`, when given, is |x| along `dim` (keepdim, or a view of the same numbers); else it is computed.
inline Normalized normalize_along(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& norm = {}) {
  const at::Tensor n = norm ? *norm : at::linalg_vector_norm(x, 2, {dim}, /*keepdim=*/true);
  const at::Tensor clamped = n.clamp_min(kNormEps);
  return {x / clamped, n, clamped};
}

// Backward of x / max(|x|, eps) along `dim`, for the gradient g_hat of the normalised tensor x.hat. The gradient
// passes the clamp at equality, as F.normalize's did up to torch 2.13 and in the official code's torch (from 2.14
// torch's clamp_min passes none at its bound): ops/reference.py's normalize, whatever the torch.
inline at::Tensor normalize_backward(const at::Tensor& g_hat, const Normalized& x, int64_t dim) {
  const at::Tensor radial = (x.hat * g_hat).sum(dim, /*keepdim=*/true) * x.norm.ge(kNormEps);
  return (g_hat - x.hat * radial) / x.clamped;
}

// pixel_text_score's backward in ATen calls, for tensors of any device and dtype (csrc/score_backward.cpp): the CUDA
// registration (csrc/cuda/score.cu) takes tensor-core kernels where it can and this otherwise (the CPU one is
// csrc/cpu/score_backward.cpp).
// score_map (the forward's output) is checked and otherwise not used: this backward computes <v^, g^> itself;
// norm (the forward's pixel norms), when given, spares it the pass over visual that finds them.
std::tuple<at::Tensor, at::Tensor> score_backward_aten(const at::Tensor& grad, const at::Tensor& visual,
                                                       const at::Tensor& text, double scale,
                                                       const std::optional<at::Tensor>& score_map = std::nullopt,
                                                       const std::optional<at::Tensor>& norm = std::nullopt);

// Shapes of a context_attention call: q (B, heads, Lq, D), k and v (B, heads, Lk, D).
struct AttentionShape {
  int64_t B, heads, Lq, Lk, D;
};
AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op);

// The float type of the row log-sum-exp: float64 for float64 inputs, else float32.
at::ScalarType lse_type(const at::Tensor& q);

// Checks the extra arguments of context_attention_backward (grad_out and out like q, lse (B, heads, Lq)).
AttentionShape check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

}  // namespace denseclip_fast
