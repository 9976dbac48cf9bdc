// Pixel tiles of the CPU score kernels (csrc/cpu/score.cpp, csrc/cpu/score_backward.cpp): a few dozen to a few
// hundred pixels of one image, small enough to stay in a core's L2 cache while a tile's norms, GEMMs and elementwise
// work run over it, spread over the OpenMP threads with at::parallel_for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace denseclip_fast::cpu_tiles {

constexpr int64_t kTileBytes = 512 * 1024;  // a tile of the map in the compute type: half of a 1 MB L2 cache
constexpr int64_t kMinTile = 16, kMaxTile = 512;
constexpr int64_t kLanes = 16;  // independent partial sums per pixel in the NHWC reductions: vectorisable as written

// How a (B, *, H, W) map is cut: tiles of `size` pixels (the last of an image may be shorter), `per_image` a map.
struct Tiling {
  int64_t size, per_image, count;

  // As many pixels a tile as fit kTileBytes in elements of `element_bytes` (the compute type's), a multiple of
  // kMinTile, fewer when that would leave threads idle.
  Tiling(const ScoreShape& s, int64_t element_bytes) {
    size = std::clamp(kTileBytes / (element_bytes * std::max<int64_t>(s.C, 1)) / kMinTile * kMinTile, kMinTile,
                      kMaxTile);
    const int64_t threads = at::get_num_threads();
    while (size > kMinTile && s.B * ((s.P() + size - 1) / size) < 2 * threads) {
      size = std::max(kMinTile, size / 2 / kMinTile * kMinTile);
    }
    size = std::min(size, std::max<int64_t>(s.P(), 1));
    per_image = (s.P() + size - 1) / size;
    count = s.B * per_image;
  }
  int64_t image(int64_t tile) const { return tile / per_image; }
  int64_t first_pixel(int64_t tile) const { return tile % per_image * size; }
  int64_t pixels(int64_t tile, int64_t P) const { return std::min(size, P - first_pixel(tile)); }
};

// A (B, X, H, W) tensor as (B, X, P) for NCHW or (B, P, X) for NHWC, P = H * W: a view when the strides allow,
// else a copy (for inputs; outputs use pixel_view, which never copies).
inline at::Tensor pixels_of(const at::Tensor& x, bool channels_last) {
  return channels_last ? x.permute({0, 2, 3, 1}).flatten(1, 2) : x.flatten(2);
}

// The same as a view, for an output the kernels write into: an error, not a silent copy, if its strides do not
// allow it (the outputs are allocated in the layout of the call, so they always do).
inline at::Tensor pixel_view(const at::Tensor& x, bool channels_last) {
  const int64_t B = x.size(0), X = x.size(1), P = x.size(2) * x.size(3);
  return channels_last ? x.permute({0, 2, 3, 1}).view({B, P, X}) : x.view({B, X, P});
}

// Pixels [p0, p0 + n) of image b of pixels_of/pixel_view's result: (X, n) for NCHW, (n, X) for NHWC.
inline at::Tensor tile_of(const at::Tensor& pixels, int64_t b, int64_t p0, int64_t n, bool channels_last) {
  return pixels.select(0, b).narrow(channels_last ? 0 : 1, p0, n);
}

// Per-pixel dot products of two tiles of C channels and n pixels: out[j] = sum_c x[c, j] y[c, j] (NCHW: the pixel's
// elements `stride` apart, rows x_row / y_row apart) or sum_c x[j, c] y[j, c] (NHWC: pixel j's C contiguous
// elements at x + j * x_row). The norms are dot(x, x).
template <typename A>
void pixel_dots(const A* x, int64_t x_row, const A* y, int64_t y_row, int64_t C, int64_t n, bool channels_last,
                A* out) {
  if (!channels_last) {
    std::fill(out, out + n, A(0));
    for (int64_t c = 0; c < C; ++c) {
      const A* xr = x + c * x_row;
      const A* yr = y + c * y_row;
      for (int64_t j = 0; j < n; ++j) out[j] += xr[j] * yr[j];
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const A* xp = x + j * x_row;
    const A* yp = y + j * y_row;
    A lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int64_t i = 0; i < kLanes; ++i) lanes[i] += xp[c + i] * yp[c + i];
    }
    for (; c < C; ++c) lanes[0] += xp[c] * yp[c];
    A sum = 0;
    for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
    out[j] = sum;
  }
}

// Multiplies pixel j of a dense tile of X channels and n pixels, (X, n) for NCHW or (n, X) for NHWC, by factor[j],
// along the contiguous dimension.
template <typename A>
void scale_pixels(A* x, int64_t X, int64_t n, bool channels_last, const A* factor) {
  if (channels_last) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < X; ++c) x[j * X + c] *= factor[j];
    }
  } else {
    for (int64_t c = 0; c < X; ++c) {
      for (int64_t j = 0; j < n; ++j) x[c * n + j] *= factor[j];
    }
  }
}

// A tile of a (C, n) / (n, C) view in compute type A: the view itself when it already is A with unit stride along
// its last dimension, else converted into `buffer` (at least C * n elements of A).
inline at::Tensor tile_in(const at::Tensor& tile, at::ScalarType compute, const at::Tensor& buffer) {
  if (tile.scalar_type() == compute && tile.stride(1) == 1) return tile;
  return buffer.narrow(0, 0, tile.numel()).view(tile.sizes()).copy_(tile);
}

}  // namespace denseclip_fast::cpu_tiles
