// CPU backward of pixel_text_score (and of score_concat's score channels), in one pass over the map, in the tiles
// of the forward (csrc/cpu/tiles.h). With v^ = v / max(|v|, eps), t^ = t / max(|t|, eps), G the incoming gradient
// and s = scale <t^, v^>, each tile of n pixels of image b, while it stays in cache:
//   G' = scale * G                                      (K x n, converted to float32/float64)
//   g^_v = T^^T G'                                      (one GEMM, C x n)
//   dv  = (g^_v - v <v, g^_v> / max(|v|, eps)^2) / max(|v|, eps)   F.normalize's Jacobian; the radial term only
//                                                       where |v| >= eps, as its clamp did (csrc/common.h)
//   A_t += (G' / max(|v|, eps)) V^T                     (one GEMM, K x C, accumulated per thread and text row)
// The per-thread sums are added in the order of their tiles (deterministic for a given thread count), and the text
// rows' Jacobian applied to them (ATen, K x C). |v| comes from the forward's norms when autograd passes them, else
// from the tile. The ATen formulation (csrc/score_backward.cpp, the CUDA fallback) made several passes over
// C x P-sized tensors and two layout copies for a channels_last map.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

#include "../common.h"
#include "tiles.h"

namespace denseclip_fast {
namespace {

using cpu_tiles::Tiling;

// The text-gradient sums of one at::parallel_for chunk: rows [first_row, first_row + rows) of the (B_text, K, C) sum.
struct TextPartial {
  int64_t first_tile, first_row;
  at::Tensor sums;
};

template <typename A>
class TileBackward {
 public:
  TileBackward(const at::Tensor& grad_visual, const at::Tensor& grad, const at::Tensor& visual,
               const at::Tensor& t_hat, const std::optional<at::Tensor>& norm, const ScoreShape& s, double scale)
      : s_(s), tiling_(s, sizeof(A)), grad_visual_(cpu_tiles::pixel_view(grad_visual, s.channels_last)),
        grad_(cpu_tiles::pixels_of(grad, s.channels_last)), visual_(cpu_tiles::pixels_of(visual, s.channels_last)),
        t_hat_(t_hat), scale_(static_cast<A>(scale)), norm_(norm ? norm->data_ptr<A>() : nullptr) {}

  int64_t tiles() const { return tiling_.count; }

  // The text-gradient sums (B_text, K, C), B_text = B for per-image text, else 1, once every tile has run.
  at::Tensor text_sums() {
    std::sort(partials_.begin(), partials_.end(),
              [](const TextPartial& a, const TextPartial& b) { return a.first_tile < b.first_tile; });
    at::Tensor total = at::zeros({s_.text_batched ? s_.B : 1, s_.K, s_.C}, t_hat_.options());
    for (const TextPartial& p : partials_) total.narrow(0, p.first_row, p.sums.size(0)).add_(p.sums);
    return total;
  }

  void operator()(int64_t begin, int64_t end) const {
    const at::ThreadLocalStateGuard caller_state(caller_state_);  // as in the forward (csrc/cpu/score.cpp)
    const at::TensorOptions opts = t_hat_.options();
    const int64_t n = tiling_.size;
    Buffers buf{at::empty({s_.C * n}, opts), at::empty({s_.K * n}, opts), at::empty({s_.C * n}, opts),
                std::vector<A>(n), std::vector<A>(n)};
    const int64_t first_row = text_row(begin);
    at::Tensor sums = at::zeros({text_row(end - 1) - first_row + 1, s_.K, s_.C}, opts);
    for (int64_t i = begin; i < end; ++i) backward_tile(i, buf, sums.select(0, text_row(i) - first_row));
    const std::lock_guard<std::mutex> lock(mutex_);
    partials_.push_back({begin, first_row, sums});
  }

 private:
  struct Buffers {
    at::Tensor converted, g, gv;  // the map's tile in A; the tile's G' (K x n or n x K); g^_v, then dv
    std::vector<A> clamped, radial;
  };

  int64_t text_row(int64_t tile) const { return s_.text_batched ? tiling_.image(tile) : 0; }

