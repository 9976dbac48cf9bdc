// CUDA kernels of pixel_text_score, score_concat and pixel_text_score_backward.
//
// float16 (sm_70+; sm_75+ with CUDA 13) and bfloat16 (sm_80+): the tensor-core kernels (WMMA fragments, float
// accumulation) of score_tc.cuh, the forward (visual read once for up to 192 classes; it also writes the pixel
// norms), and of score_backward_tc.cuh, the one-pass backward for up to 192 classes when autograd passes the
// forward's outputs (score_tc.cuh's two-kernel visual backward and a batched GEMM without them). Otherwise the
// backward is the ATen one of csrc/score_backward.cpp.
//
// float32, float64, and 16-bit types on older GPUs: the portable kernel (score_portable.cuh). A block scores a tile
// of 64 classes x 64 pixels of one image. It loops over the channels in chunks of 16, staging the visual tile
// (16 x 64) and the text tile (64 x 16) in shared memory in the accumulation type; each of the 256 threads
// accumulates a 4 x 4 micro-tile of dot products, and the block accumulates the squared norms of its 64 pixels and
// 64 classes along the way. The epilogue divides by max(norm, eps) on both sides (F.normalize's clamp) and
// multiplies by scale. Visual is read once per class tile. The products run on the FMA units in float (double for
// float64), so float32 keeps float32 accuracy.
//
// Both kernels take strides as arguments, so NCHW, NHWC and strided output views (score_concat) share them.
// ops.backends prefers the Triton kernels (denseclip_fast/ops/triton/score.py) on sm_80+ when Triton is installed.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <torch/library.h>
#include <torch/version.h>

#include "../common.h"
#include "score_backward_tc.cuh"
#include "score_portable.cuh"
#include "score_tc.cuh"
#include "score_text.cuh"
#include "tensor_cores.h"

