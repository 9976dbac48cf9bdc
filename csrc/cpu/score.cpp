// CPU kernels of pixel_text_score, its backward and score_concat.
//
// Algorithm (forward). s[b,k,p] = scale * <t_k, v_p> / (max(|t_k|, eps) * max(|v_p|, eps)), which equals
// F.normalize on both sides followed by the dot product. Text rows are normalised once (K x C, tiny); visual is
// read exactly once: NCHW in blocks of 64 pixels (the block, converted to the accumulation type, stays in L2 while
// every class is scored against it, the inner loop running over contiguous pixels), NHWC one pixel at a time (a
// contiguous row of C, dotted with every class row). Accumulation in float (double for float64 inputs).
//
// Backward. With v^ = v / max(|v|, eps) and g^_v = scale * sum_k G[k] t^_k:
//   dv = (g^_v - v^ <v^, g^_v>) / |v|   if |v| >= eps,   g^_v / eps otherwise   (the same for t with g^_t);
// g^_t[k] = scale * sum_{b,p} G[b,k,p] v^[b,p] (summed over the batch when text is shared).
// Both gradients are computed on NCHW copies; grad_visual is returned in visual's memory format.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"

namespace denseclip_fast {
namespace {

constexpr int64_t kBlock = 64;  // pixels per NCHW block

template <typename acc_t>
inline acc_t inv_norm(acc_t sumsq) {
  return acc_t(1) / std::max(std::sqrt(sumsq), acc_t(kNormEps));
}

// The Jacobian of x / max(|x|, eps) (F.normalize) projects out the radial part iff |x| >= eps (clamp_min passes
// its gradient at equality); below eps the map is x / eps.
template <typename acc_t>
inline bool radial_part(acc_t norm) {
  return norm >= acc_t(kNormEps);
}

// rows x C normalised rows in acc_t, and their norms.
template <typename scalar_t, typename acc_t>
void normalize_rows(const scalar_t* x, int64_t rows, int64_t C, std::vector<acc_t>& out, std::vector<acc_t>& norm) {
  out.resize(rows * C);
  norm.resize(rows);
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t ss = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t val = static_cast<acc_t>(x[r * C + c]);
        ss += val * val;
      }
      norm[r] = std::sqrt(ss);
      const acc_t inv = inv_norm(ss);
      for (int64_t c = 0; c < C; ++c) out[r * C + c] = static_cast<acc_t>(x[r * C + c]) * inv;
    }
  });
}

// Scores of contiguous visual (in the layout of s.channels_last) into `out`, a (B, K, H, W) view with
// out.stride(2) == W * out.stride(3).
template <typename scalar_t>
void score_forward_kernel(const at::Tensor& visual, const at::Tensor& text, at::Tensor& out, const ScoreShape& s,
                          double scale) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t B = s.B, C = s.C, P = s.P(), K = s.K;
  std::vector<acc_t> t_hat, t_norm;
  normalize_rows<scalar_t, acc_t>(text.data_ptr<scalar_t>(), text.numel() / C, C, t_hat, t_norm);
  const scalar_t* v = visual.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t osb = out.stride(0), osk = out.stride(1), osp = out.stride(3);
  const acc_t sc = static_cast<acc_t>(scale);

  if (s.channels_last) {
    at::parallel_for(0, B * P, 16, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> row(C);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / P, p = i % P;
        const scalar_t* vr = v + i * C;
        acc_t ss = 0;
        for (int64_t c = 0; c < C; ++c) {
          row[c] = static_cast<acc_t>(vr[c]);
          ss += row[c] * row[c];
        }
        const acc_t f = sc * inv_norm(ss);
        const acc_t* tb = t_hat.data() + (s.text_batched ? b * K * C : 0);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* tk = tb + k * C;
          acc_t d = 0;
          for (int64_t c = 0; c < C; ++c) d += tk[c] * row[c];
          o[b * osb + k * osk + p * osp] = static_cast<scalar_t>(d * f);
        }
      }
    });
    return;
  }
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> vb(C * kBlock);
    acc_t ss[kBlock], f[kBlock], acc[kBlock];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, p0 = (i % blocks) * kBlock, n = std::min(kBlock, P - p0);
      const scalar_t* vbase = v + b * C * P + p0;
      std::fill(ss, ss + kBlock, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        acc_t* dst = vb.data() + c * kBlock;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(vbase[c * P + j]);
        for (int64_t j = n; j < kBlock; ++j) dst[j] = 0;
        for (int64_t j = 0; j < kBlock; ++j) ss[j] += dst[j] * dst[j];
      }
      for (int64_t j = 0; j < kBlock; ++j) f[j] = sc * inv_norm(ss[j]);
      const acc_t* tb = t_hat.data() + (s.text_batched ? b * K * C : 0);
      for (int64_t k = 0; k < K; ++k) {
        std::fill(acc, acc + kBlock, acc_t(0));
        const acc_t* tk = tb + k * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t w = tk[c];
          const acc_t* row = vb.data() + c * kBlock;
          for (int64_t j = 0; j < kBlock; ++j) acc[j] += w * row[j];
        }
        scalar_t* dst = o + b * osb + k * osk + p0 * osp;
        for (int64_t j = 0; j < n; ++j) dst[j * osp] = static_cast<scalar_t>(acc[j] * f[j]);
      }
    }
  });
}