  void backward_tile(int64_t i, Buffers& buf, at::Tensor text_sums) const {
    const bool cl = s_.channels_last;
    const at::ScalarType ct = c10::CppTypeToScalarType<A>::value;
    const int64_t b = tiling_.image(i), p0 = tiling_.first_pixel(i), n = tiling_.pixels(i, s_.P());
    const at::Tensor v = cpu_tiles::tile_in(cpu_tiles::tile_of(visual_, b, p0, n, cl), ct, buf.converted);
    const at::Tensor g = buf.g.narrow(0, 0, s_.K * n).view(cl ? at::IntArrayRef{n, s_.K} : at::IntArrayRef{s_.K, n});
    g.copy_(cpu_tiles::tile_of(grad_, b, p0, n, cl)).mul_(scale_);
    const at::Tensor text = s_.text_batched ? t_hat_.select(0, b) : t_hat_;  // (K, C)
    at::Tensor gv = buf.gv.narrow(0, 0, s_.C * n).view(cl ? at::IntArrayRef{n, s_.C} : at::IntArrayRef{s_.C, n});
    if (cl) {
      at::mm_out(gv, g, text);  // (n, C)
    } else {
      at::mm_out(gv, text.t(), g);  // (C, n)
    }
    const A* x = v.data_ptr<A>();
    A* d = gv.data_ptr<A>();
    const int64_t x_row = v.stride(0), d_row = gv.stride(0);
    A* clamped = buf.clamped.data();
    A* radial = buf.radial.data();
    if (norm_ != nullptr) {
      std::copy(norm_ + b * s_.P() + p0, norm_ + b * s_.P() + p0 + n, clamped);
    } else {
      cpu_tiles::pixel_dots(x, x_row, x, x_row, s_.C, n, cl, clamped);
      for (int64_t j = 0; j < n; ++j) clamped[j] = std::sqrt(clamped[j]);
    }
    cpu_tiles::pixel_dots(x, x_row, static_cast<const A*>(d), d_row, s_.C, n, cl, radial);
    const A eps = static_cast<A>(kNormEps);
    for (int64_t j = 0; j < n; ++j) {
      const bool outside = clamped[j] >= eps;  // |v| >= eps: the radial part of the Jacobian applies
      clamped[j] = std::max(clamped[j], eps);
      radial[j] = outside ? radial[j] / (clamped[j] * clamped[j]) : A(0);
      clamped[j] = A(1) / clamped[j];  // from here on, 1 / max(|v|, eps)
    }
    if (cl) {  // pixel j: C contiguous elements
      for (int64_t j = 0; j < n; ++j) {
        A* dj = d + j * d_row;
        const A* xj = x + j * x_row;
        for (int64_t c = 0; c < s_.C; ++c) dj[c] = (dj[c] - xj[c] * radial[j]) * clamped[j];
      }
    } else {  // channel c: n contiguous pixels
      for (int64_t c = 0; c < s_.C; ++c) {
        A* dc = d + c * d_row;
        const A* xc = x + c * x_row;
        for (int64_t j = 0; j < n; ++j) dc[j] = (dc[j] - xc[j] * radial[j]) * clamped[j];
      }
    }
    cpu_tiles::tile_of(grad_visual_, b, p0, n, cl).copy_(gv);
    cpu_tiles::scale_pixels(g.data_ptr<A>(), s_.K, n, cl, clamped);
    if (cl) {
      text_sums.addmm_(g.t(), v);  // (K x n)(n x C)
    } else {
      text_sums.addmm_(g, v.t());  // (K x n)(n x C)
    }
  }

  const ScoreShape& s_;
  const Tiling tiling_;
  const at::Tensor grad_visual_, grad_, visual_;  // pixel views (tiles.h)
  const at::Tensor& t_hat_;
  const A scale_;
  const A* const norm_;
  const at::ThreadLocalState caller_state_;
  mutable std::mutex mutex_;
  mutable std::vector<TextPartial> partials_;
};

std::tuple<at::Tensor, at::Tensor> score_backward_cpu(const at::Tensor& grad, const at::Tensor& visual,
                                                      const at::Tensor& text, double scale,
                                                      const std::optional<at::Tensor>& score_map,
                                                      const std::optional<at::Tensor>& norm) {
  const BelowAutograd below_autograd;
  const ScoreShape s = check_score_backward_inputs(grad, visual, text, score_map, norm);
  const at::MemoryFormat format = score_memory_format(visual);
  if (visual.numel() == 0) return zero_score_gradients(visual, text);
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor t = text.to(ct);
  const Normalized t_n = normalize_along(t, -1);
  const at::Tensor t_hat_rows = t_n.hat.contiguous();
  const at::Tensor v = visual.contiguous(format);
  const std::optional<at::Tensor> n = norm ? std::optional<at::Tensor>(norm->contiguous()) : std::nullopt;
  at::Tensor grad_visual = at::empty_like(visual, format);
  at::Tensor text_sums;
  AT_DISPATCH_FLOATING_TYPES(ct, "pixel_text_score_backward_cpu", [&] {
    TileBackward<scalar_t> backward(grad_visual, grad, v, t_hat_rows, n, s, scale);
    at::parallel_for(0, backward.tiles(), 1, backward);
    text_sums = backward.text_sums();
  });
  if (!s.text_batched) text_sums = text_sums.squeeze(0);
  const at::Tensor grad_text = normalize_backward(text_sums, t_n, -1);
  return {grad_visual, grad_text.to(text.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) { m.impl("pixel_text_score_backward", &score_backward_cpu); }

}  // namespace denseclip_fast
