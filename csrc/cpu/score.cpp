// CPU implementation of pixel_text_score and score_concat (the backward, ATen on any device, is in
// csrc/score_backward.cpp).
//
// s[b,k,p] = scale * <t_k, v_p> / (max(|t_k|, eps) * max(|v_p|, eps)) equals F.normalize on both sides followed by
// the dot product, so the visual map is never normalised in memory. One pass over it, in tiles of a few dozen
// pixels of one image, the tiles spread over the OpenMP threads (at::parallel_for). Each tile, while it stays in
// the thread's L2 cache:
//   1. float16/bfloat16 tiles are converted to float32 into a per-thread buffer (float32 and float64 are read in
//      place);
//   2. its pixel norms: a vectorised loop over the tile (returned for the backward);
//   3. its scores: one GEMM (MKL/BLAS through at::mm) of the normalised text, small and shared, with the raw tile,
//      in the layout the map has: (K x C)(C x n) for NCHW, (n x C)(C x K) for NHWC;
//   4. each pixel's scores times scale / max(|v|, eps), then written, in the output dtype, into the output or into
//      the score channels of score_concat's buffer.
// The map is read from memory once; the old form (norms over the whole map, then a batched GEMM over it, after a
// float32 copy of the whole map for float16/bfloat16) read it two to three times. Computation in float32 (float64
// for float64 inputs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "tiles.h"

namespace denseclip_fast {
namespace {

using cpu_tiles::Tiling;

// The tiles of one score call, for the threads of at::parallel_for.
template <typename A>
class TileScorer {
 public:
  TileScorer(const at::Tensor& out, const at::Tensor& norm, const at::Tensor& visual, const at::Tensor& t_hat,
             const ScoreShape& s, double scale)
      : s_(s), tiling_(s, sizeof(A)), out_(cpu_tiles::pixel_view(out, s.channels_last)),
        visual_(cpu_tiles::pixels_of(visual, s.channels_last)), t_hat_(t_hat), scale_(static_cast<A>(scale)),
        norm_(norm.data_ptr<A>()) {}

  int64_t tiles() const { return tiling_.count; }

  void operator()(int64_t begin, int64_t end) const {
    // the caller's inference mode, grad mode and dispatch exclusions also on the OpenMP worker threads, whose ATen
    // calls write into the caller's tensors (an inference tensor takes in-place writes only in inference mode)
    const at::ThreadLocalStateGuard caller_state(caller_state_);
    const at::TensorOptions opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
    // per thread: a tile converted to A (float16/bfloat16 maps), its scores, the per-pixel factors
    const at::Tensor converted = at::empty({s_.C * tiling_.size}, opts);
    const at::Tensor scores = at::empty({s_.K * tiling_.size}, opts);
    std::vector<A> factor(tiling_.size);
    for (int64_t i = begin; i < end; ++i) score_tile(i, converted, scores, factor.data());
  }

 private:
  void score_tile(int64_t i, const at::Tensor& converted, const at::Tensor& scores, A* factor) const {
    const bool cl = s_.channels_last;
    const int64_t b = tiling_.image(i), p0 = tiling_.first_pixel(i), n = tiling_.pixels(i, s_.P());
    // the tile, (C, n) for NCHW or (n, C) for NHWC: in the map, or converted into `converted`
    const at::Tensor tile = cpu_tiles::tile_in(cpu_tiles::tile_of(visual_, b, p0, n, cl),
                                               c10::CppTypeToScalarType<A>::value, converted);
    const A* x = tile.data_ptr<A>();
    A* norm = norm_ + b * s_.P() + p0;
    cpu_tiles::pixel_dots(x, tile.stride(0), x, tile.stride(0), s_.C, n, cl, norm);
    for (int64_t j = 0; j < n; ++j) {
      norm[j] = std::sqrt(norm[j]);
      factor[j] = scale_ / std::max(norm[j], static_cast<A>(kNormEps));
    }
    const at::Tensor text = s_.text_batched ? t_hat_.select(0, b) : t_hat_;  // (K, C)
    at::Tensor result = scores.narrow(0, 0, s_.K * n).view(cl ? at::IntArrayRef{n, s_.K} : at::IntArrayRef{s_.K, n});
    if (cl) {
      at::mm_out(result, tile, text.t());  // (n, K): row j is pixel j
    } else {
      at::mm_out(result, text, tile);  // (K, n): row k is class k
    }
    cpu_tiles::scale_pixels(result.data_ptr<A>(), s_.K, n, cl, factor);
    cpu_tiles::tile_of(out_, b, p0, n, cl).copy_(result);
  }

  const ScoreShape& s_;
  const Tiling tiling_;
  const at::Tensor out_, visual_;  // pixel views, (B, K, P) and (B, C, P) for NCHW, (B, P, K) and (B, P, C) for NHWC
  const at::Tensor& t_hat_;
  const A scale_;
  A* const norm_;
  const at::ThreadLocalState caller_state_;  // constructed on the calling thread
};

void score_forward_into(at::Tensor out, at::Tensor norm, const at::Tensor& visual, const at::Tensor& text,
                        const ScoreShape& s, double scale) {
  if (out.numel() == 0) return;  // B or H * W is 0 (K >= 1), and so is norm
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor t_hat = normalize_along(text.to(ct), -1).hat.contiguous();  // (K, C) or (B, K, C)
  const at::Tensor v =
      visual.contiguous(s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(ct, "pixel_text_score_cpu", [&] {
    const TileScorer<scalar_t> scorer(out, norm, v, t_hat, s, scale);
    at::parallel_for(0, scorer.tiles(), 1, scorer);
  });
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
