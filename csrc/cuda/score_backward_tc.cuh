// The one-pass tensor-core backward of pixel_text_score (float16 / bfloat16), for calls that have the forward's
// outputs (which autograd passes): the score map S = scale <v^, t^> and the pixel norms |v|. The algorithm of the
// Triton kernels _score_bwd_pixel_kernel and _score_bwd_kernel (denseclip_fast/ops/triton/score.py); launched by
// score.cu; plain CUDA, no ATen, so that the CPU emulation test (tests/cuda_emulation/score_onepass_main.cpp) runs it.
//
// With t^ the normalised text (K, C), G = dL/dS (K, P) per image, inv = 1 / max(|v|, eps) and
// <v^, g^> = sum_k G S (g^ = scale t^^T G, the gradient with respect to v^):
//   dv   = (g^ - v * r) * inv,  r = <v^, g^> * inv where |v| >= eps, else 0    (F.normalize's backward)
//   d t^ = scale * sum_p G v^_p^T,  v^ = v * inv                                 (then the text Jacobian)
// No step needs all the channels of a pixel, so one pass over the map does both halves:
//   pixel_coef_kernel: per pixel, inv and r (one read of G and S).
//   onepass_kernel:    a block owns 64 channels (grid.x) of a range of 32-pixel tiles (grid.y: a split of the
//                      image's tiles, or of the whole batch's when the text is shared; grid.z: the image for
//                      per-image text). It stages its t^ (K_pad x 64) once; per tile it stages G (K_pad x 32) and
//                      the visual tile (64 x 32, read once from global memory), computes g^ (64 x 32) on tensor
//                      cores (the visual tile staged as v^ = v * inv, each element in [-1, 1]; dv takes the raw
//                      elements), accumulates G v^^T (K_pad x 64, float,
//                      in WMMA fragments: 6 per warp), and writes dv. At the end it stores its partial to
//                      partial[z][split] (K_pad x c_pad float32); the launcher sums the splits, multiplies by
//                      scale and applies the text Jacobian (score_text.cuh). (The tile G * scale * inv in T
//                      instead overflowed float16 past 65504 at tiny norms or large scales, and was clamped.)
// Bytes: visual read once, dv written once, G and S read once (and G again from L2 per channel block), against
// three reads of visual in the two-pass backward (score_tc.cuh). Static shared memory: 48,384 bytes at K <= 192;
// at most 128 registers a thread (__launch_bounds__(256, 2): two blocks per multiprocessor; nvcc 13 spills none on
// sm_90 or sm_80).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "tc_common.cuh"

