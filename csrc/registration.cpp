// Registers the denseclip_fast operator library with PyTorch's dispatcher: the schemas (one per operator), the
// shared input checks, and build_info. Backends add their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd formulas are registered from Python (denseclip_fast/ops/library.py).
//
// This file is shared by the Python extension (setup.py -> denseclip_fast._C) and the plain C++ library built by
// CMakeLists.txt, so it must not include Python headers.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "common.h"

#ifndef DENSECLIP_FAST_VERSION
#define DENSECLIP_FAST_VERSION "unknown"
#endif

namespace denseclip_fast {

#ifdef DENSECLIP_FAST_WITH_CUDA
std::string cuda_build_info();  // csrc/cuda/build_info.cu
#endif

// A JSON object describing how this library was built; the Python side parses it (denseclip_fast.ops.build_info).
std::string build_info() {
  std::string info = "{\"version\": \"" DENSECLIP_FAST_VERSION "\", ";
#ifdef _OPENMP
  info += "\"openmp\": true, ";
#else
  info += "\"openmp\": false, ";
#endif
#ifdef DENSECLIP_FAST_WITH_CUDA
  info += "\"cuda\": " + cuda_build_info();
#else
  info += "\"cuda\": null";
#endif
  return info + "}";
}

static void check_float(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

ScoreShape check_score_inputs(const at::Tensor& visual, const at::Tensor& text, const char* op) {
  TORCH_CHECK(visual.dim() == 4, op, ": visual must be (B, C, H, W), got shape ", visual.sizes());
  TORCH_CHECK(text.dim() == 2 || text.dim() == 3, op, ": text must be (K, C) or (B, K, C), got shape ",
              text.sizes());
  check_float(visual, op, "visual");
  check_float(text, op, "text");
  TORCH_CHECK(visual.scalar_type() == text.scalar_type(), op, ": visual and text must have the same dtype, got ",
              visual.scalar_type(), " and ", text.scalar_type());
  TORCH_CHECK(visual.device() == text.device(), op, ": visual and text must be on the same device, got ",
              visual.device(), " and ", text.device());
  ScoreShape s{visual.size(0), visual.size(1), visual.size(2), visual.size(3), text.size(-2), text.dim() == 3,
               score_memory_format(visual) == at::MemoryFormat::ChannelsLast};
  TORCH_CHECK(text.size(-1) == s.C, op, ": text has C=", text.size(-1), " channels but visual has C=", s.C);
  TORCH_CHECK(s.K >= 1, op, ": text must hold at least one class embedding, got K=0");
  TORCH_CHECK(!s.text_batched || text.size(0) == s.B, op, ": per-batch text has B=", text.size(0),
              " but visual has B=", s.B);
  return s;
}

namespace {
// Whether one image of visual (dims C, H, W; the batch stride is ignored) has the given dense strides, size-1
// dimensions excepted.
bool image_strides_are(const at::Tensor& visual, int64_t stride_c, int64_t stride_h, int64_t stride_w) {
  const int64_t expected[3] = {stride_c, stride_h, stride_w};
  for (int d = 1; d < 4; ++d) {
    if (visual.size(d) != 1 && visual.stride(d) != expected[d - 1]) return false;
  }
  return true;
}
}  // namespace

at::MemoryFormat score_memory_format(const at::Tensor& visual) {
  if (visual.dim() != 4) return at::MemoryFormat::Contiguous;
  const int64_t c = visual.size(1), h = visual.size(2), w = visual.size(3);
  if (image_strides_are(visual, 1, w * c, c) && !image_strides_are(visual, h * w, w, 1)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

namespace {
// grad of a score call (or, named so, the saved score map) must be (B, K, H, W) with visual's dtype and device.
void check_score_grad(const at::Tensor& grad, const at::Tensor& visual, const ScoreShape& s, const char* op,
                      const char* name) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == s.B && grad.size(1) == s.K && grad.size(2) == s.H &&
                  grad.size(3) == s.W,
              op, ": ", name, " must be (B, K, H, W) = (", s.B, ", ", s.K, ", ", s.H, ", ", s.W, "), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == visual.scalar_type() && grad.device() == visual.device(), op, ": ", name,
              " must match visual's dtype and device, got ", grad.scalar_type(), " on ", grad.device());
}

// norm, as the backward gets it, must be what the forward returned: (B, H, W) in compute_type(visual), visual's device.
void check_score_norm(const at::Tensor& norm, const at::Tensor& visual, const ScoreShape& s, const char* op) {
  TORCH_CHECK(norm.dim() == 3 && norm.size(0) == s.B && norm.size(1) == s.H && norm.size(2) == s.W &&
                  norm.scalar_type() == compute_type(visual) && norm.device() == visual.device(),
              op, ": norm must be (B, H, W) = (", s.B, ", ", s.H, ", ", s.W, ") ", compute_type(visual), " on ",
              visual.device(), " (the forward's pixel norms), got ", norm.sizes(), " ", norm.scalar_type(), " on ",
              norm.device());
}
}  // namespace

ScoreShape check_score_backward_inputs(const at::Tensor& grad, const at::Tensor& visual, const at::Tensor& text,
                                       const std::optional<at::Tensor>& score_map,
                                       const std::optional<at::Tensor>& norm) {
  const char* op = "pixel_text_score_backward";
  const ScoreShape s = check_score_inputs(visual, text, op);
  check_score_grad(grad, visual, s, op, "grad");
  if (score_map) check_score_grad(*score_map, visual, s, op, "score_map");
  if (norm) check_score_norm(*norm, visual, s, op);
  return s;
}

at::Tensor empty_concat_output(const at::Tensor& feature, const at::Tensor& visual, const ScoreShape& s) {
  TORCH_CHECK(feature.dim() == 4 && feature.size(0) == s.B && feature.size(2) == s.H && feature.size(3) == s.W,
              "score_concat: feature must be (B, C_feat, H, W) with visual's B, H, W = (", s.B, ", ", s.H, ", ", s.W,
              "), got ", feature.sizes());
  TORCH_CHECK(feature.scalar_type() == visual.scalar_type() && feature.device() == visual.device(),
              "score_concat: feature must match visual's dtype and device, got ", feature.scalar_type(), " on ",
              feature.device());
  return at::empty({s.B, feature.size(1) + s.K, s.H, s.W}, visual.options().memory_format(score_memory_format(visual)));
}

AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k and v must be (B, heads, L, D), got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_float(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on the same device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
              ": q ", q.sizes(), " and k ", k.sizes(), " must agree in B, heads and D");
  AttentionShape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(s.Lk >= 1, op, ": k and v must hold at least one token, got Lk=0");
  TORCH_CHECK(s.D >= 1, op, ": head dim must be >= 1, got D=0");
  return s;
}

at::ScalarType lse_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

AttentionShape check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "context_attention_backward";
  const AttentionShape s = check_attention_inputs(q, k, v, op);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(), op, ": ",
                name, " must match q (", q.sizes(), ", ", q.scalar_type(), ", ", q.device(), "), got ", t.sizes(),
                ", ", t.scalar_type(), ", ", t.device());
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.heads && lse.size(2) == s.Lq &&
                  lse.scalar_type() == lse_type(q) && lse.device() == q.device(),
              op, ": lse must be (B, heads, Lq) = (", s.B, ", ", s.heads, ", ", s.Lq, ") ", lse_type(q), " on ",
              q.device(), ", got ", lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  return s;
}