namespace denseclip_fast {
namespace {

// The tensor-core kernel for T (__half or __nv_bfloat16), with the tile and load width of tc::choose_config.
template <typename T>
void launch_tensor_core(at::Tensor& out, at::Tensor& norm, const at::Tensor& v, const at::Tensor& t,
                        const ScoreShape& s, const VisualStrides& vs, int64_t s_tb, double scale, int sm_count,
                        cudaStream_t stream) {
  const tc::Config cfg = tc::choose_config(s.B, s.C, s.P(), s.K, s.channels_last,
                                           reinterpret_cast<std::uintptr_t>(v.data_ptr()),
                                           reinterpret_cast<std::uintptr_t>(t.data_ptr()), sm_count);
  const dim3 grid((s.P() + tc::kTileP - 1) / tc::kTileP, (s.K + cfg.tile_k() - 1) / cfg.tile_k(), s.B);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "pixel_text_score: too many classes or images for one launch");
  tc::dispatch<T>(cfg, s.channels_last, [&](auto kernel) {
    kernel<<<grid, tc::kThreads, 0, stream>>>(data_as<T>(v), data_as<T>(t), data_as<T>(out), norm.data_ptr<float>(),
                                              s.C, s.P(), s.K, vs.b, vs.c, vs.p, s_tb, s.C, out.stride(0),
                                              out.stride(1), out.stride(3), static_cast<float>(scale));
  });
}

void score_forward_into(at::Tensor out, at::Tensor norm, const at::Tensor& visual, const at::Tensor& text,
                        const ScoreShape& s, double scale) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(visual.device());
  const at::MemoryFormat layout = s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor v = visual.contiguous(layout);
  const at::Tensor t = text.contiguous();
  const int64_t s_tb = s.text_batched ? s.K * s.C : 0;
  const VisualStrides vs = dense_visual_strides(s);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (const TensorCoreGpu* gpu = tensor_cores_for(v)) {
    with_cuda_type(v.scalar_type(), [&](auto tag) {
      launch_tensor_core<decltype(tag)>(out, norm, v, t, s, vs, s_tb, scale, gpu->sm_count, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  namespace pt = portable;
  const dim3 grid((s.P() + pt::kTileP - 1) / pt::kTileP, (s.K + pt::kTileK - 1) / pt::kTileK, s.B);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "pixel_text_score: too many classes or images for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "pixel_text_score_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    portable::score_forward_kernel<scalar_t, acc_t><<<grid, portable::kThreads, 0, stream>>>(
        v.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norm.data_ptr<acc_t>(), s.C, s.P(),
        s.K, vs.b, vs.c, vs.p, s_tb, s.C, out.stride(0), out.stride(1), out.stride(3), static_cast<acc_t>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// a @ b (batched, 16-bit inputs) in float32: cuBLAS accumulates in float and, with the out_dtype overload, also
// writes float, so the sum over the pixels cannot overflow float16's 65504 before the cast. The overload is in the
// torch versions this project builds with (2.11, 2.14); an older torch rounds the product to the input dtype first.
at::Tensor text_gradient_product(const at::Tensor& a, const at::Tensor& b) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::bmm(a, b, at::kFloat);
#else
  return at::bmm(a, b).to(at::kFloat);
#endif
}

// How many blocks of `kernel` (kThreads each, static shared memory only) a multiprocessor of `device` holds at
// once, from the occupancy calculator, cached per kernel and device (the query costs microseconds; a backward
// launches several kernels). Hopper and Ampere: 2 (the kernel's __launch_bounds__); Turing's 64 KB: 1.
template <typename Kernel>
int64_t blocks_per_multiprocessor(Kernel kernel, int threads, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  return known.emplace(key, std::max(blocks, 1)).first->second;
}

// The one-pass backward's visual and text halves (score_backward_tc.cuh) when autograd passes the forward's
// outputs: the pixel coefficients from G, the score map and the norms; then one kernel over the visual map that
// writes dv and d/d t^ partials (per split of the pixel tiles), summed here; returns d/d t^ ((K, C), or (B, K, C)
// for per-image text) in float32, dense. v, t_hat, g and the map as the two-pass kernel reads them.
at::Tensor backward_onepass(const at::Tensor& v, const at::Tensor& t_hat, const at::Tensor& g, const at::Tensor& score,
                            int64_t s_sb, int64_t s_sk, int64_t s_sp, const at::Tensor& norm, at::Tensor& grad_visual,
                            const ScoreShape& s, const VisualStrides& vs, int64_t s_tb, double scale, int sm_count,
                            cudaStream_t stream) {
  namespace op = onepass;
  TORCH_CHECK(s.K <= op::kMaxK, "pixel_text_score_backward: the one-pass kernel takes up to ", op::kMaxK,
              " classes, got K=", s.K);
  const at::Tensor coef = at::empty({2, s.B * s.P()}, norm.options());  // 1 / max(|v|, eps), then r
  const bool vec = op::vec_access(s.C, s.channels_last, reinterpret_cast<std::uintptr_t>(v.data_ptr()),
                                  reinterpret_cast<std::uintptr_t>(grad_visual.data_ptr()));
  at::Tensor partial;  // (z, splits, k_pad, c_pad): each split's d t^, summed below
  with_cuda_type(v.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    const int64_t pixels = s.B * s.P();
    op::pixel_coef_kernel<T><<<(pixels + op::kCoefThreads - 1) / op::kCoefThreads, op::kCoefThreads, 0, stream>>>(
        data_as<T>(g), data_as<T>(score), norm.data_ptr<float>(), coef.data_ptr<float>(), s.B, s.P(), s.K,
        g.stride(0), g.stride(1), s_sb, s_sk, s_sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto kernel = !s.channels_last ? op::onepass_kernel<T, false, false>
                  : vec            ? op::onepass_kernel<T, true, true>
                                   : op::onepass_kernel<T, true, false>;
    const int64_t resident = sm_count * blocks_per_multiprocessor(kernel, op::kThreads, v.device().index());
    const op::Plan plan = op::plan(s.B, s.C, s.P(), s.K, s.text_batched, resident);
    partial = at::empty({plan.z, plan.splits, plan.k_pad, plan.c_pad()}, norm.options());
    const dim3 grid(plan.c_blocks, plan.splits, plan.z);
    kernel<<<grid, op::kThreads, 0, stream>>>(data_as<T>(v), data_as<T>(t_hat), data_as<T>(g),
                                              coef.data_ptr<float>(), data_as<T>(grad_visual),
                                              partial.data_ptr<float>(), s.B, s.C, s.P(), s.K, vs.b, vs.c, vs.p,
                                              s_tb, g.stride(0), g.stride(1), plan.tiles_per_split,
                                              s.text_batched, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t splits = partial.size(1);
  at::Tensor gt = (splits > 1 ? partial.sum(1) : partial.select(1, 0)).narrow(1, 0, s.K).narrow(2, 0, s.C);
  return (s.text_batched ? gt : gt.select(0, 0)).mul(scale).contiguous();  // the partials are sum_p G v^^T
}

static_assert(onepass::kMaxK == tc::kMaxBwdK, "both tensor-core backwards take the same classes");

// The backward with tensor-core kernels (float16/bfloat16 where the forward's tensor-core kernel runs, up to
// tc::kMaxBwdK classes), else the ATen one. Given the forward's score map and norms (autograd passes them): the
// one-pass backward (backward_onepass), which reads the visual map once, as the Triton backward; five or six
// launches (text normalised, pixel coefficients, the one-pass kernel, the sum of its splits and a copy of the
// partials' valid part, the text Jacobian). Otherwise four launches: the text normalised
// (score_text.cuh: t^ in float32 and in the dtype, |t|), the visual kernel (dv, and 1 / max(|v_p|, eps) for the
// text half), d/d t^ = scale * sum_p G[:, p] v^_p^T as one batched GEMM on the normalised visual map in its dtype
// (float32 accumulation and output), and the text normalisation's Jacobian (score_text.cuh, with
// an ATen sum over the batch first when the text is shared). score_map, the forward's output (which autograd
// passes), spares the visual kernel's first pass its products with the text.
std::tuple<at::Tensor, at::Tensor> pixel_text_score_backward_cuda(const at::Tensor& grad, const at::Tensor& visual,
                                                                  const at::Tensor& text, double scale,
                                                                  const std::optional<at::Tensor>& score_map,
                                                                  const std::optional<at::Tensor>& norm) {
  const BelowAutograd below_autograd;
  const ScoreShape s = check_score_backward_inputs(grad, visual, text, score_map, norm);
  const at::ScalarType dtype = visual.scalar_type();
  const c10::cuda::CUDAGuard guard(visual.device());
  if (visual.numel() == 0 || s.K > tc::kMaxBwdK || tensor_cores_for(visual) == nullptr) {
    return score_backward_aten(grad, visual, text, scale, std::nullopt, norm);
  }
  TORCH_CHECK(s.B <= 65535, "pixel_text_score_backward: too many images for one launch");

  const at::Tensor t = text.contiguous();  // visual's dtype (check_score_inputs)
  const int64_t rows = s.text_batched ? s.B * s.K : s.K;
  const at::Tensor t_hat32 = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const at::Tensor t_hat = at::empty_like(t);
  const at::Tensor t_norm = at::empty({rows}, t.options().dtype(at::kFloat));
  const dim3 text_grid((rows + text::kWarps - 1) / text::kWarps);
  const at::MemoryFormat layout = s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor v = visual.contiguous(layout);
  // The kernel reads G[b, k, p] at b * s_gb + k * s_gk + p: contiguous pixels, as NCHW and score_concat's channel
  // slice of an NCHW gradient (read in place); other layouts are copied to NCHW first.
  const bool pixels_contiguous = (s.W == 1 || grad.stride(3) == 1) && (s.H == 1 || grad.stride(2) == s.W);
  const at::Tensor g = pixels_contiguous ? grad : grad.contiguous();
  // The score map is read once per pixel and class at S[b, k, p] = b * s_sb + k * s_sk + p * s_sp: in place when
  // its pixels are evenly spaced (NCHW, NHWC, a channel slice of either), else copied.
  at::Tensor score;
  int64_t s_sb = 0, s_sk = 0, s_sp = 0;
  if (score_map) {
    const at::Tensor& m = *score_map;
    score = s.H == 1 || s.W == 1 || m.stride(2) == s.W * m.stride(3) ? m : m.contiguous();
    s_sb = score.stride(0);
    s_sk = score.stride(1);
    s_sp = s.W > 1 ? score.stride(3) : score.stride(2);
  }
  at::Tensor grad_visual = at::empty({s.B, s.C, s.H, s.W}, visual.options().memory_format(layout));
  const VisualStrides vs = dense_visual_strides(s);
  const int64_t s_tb = s.text_batched ? s.K * s.C : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_cuda_type(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    text::text_normalize_kernel<T><<<text_grid, text::kWarps * 32, 0, stream>>>(
        data_as<T>(t), t_hat32.data_ptr<float>(), data_as<T>(t_hat), t_norm.data_ptr<float>(), rows, s.C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor gt_hat;  // d/d t^ (K, C) or (B, K, C), float32, dense
  if (score.defined() && norm) {
    gt_hat = backward_onepass(v, t_hat, g, score, s_sb, s_sk, s_sp, norm->contiguous(), grad_visual, s, vs, s_tb,
                              scale, tensor_cores_for(visual)->sm_count, stream);
  } else {
    // 1 / max(|v|, eps) per pixel for the text half, written by the kernel
    at::Tensor inv = at::empty({s.B, s.P()}, visual.options().dtype(at::kFloat));
    const dim3 grid((s.P() + tc::kTileP - 1) / tc::kTileP, s.B);
    with_cuda_type(dtype, [&](auto type_tag) {
      using T = decltype(type_tag);
      const bool vec = tc::backward_vec(s.C, s.channels_last, reinterpret_cast<std::uintptr_t>(v.data_ptr()),
                                        reinterpret_cast<std::uintptr_t>(grad_visual.data_ptr()));
      auto kernel = !s.channels_last ? tc::score_backward_visual_tc_kernel<T, false, false>
                    : vec            ? tc::score_backward_visual_tc_kernel<T, true, true>
                                     : tc::score_backward_visual_tc_kernel<T, true, false>;
      kernel<<<grid, tc::kThreads, 0, stream>>>(
          data_as<T>(v), data_as<T>(t_hat), data_as<T>(g), data_as<T>(grad_visual), inv.data_ptr<float>(), s.C, s.P(),
          s.K, vs.b, vs.c, vs.p, s_tb, g.stride(0), g.stride(1), static_cast<float>(scale),
          score.defined() ? data_as<T>(score) : nullptr, s_sb, s_sk, s_sp);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // scale * G v^^T with v^ = v / max(|v|, eps) in the dtype (elements in [-1, 1]), float32 accumulation; v^
    // made an image at a time, so that the float32 product is one image's
    const at::Tensor flat = v.view({s.B, s.C, s.P()});
    at::Tensor v_hat = at::empty_like(flat);
    for (int64_t b = 0; b < s.B; ++b) v_hat[b].copy_(flat[b].to(at::kFloat) * inv[b].unsqueeze(0));
    gt_hat = text_gradient_product(g.reshape({s.B, s.K, s.P()}), v_hat.transpose(1, 2)).mul_(scale);  // (B, K, C)
    gt_hat = (s.text_batched ? gt_hat : gt_hat.sum(0)).contiguous();  // one reduction over the GPU for shared text
  }
  at::Tensor grad_text = at::empty_like(t);
  with_cuda_type(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    text::text_grad_kernel<T><<<text_grid, text::kWarps * 32, 0, stream>>>(
        gt_hat.data_ptr<float>(), t_hat32.data_ptr<float>(), t_norm.data_ptr<float>(), data_as<T>(grad_text), rows,
        s.C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_visual, grad_text};
}

std::tuple<at::Tensor, at::Tensor> pixel_text_score_cuda(const at::Tensor& visual, const at::Tensor& text,
                                                         double scale) {
  return score_with(visual, text, scale, score_forward_into);
}

std::tuple<at::Tensor, at::Tensor> score_concat_cuda(const at::Tensor& feature, const at::Tensor& visual,
                                                     const at::Tensor& text, double scale) {
  return score_concat_with(feature, visual, text, scale, score_forward_into);
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CUDA, m) {
  m.impl("pixel_text_score", &pixel_text_score_cuda);
  m.impl("score_concat", &score_concat_cuda);
  m.impl("pixel_text_score_backward", &pixel_text_score_backward_cuda);
}

}  // namespace denseclip_fast