namespace denseclip_fast {
namespace onepass {

using tc::clamp_min;
using tc::from_float;
using tc::kFrag;
using tc::kPad;
using tc::kVecElems;
using tc::Pack;
using tc::to_float;

constexpr int kMaxK = 192;                  // class rows of the staged tiles (kMaxK / 16 fragments)
constexpr int kTileP = 32, kTileC = 64;     // pixels per tile, channels per block
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kLdT = kTileC + kPad;         // t^ tile [k][c]
constexpr int kLdG = kTileP + kPad;         // G tile [k][p]
constexpr int kLdS = kTileP + 4;            // g^ scratch [c][p] (NCHW), float (over the G tile's bytes)
constexpr int kLdSN = kTileC + 4;           // g^ scratch [p][c] (NHWC: a pixel's 8 threads read along c)
constexpr int kTextFrags = (kMaxK / kFrag) * (kTileC / kFrag) / kWarps;  // d t^ fragments per warp
constexpr int kMinPixelsPerSplit = 256;     // a split of fewer pixels would spend more on its partial than it saves
constexpr int kCoefThreads = 256;
static_assert(kTileC * kLdS * 4 <= kMaxK * kLdG * 2 && kTileP * kLdSN * 4 <= kMaxK * kLdG * 2,
              "the g^ scratch fits in the G tile it reuses");
static_assert(kTileC / kFrag * (kTileP / kFrag) == kWarps, "one g^ fragment per warp");
static_assert(kTileP * (kTileC / kVecElems) == kThreads, "a thread owns 8 channels of one pixel of a tile");

// How a call is split: grid (c_blocks, splits, z), each split `tiles_per_split` consecutive tiles of 32 pixels.
struct Plan {
  int64_t c_blocks, splits, tiles_per_split, z, k_pad;
  int64_t c_pad() const { return c_blocks * kTileC; }
};

// Enough blocks to fill the GPU once (`resident_blocks`: multiprocessors x the kernel's blocks per multiprocessor,
// which the launcher asks the occupancy calculator), each with at least kMinPixelsPerSplit pixels; no empty split.
// force_splits > 0 (tests) asks for that many splits (still none empty). B, C, P >= 1 (the launcher takes empty
// maps elsewhere).
inline Plan plan(int64_t B, int64_t C, int64_t P, int64_t K, bool text_batched, int64_t resident_blocks,
                 int64_t force_splits = 0) {
  Plan p{};
  p.c_blocks = (C + kTileC - 1) / kTileC;
  p.z = text_batched ? B : 1;
  p.k_pad = (K + kFrag - 1) / kFrag * kFrag;
  const int64_t tiles = (P + kTileP - 1) / kTileP * (text_batched ? 1 : B);
  const int64_t per_block = p.c_blocks * p.z;
  const int64_t wanted = (std::max<int64_t>(resident_blocks, 1) + per_block - 1) / per_block;
  const int64_t most = (tiles * kTileP + kMinPixelsPerSplit - 1) / kMinPixelsPerSplit;
  const int64_t splits = std::clamp<int64_t>(force_splits > 0 ? force_splits : std::min(wanted, most), 1, tiles);
  p.tiles_per_split = (tiles + splits - 1) / splits;
  p.splits = (tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

// Whether the visual accesses are 16-byte vectors: NHWC, C a multiple of 8, visual and dv aligned.
inline bool vec_access(int64_t C, bool nhwc, std::uintptr_t visual_ptr, std::uintptr_t grad_ptr) {
  return nhwc && C % kVecElems == 0 && visual_ptr % 16 == 0 && grad_ptr % 16 == 0;
}

// coef[i] = inv, coef[B * P + i] = r for pixel i = b * P + p. G[b, k, p] at b * s_gb + k * s_gk + p (pixels
// contiguous), S[b, k, p] at b * s_sb + k * s_sk + p * s_sp, norm (B, P) float. inv keeps a NaN norm's NaN.
template <typename T>
__global__ void __launch_bounds__(kCoefThreads)
    pixel_coef_kernel(const T* __restrict__ g, const T* __restrict__ s_map, const float* __restrict__ norm,
                      float* __restrict__ coef, int64_t B, int64_t P, int64_t K, int64_t s_gb, int64_t s_gk,
                      int64_t s_sb, int64_t s_sk, int64_t s_sp) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kCoefThreads + threadIdx.x;
  if (i >= B * P) return;
  const int64_t b = i / P, p = i % P;
  const T* gp = g + b * s_gb + p;
  const T* sp = s_map + b * s_sb + p * s_sp;
  float dot = 0.0f;
  for (int64_t k = 0; k < K; ++k) dot += to_float(gp[k * s_gk]) * to_float(sp[k * s_sk]);
  const float n = norm[i], eps = 1e-12f, inv = 1.0f / clamp_min(n, eps);
  coef[i] = inv;
  coef[B * P + i] = n >= eps ? dot * inv : 0.0f;
}

// t_hat: (K, C) or, per image, (B, K, C) at z * s_tb, dense. g: as pixel_coef_kernel's. v and grad_v: visual's
// dense layout (NCHW or NHWC strides s_vb, s_vc, s_vp). partial: (gridDim.z, gridDim.y, k_pad, c_pad) float32.
// per_image: text per image, grid z = the image (plan's z = B); else shared text, z = 1, tiles numbered over B.
// kVec (NHWC only): a thread's 8 channels of a pixel are one 16-byte load and store (see vec_access).
template <typename T, bool kNHWC, bool kVec>
__global__ void __launch_bounds__(kThreads, 2)
    onepass_kernel(const T* __restrict__ v, const T* __restrict__ t_hat, const T* __restrict__ g,
                   const float* __restrict__ coef, T* __restrict__ grad_v, float* __restrict__ partial, int64_t B,
                   int64_t C, int64_t P, int64_t K, int64_t s_vb, int64_t s_vc, int64_t s_vp, int64_t s_tb,
                   int64_t s_gb, int64_t s_gk, int64_t tiles_per_split, bool per_image, float scale) {
  if constexpr (DCF_TC_ARCH >= tc::kMinArch<T>) {
    namespace wmma = nvcuda::wmma;
    constexpr int kLdV = kNHWC ? kTileC + kPad : kTileP + kPad;  // visual tile: [p][c] (NHWC) or [c][p]
    constexpr int kVisualElems = kNHWC ? kTileP * kLdV : kTileC * kLdV;
    static_assert(!kVec || kNHWC, "vector accesses are NHWC's");
    __shared__ __align__(32) T ts[kMaxK * kLdT];
    __shared__ __align__(32) unsigned char g_buf[kMaxK * kLdG * sizeof(T)];  // G tile, then the g^ scratch
    __shared__ __align__(32) T vt[kVisualElems];
    __shared__ float inv_s[kTileP], rad_s[kTileP];
    T* gs = reinterpret_cast<T*>(g_buf);
    float* scratch = reinterpret_cast<float*>(g_buf);

    const int tid = threadIdx.x, warp = tid / 32;
    const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileC, z = blockIdx.z;
    const int k_pad = static_cast<int>((K + kFrag - 1) / kFrag) * kFrag;
    const int text_frags = k_pad / kFrag * (kTileC / kFrag);
    const int64_t tiles_per_image = (P + kTileP - 1) / kTileP;
    const int64_t tiles = per_image ? tiles_per_image : B * tiles_per_image;
    const int64_t first = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
    const int64_t last = first + tiles_per_split < tiles ? first + tiles_per_split : tiles;
    const T zero = from_float<T>(0.0f);
    // This thread's pixel of a tile and its 8 channels: along the pixels for NCHW (a warp reads 32 consecutive
    // pixels of a channel), along the channels for NHWC (8 threads cover a pixel's 64), for coalesced accesses.
    // It stages them (step 1) and writes their dv (step 5).
    const int my_p = kNHWC ? tid / (kTileC / kVecElems) : tid % kTileP;
    const int my_c = (kNHWC ? tid % (kTileC / kVecElems) : tid / kTileP) * kVecElems;
    auto v_at = [&](int c, int p) -> T& { return kNHWC ? vt[p * kLdV + c] : vt[c * kLdV + p]; };

    const T* tb = t_hat + z * s_tb;
    for (int i = tid; i < k_pad * kTileC; i += kThreads) {
      const int k = i / kTileC, c = i % kTileC;
      ts[k * kLdT + c] = k < K && c0 + c < C ? tb[k * C + c0 + c] : zero;
    }
    const int gh_row = warp / (kTileP / kFrag), gh_col = warp % (kTileP / kFrag);  // this warp's g^ fragment
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc_t[kTextFrags];
#pragma unroll
    for (int j = 0; j < kTextFrags; ++j) wmma::fill_fragment(acc_t[j], 0.0f);

    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t b = per_image ? z : tile / tiles_per_image, p0 = tile % tiles_per_image * kTileP;
      const T* gb = g + b * s_gb;
      // 1. stage G, the pixel coefficients and the normalised visual tile v^ = v * inv (a zero pixel's 0 * 1e12 is
      //    0, pixels past P are 0; NaN stays NaN): every element in [-1, 1], so that no float16 product in step 4
      //    overflows
      for (int i = tid; i < k_pad * kTileP; i += kThreads) {
        const int k = i / kTileP, pp = i % kTileP;
        gs[k * kLdG + pp] = k < K && p0 + pp < P ? gb[k * s_gk + p0 + pp] : zero;
      }
      if (tid < kTileP) {
        const bool in = p0 + tid < P;
        inv_s[tid] = in ? coef[b * P + p0 + tid] : 0.0f;  // 0 beyond P: no contribution to d t^
        rad_s[tid] = in ? coef[B * P + b * P + p0 + tid] : 0.0f;
      }
      const int64_t p = p0 + my_p;
      const int64_t at = b * s_vb + p * s_vp + (c0 + my_c) * s_vc;  // this thread's first element of visual and dv
      const float my_inv = p < P ? coef[b * P + p] : 0.0f;
      // The raw elements are needed again for dv (step 5): kept in registers as one pack (vector accesses), read
      // again from global memory (an L2 hit) by the element-wise variants, whose registers would spill.
      Pack<T> mine;
      if constexpr (kVec) {
        Pack<T> hat;
        if (p < P && c0 + my_c < C) {  // C % 8 == 0: a pack is in range or out of it whole
          mine = *reinterpret_cast<const Pack<T>*>(v + at);
        } else {
          for (int e = 0; e < kVecElems; ++e) mine.v[e] = zero;
        }
        for (int e = 0; e < kVecElems; ++e) hat.v[e] = from_float<T>(to_float(mine.v[e]) * my_inv);
        *reinterpret_cast<Pack<T>*>(&v_at(my_c, my_p)) = hat;
      } else {
        const int valid = p < P ? static_cast<int>(C - c0 - my_c) : 0;  // channels of this thread in range
        for (int e = 0; e < kVecElems; ++e) {
          v_at(my_c + e, my_p) = e < valid ? from_float<T>(to_float(v[at + e * s_vc]) * my_inv) : zero;
        }
      }
      __syncthreads();
      // 2. g^ = t^^T G (64 channels x 32 pixels), one fragment per warp; A = t^^T is column-major in ts [k][c]
      wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc_g;
      wmma::fill_fragment(acc_g, 0.0f);
#pragma unroll 2
      for (int k = 0; k < k_pad; k += kFrag) {
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::col_major> a_frag;
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b_frag;
        wmma::load_matrix_sync(a_frag, &ts[k * kLdT + gh_row * kFrag], kLdT);
        wmma::load_matrix_sync(b_frag, &gs[k * kLdG + gh_col * kFrag], kLdG);
        wmma::mma_sync(acc_g, a_frag, b_frag, acc_g);
      }
      // 3. (G stays as staged: d t^ takes v^, scaled once by the launcher)
      // 4. d t^ += G V^^T: (K_pad x 32)(32 x 64); V^^T is column-major in [c][p], row-major in [p][c]
      using VLayout = typename std::conditional<kNHWC, wmma::row_major, wmma::col_major>::type;
#pragma unroll
      for (int j = 0; j < kTextFrags; ++j) {
        const int f = warp + kWarps * j;
        if (f < text_frags) {
          const int row = f / (kTileC / kFrag), col = f % (kTileC / kFrag);
          for (int kk = 0; kk < kTileP; kk += kFrag) {
            wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a_frag;
            wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, VLayout> b_frag;
            wmma::load_matrix_sync(a_frag, &gs[row * kFrag * kLdG + kk], kLdG);
            wmma::load_matrix_sync(b_frag, kNHWC ? &vt[kk * kLdV + col * kFrag] : &vt[col * kFrag * kLdV + kk],
                                   kLdV);
            wmma::mma_sync(acc_t[j], a_frag, b_frag, acc_t[j]);
          }
        }
      }
      __syncthreads();  // every warp is done with the G tile: its bytes become the g^ scratch
      if constexpr (kNHWC) {  // [p][c]: fewer bank conflicts when a pixel's 8 threads read their channels
        wmma::store_matrix_sync(&scratch[gh_col * kFrag * kLdSN + gh_row * kFrag], acc_g, kLdSN, wmma::mem_col_major);
      } else {
        wmma::store_matrix_sync(&scratch[gh_row * kFrag * kLdS + gh_col * kFrag], acc_g, kLdS, wmma::mem_row_major);
      }
      __syncthreads();
      // 5. dv = (g^ - v r) inv, in visual's layout (v: the thread's own raw elements, see step 1)
      const float inv = inv_s[my_p], rad = rad_s[my_p];
      auto dv_at = [&](int e, T x) {
        const float gh = (kNHWC ? scratch[my_p * kLdSN + my_c + e] : scratch[(my_c + e) * kLdS + my_p]) * scale;
        return from_float<T>((gh - to_float(x) * rad) * inv);
      };
      if constexpr (kVec) {
        if (p < P && c0 + my_c < C) {
          Pack<T> dv;
          for (int e = 0; e < kVecElems; ++e) dv.v[e] = dv_at(e, mine.v[e]);
          *reinterpret_cast<Pack<T>*>(grad_v + at) = dv;
        }
      } else {
        const int valid = p < P ? static_cast<int>(C - c0 - my_c) : 0;
        for (int e = 0; e < kVecElems && e < valid; ++e) grad_v[at + e * s_vc] = dv_at(e, v[at + e * s_vc]);
      }
      __syncthreads();  // the scratch, the visual tile and the coefficients are read before the next tile's
    }
    const int64_t c_pad = static_cast<int64_t>(gridDim.x) * kTileC;
    float* out = partial + (z * gridDim.y + blockIdx.y) * k_pad * c_pad + c0;
#pragma unroll
    for (int j = 0; j < kTextFrags; ++j) {
      const int f = warp + kWarps * j;
      if (f < text_frags) {
        const int row = f / (kTileC / kFrag), col = f % (kTileC / kFrag);
        wmma::store_matrix_sync(out + row * kFrag * c_pad + col * kFrag, acc_t[j], c_pad, wmma::mem_row_major);
      }
    }
  } else {
    __trap();  // compiled for an older GPU than T needs; the launcher checks the kernel's PTX version first
  }
}

}  // namespace onepass
}  // namespace denseclip_fast
