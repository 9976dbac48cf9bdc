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
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"

namespace denseclip_fast {
namespace {

constexpr int64_t kTileBytes = 512 * 1024;  // a tile of the map in float32: half of a 1 MB L2 cache
constexpr int64_t kMinTile = 16, kMaxTile = 512;
constexpr int64_t kLanes = 16;  // independent partial sums per pixel in the NHWC norm: vectorisable, no reassociation

// Pixels per tile: as many as fit kTileBytes, a multiple of kMinTile, fewer when that leaves threads idle.
int64_t tile_pixels(const ScoreShape& s) {
  int64_t n = std::clamp(kTileBytes / (4 * s.C) / kMinTile * kMinTile, kMinTile, kMaxTile);
  const int64_t threads = at::get_num_threads();
  while (n > kMinTile && s.B * ((s.P() + n - 1) / n) < 2 * threads) {
    n = std::max(kMinTile, n / 2 / kMinTile * kMinTile);
  }
  return std::min(n, std::max<int64_t>(s.P(), 1));
}

// Sums of squares of n pixels of an NCHW tile: x[c * stride_c + j] is channel c of pixel j.
template <typename A>
void sum_squares_channels_first(const A* x, int64_t stride_c, int64_t C, int64_t n, A* out) {
  std::fill(out, out + n, A(0));
  for (int64_t c = 0; c < C; ++c) {
    const A* row = x + c * stride_c;
    for (int64_t j = 0; j < n; ++j) out[j] += row[j] * row[j];
  }
}

// Sums of squares of n pixels of an NHWC tile: x[j * stride_p + c] is channel c of pixel j.
template <typename A>
void sum_squares_channels_last(const A* x, int64_t stride_p, int64_t C, int64_t n, A* out) {
  for (int64_t j = 0; j < n; ++j) {
    const A* px = x + j * stride_p;
    A lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int64_t i = 0; i < kLanes; ++i) lanes[i] += px[c + i] * px[c + i];
    }
    for (; c < C; ++c) lanes[0] += px[c] * px[c];
    A sum = 0;
    for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
    out[j] = sum;
  }
}

// The tiles of one score call: pixels [p0, p0 + n) of image b, for the threads of at::parallel_for.
template <typename A>
class TileScorer {
 public:
  TileScorer(const at::Tensor& out, const at::Tensor& norm, const at::Tensor& visual, const at::Tensor& t_hat,
             const ScoreShape& s, double scale, int64_t tile)
      : out_(out), visual_(visual), t_hat_(t_hat), s_(s), scale_(static_cast<A>(scale)), tile_(tile),
        norm_(norm.data_ptr<A>()), in_place_(visual.scalar_type() == c10::CppTypeToScalarType<A>::value) {}

  void operator()(int64_t begin, int64_t end) const {
    // the caller's inference mode, grad mode and dispatch exclusions also on the OpenMP worker threads, whose ATen
    // calls write into the caller's tensors (an inference tensor takes in-place writes only in inference mode)
    const at::ThreadLocalStateGuard caller_state(caller_state_);
    const at::TensorOptions opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
    // per thread: the converted tile (float16/bfloat16 only), its scores, the per-pixel factors
    at::Tensor converted = in_place_ ? at::Tensor() : at::empty({s_.C * tile_}, opts);
    at::Tensor scores = at::empty({s_.K * tile_}, opts);
    std::vector<A> factor(tile_);
    const int64_t tiles_per_image = (s_.P() + tile_ - 1) / tile_;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / tiles_per_image, p0 = (i % tiles_per_image) * tile_;
      score_tile(b, p0, std::min(tile_, s_.P() - p0), converted, scores, factor.data());
    }
  }

 private:
  void score_tile(int64_t b, int64_t p0, int64_t n, const at::Tensor& converted, const at::Tensor& scores,
                  A* factor) const {
    const bool cl = s_.channels_last;
    // the tile as a (C, n) view for NCHW or (n, C) for NHWC, in the map or converted into float32
    at::Tensor tile = cl ? visual_.select(0, b).permute({1, 2, 0}).view({s_.P(), s_.C}).narrow(0, p0, n)
                         : visual_.select(0, b).view({s_.C, s_.P()}).narrow(1, p0, n);
    if (!in_place_) tile = converted.narrow(0, 0, s_.C * n).view(tile.sizes()).copy_(tile);
    A* norm = norm_ + b * s_.P() + p0;
    const A* x = tile.data_ptr<A>();
    if (cl) {
      sum_squares_channels_last(x, tile.stride(0), s_.C, n, norm);
    } else {
      sum_squares_channels_first(x, tile.stride(0), s_.C, n, norm);
    }
    for (int64_t j = 0; j < n; ++j) {
      norm[j] = std::sqrt(norm[j]);
      factor[j] = scale_ / std::max(norm[j], static_cast<A>(kNormEps));
    }
    const at::Tensor text = s_.text_batched ? t_hat_.select(0, b) : t_hat_;  // (K, C)
    at::Tensor result = scores.narrow(0, 0, s_.K * n);
    A* r = result.data_ptr<A>();
    if (cl) {  // (n, K): row j is pixel j
      at::Tensor rows = result.view({n, s_.K});
      at::mm_out(rows, tile, text.t());
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t k = 0; k < s_.K; ++k) r[j * s_.K + k] *= factor[j];
      }
      out_.select(0, b).permute({1, 2, 0}).view({s_.P(), s_.K}).narrow(0, p0, n).copy_(rows);
    } else {  // (K, n): row k is class k
      at::Tensor rows = result.view({s_.K, n});
      at::mm_out(rows, text, tile);
      for (int64_t k = 0; k < s_.K; ++k) {
        for (int64_t j = 0; j < n; ++j) r[k * n + j] *= factor[j];
      }
      out_.select(0, b).view({s_.K, s_.P()}).narrow(1, p0, n).copy_(rows);
    }
  }

  const at::Tensor &out_, &visual_, &t_hat_;
  const ScoreShape& s_;
  const A scale_;
  const int64_t tile_;
  A* const norm_;
  const bool in_place_;
  const at::ThreadLocalState caller_state_;  // constructed on the calling thread
};

void score_forward_into(at::Tensor out, at::Tensor norm, const at::Tensor& visual, const at::Tensor& text,
                        const ScoreShape& s, double scale) {
  if (out.numel() == 0) return;  // B or H * W is 0 (K >= 1), and so is norm
  const at::ScalarType ct = compute_type(visual);
  const at::Tensor t_hat = normalize_along(text.to(ct), -1).first.contiguous();  // (K, C) or (B, K, C)
  const at::Tensor v =
      visual.contiguous(s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t tile = tile_pixels(s);
  const int64_t tiles = s.B * ((s.P() + tile - 1) / tile);
  AT_DISPATCH_FLOATING_TYPES(ct, "pixel_text_score_cpu", [&] {
    at::parallel_for(0, tiles, 1, TileScorer<scalar_t>(out, norm, v, t_hat, s, scale, tile));
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