void score_forward_into(at::Tensor out, const at::Tensor& visual, const at::Tensor& text, const ScoreShape& s,
                        double scale) {
  const at::Tensor v = visual.contiguous(s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor t = text.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "pixel_text_score_cpu",
                                  [&] { score_forward_kernel<scalar_t>(v, t, out, s, scale); });
}

at::Tensor pixel_text_score_cpu(const at::Tensor& visual, const at::Tensor& text, double scale) {
  const ScoreShape s = check_score_inputs(visual, text, "pixel_text_score");
  at::Tensor out = at::empty({s.B, s.K, s.H, s.W}, visual.options().memory_format(score_memory_format(visual)));
  score_forward_into(out, visual, text, s, scale);
  return out;
}

at::Tensor score_concat_cpu(const at::Tensor& feature, const at::Tensor& visual, const at::Tensor& text,
                            double scale) {
  const ScoreShape s = check_score_inputs(visual, text, "score_concat");
  at::Tensor out = empty_concat_output(feature, visual, s);
  out.narrow(1, 0, feature.size(1)).copy_(feature);
  score_forward_into(out.narrow(1, feature.size(1), s.K), visual, text, s, scale);
  return out;
}

template <typename scalar_t>
void score_backward_kernel(const at::Tensor& grad, const at::Tensor& visual, const at::Tensor& text,
                           at::Tensor& grad_visual, at::Tensor& grad_text, const ScoreShape& s, double scale) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t B = s.B, C = s.C, P = s.P(), K = s.K;
  const acc_t sc = static_cast<acc_t>(scale);
  const scalar_t* v = visual.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  std::vector<acc_t> t_hat, t_norm;
  normalize_rows<scalar_t, acc_t>(text.data_ptr<scalar_t>(), text.numel() / C, C, t_hat, t_norm);

  // Norms of every pixel.
  std::vector<acc_t> v_norm(B * P), v_inv(B * P);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> ss(P);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(ss.begin(), ss.end(), acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = v + (b * C + c) * P;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t x = static_cast<acc_t>(row[p]);
          ss[p] += x * x;
        }
      }
      for (int64_t p = 0; p < P; ++p) {
        v_norm[b * P + p] = std::sqrt(ss[p]);
        v_inv[b * P + p] = inv_norm(ss[p]);
      }
    }
  });

  // grad_visual, per block of pixels: g^ = scale * T^T G, then the normalisation's Jacobian.
  scalar_t* gv = grad_visual.data_ptr<scalar_t>();
  const int64_t blocks = (P + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> gh(C * kBlock), gb(K * kBlock);
    acc_t dot[kBlock];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, p0 = (i % blocks) * kBlock, n = std::min(kBlock, P - p0);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* src = g + (b * K + k) * P + p0;
        for (int64_t j = 0; j < kBlock; ++j) gb[k * kBlock + j] = j < n ? static_cast<acc_t>(src[j]) : acc_t(0);
      }
      const acc_t* tb = t_hat.data() + (s.text_batched ? b * K * C : 0);
      const acc_t* inv = v_inv.data() + b * P + p0;
      const acc_t* norm = v_norm.data() + b * P + p0;
      std::fill(dot, dot + kBlock, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        acc_t* row = gh.data() + c * kBlock;
        std::fill(row, row + kBlock, acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const acc_t w = sc * tb[k * C + c];
          const acc_t* gk = gb.data() + k * kBlock;
          for (int64_t j = 0; j < kBlock; ++j) row[j] += w * gk[j];
        }
        const scalar_t* vrow = v + (b * C + c) * P + p0;
        for (int64_t j = 0; j < n; ++j) dot[j] += static_cast<acc_t>(vrow[j]) * inv[j] * row[j];
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* row = gh.data() + c * kBlock;
        const scalar_t* vrow = v + (b * C + c) * P + p0;
        scalar_t* out = gv + (b * C + c) * P + p0;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t radial = radial_part(norm[j]) ? static_cast<acc_t>(vrow[j]) * inv[j] * dot[j] : acc_t(0);
          out[j] = static_cast<scalar_t>(inv[j] * (row[j] - radial));
        }
      }
    }
  });

  // grad_text: g^_t[r, c] = scale * sum_p G[b,k,p] v[b,c,p] / max(|v_p|, eps), rows r = (b,) k.
  const int64_t rows = text.numel() / C;
  std::vector<acc_t> gt_hat(rows * C, acc_t(0));
  for (int64_t b = 0; b < B; ++b) {
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> gs(P);
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* gk = g + (b * K + k) * P;
        for (int64_t p = 0; p < P; ++p) gs[p] = sc * static_cast<acc_t>(gk[p]) * v_inv[b * P + p];
        acc_t* dst = gt_hat.data() + ((s.text_batched ? b * K : 0) + k) * C;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* vrow = v + (b * C + c) * P;
          acc_t d = 0;
          for (int64_t p = 0; p < P; ++p) d += gs[p] * static_cast<acc_t>(vrow[p]);
          dst[c] += d;
        }
      }
    });
  }
  scalar_t* gt = grad_text.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* th = t_hat.data() + r * C;
      const acc_t* gh = gt_hat.data() + r * C;
      acc_t dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += th[c] * gh[c];
      const bool project = radial_part(t_norm[r]);
      const acc_t inv = acc_t(1) / std::max(t_norm[r], acc_t(kNormEps));
      for (int64_t c = 0; c < C; ++c) {
        gt[r * C + c] = static_cast<scalar_t>(inv * (gh[c] - (project ? th[c] * dot : acc_t(0))));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_text_score_backward_cpu(const at::Tensor& grad, const at::Tensor& visual,
                                                                 const at::Tensor& text, double scale) {
  ScoreShape s = check_score_inputs(visual, text, "pixel_text_score_backward");
  check_score_grad(grad, visual, s, "pixel_text_score_backward");
  const at::MemoryFormat fmt = score_memory_format(visual);
  s.channels_last = false;  // the backward works on NCHW copies
  const at::Tensor v = visual.contiguous(), g = grad.contiguous(), t = text.contiguous();
  at::Tensor grad_visual = at::empty_like(v);
  at::Tensor grad_text = at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "pixel_text_score_backward_cpu", [&] {
    score_backward_kernel<scalar_t>(g, v, t, grad_visual, grad_text, s, scale);
  });
  return {grad_visual.contiguous(fmt), grad_text};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) {
  m.impl("pixel_text_score", &pixel_text_score_cpu);
  m.impl("pixel_text_score_backward", &pixel_text_score_backward_cpu);
  m.impl("score_concat", &score_concat_cpu);
}

}  // namespace denseclip_fast