TORCH_LIBRARY(denseclip_fast, m) {
  m.def("build_info() -> str", &build_info);
  // L2-normalise every pixel of visual and every row of text, dot products, times scale: (B, K, H, W); and the
  // pixel norms |v| (B, H, W) in float32 (float64 for float64 inputs), which the backward takes.
  m.def("pixel_text_score(Tensor visual, Tensor text, float scale=1.0) -> (Tensor, Tensor)");
  // score_map and norm: the forward's outputs, which autograd passes (the CUDA tensor-core kernels take <v^, g^>
  // from the map, and with the norms read visual once)
  m.def("pixel_text_score_backward(Tensor grad, Tensor visual, Tensor text, float scale, Tensor? score_map=None, "
        "Tensor? norm=None) -> (Tensor, Tensor)");
  // cat([feature, pixel_text_score(visual, text, scale)], dim=1) without the intermediate score tensor; and the
  // pixel norms, as pixel_text_score.
  m.def("score_concat(Tensor feature, Tensor visual, Tensor text, float scale=1.0) -> (Tensor, Tensor)");
  // softmax(q k^T / sqrt(D)) v and the row log-sum-exp (B, heads, Lq) in float32 (float64 for float64 inputs).
  m.def("context_attention(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("context_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse)"
        " -> (Tensor, Tensor, Tensor)");
}

namespace {
// Under torch.autocast the operators keep their own precision (float32 accumulation, float32 log-sum-exp): autocast
// must not reach the ATen calls inside the kernels (at::bmm would run in bfloat16). Inputs are not cast either; the
// callers pass one dtype.
void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kTensorOps[] = {"pixel_text_score", "pixel_text_score_backward", "score_concat",
                                      "context_attention", "context_attention_backward"};
}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, AutocastCPU, m) {
  for (const char* name : kTensorOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

TORCH_LIBRARY_IMPL(denseclip_fast, AutocastCUDA, m) {
  for (const char* name : kTensorOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

// The backward operators have no derivative: a second derivative through them (a gradient penalty, a Hessian) is
// an error naming the operator, not torch's default of a warning and a silently wrong (missing) term. The forward
// operators' autograd is registered in Python (denseclip_fast/ops/library.py).
TORCH_LIBRARY_IMPL(denseclip_fast, Autograd, m) {
  for (const char* name : {"pixel_text_score_backward", "context_attention_backward"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace denseclip_fast
