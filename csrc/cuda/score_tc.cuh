// Tensor-core kernels of pixel_text_score (forward, and the visual half of the backward) for float16 (sm_70+) and
// bfloat16 (sm_80+), with the WMMA API (mma.sync 16x16x16 fragments, float accumulation). Included by score.cu,
// which launches them, and by the CPU emulation test (tests/cuda_emulation), which defines DCF_CUDA_EMULATION and
// runs them thread by thread on the host.
//
// Forward: a block of 8 warps scores all the classes of a class tile (64 or 192 rows: a tile covers K <= 192 in
// one, so `visual` is read from memory once for the usual 150-171 classes) against 64 pixels of one image. It steps
// over the channels 32 at a time:
//   - it stages text (tile_k x 32, row-major) and visual (32 x 64: row-major [c][p] for NCHW, column-major [p][c]
//     for NHWC, so that both are copied from global memory along their contiguous dimension) in shared memory,
//     with 8 elements of padding per row (ldm stays a multiple of 8, every fragment starts 32-byte aligned);
//   - one thread per pixel and per class adds the squares of its staged values to its norm (float);
//   - each warp multiplies its (tile_k / 32) class fragments by its one pixel fragment, two k-steps of 16.
// Epilogue per warp and fragment: the accumulator goes to a 16x16 float scratch in shared memory, and the warp's
// lanes write scale * dot / (max(|t|, eps) * max(|v|, eps)) (F.normalize's clamp) to `out` by its strides.
// Loads are 16-byte vectors (8 elements) when C (and for NCHW the pixel count) is a multiple of 8 and the tensors
// are 16-byte aligned (kVec), else element by element; padding rows and columns are zero.
// Backward: see score_backward_visual_tc_kernel.
#pragma once

#include <cstdint>
#include <type_traits>

#include "tc_common.cuh"

namespace denseclip_fast {
namespace tc {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kColFrags = 4, kTileP = kColFrags * kFrag;  // 64 pixels per block
constexpr int kTileC = 32;                   // channels staged per step (two k-steps)
constexpr int kMaxRowFrags = 12;             // class tile of 192 rows

// The sum of squares of kTileC staged values starting at a 16-byte aligned `row` (in float), read as 16-byte
// vectors: threads reading rows 80 bytes apart then hit distinct banks.
template <typename T>
__device__ __forceinline__ float row_sum_of_squares(const T* row) {
  float ss = 0.0f;
  for (int i = 0; i < kTileC; i += kVecElems) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + i);
    for (int e = 0; e < kVecElems; ++e) {
      const float x = to_float(pack.v[e]);
      ss += x * x;
    }
  }
  return ss;
}

// How a call is launched: the class-tile height (row fragments, 4 or 12) and whether loads are vectors.
struct Config {
  int row_frags;
  bool vec;
  int tile_k() const { return row_frags * kFrag; }
};

// visual_ptr/text_ptr: the addresses the kernel reads (after .contiguous()). The 192-row class tile reads visual
// once for up to 192 classes; the 64-row one is taken for K <= 64, and also when the pixel tiles of the batch
// (ceil(P / 64) * B blocks) would leave most of the GPU's `sm_count` multiprocessors idle (small maps: reading
// visual three times costs less than an idle GPU).
inline Config choose_config(int64_t B, int64_t C, int64_t P, int64_t K, bool nhwc, std::uintptr_t visual_ptr,
                            std::uintptr_t text_ptr, int sm_count) {
  const bool aligned = visual_ptr % 16 == 0 && text_ptr % 16 == 0;
  const bool vec = aligned && C % kVecElems == 0 && (nhwc || P % kVecElems == 0);
  const int64_t pixel_blocks = (P + kTileP - 1) / kTileP * B;
  const bool small = K <= 4 * kFrag || pixel_blocks < sm_count;
  return Config{small ? 4 : kMaxRowFrags, vec};
}

// T: __half or __nv_bfloat16. kRowFrags: 4 or 12 (class tile 64 or 192). kNHWC: visual is channels-last
// (s_vc == 1). kVec: 16-byte loads (see the file comment for when the launcher may choose it).
template <typename T, int kRowFrags, bool kNHWC, bool kVec>
__global__ void __launch_bounds__(kThreads)
    score_forward_tc_kernel(const T* __restrict__ v, const T* __restrict__ t, T* __restrict__ out,
                            float* __restrict__ norm, int64_t C, int64_t P, int64_t K, int64_t s_vb, int64_t s_vc,
                            int64_t s_vp, int64_t s_tb, int64_t s_tk, int64_t s_ob, int64_t s_ok, int64_t s_op,
                            float scale) {
  if constexpr (DCF_TC_ARCH >= kMinArch<T>) {
    namespace wmma = nvcuda::wmma;
    constexpr int kTileK = kRowFrags * kFrag;
    constexpr int kFragsPerWarp = kRowFrags / 2;  // warps 0-3 and 4-7 share a pixel fragment, split the classes
    constexpr int kLdT = kTileC + kPad;           // text tile row stride
    constexpr int kLdV = kNHWC ? kTileC + kPad : kTileP + kPad;  // visual tile: [p][c] (NHWC) or [c][p]
    constexpr int kVisualElems = kNHWC ? kTileP * kLdV : kTileC * kLdV;
    static_assert(kThreads >= kTileP + kTileK, "one thread per pixel and per class accumulates the norms");
    using BLayout = typename std::conditional<kNHWC, wmma::col_major, wmma::row_major>::type;

    __shared__ __align__(32) T ts[kTileK * kLdT];
    __shared__ __align__(32) T vs[kVisualElems];
    __shared__ __align__(32) float scratch[kWarps][kFrag * kFrag];
    __shared__ float v_sq[kTileP], t_sq[kTileK];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTileP, k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
    const T* vb = v + static_cast<int64_t>(blockIdx.z) * s_vb;
    const T* tb = t + static_cast<int64_t>(blockIdx.z) * s_tb;
    const T zero = from_float<T>(0.0f);
    auto v_at = [&](int c, int p) -> T& { return kNHWC ? vs[p * kLdV + c] : vs[c * kLdV + p]; };

    if (tid < kTileP) v_sq[tid] = 0.0f;
    else if (tid < kTileP + kTileK) t_sq[tid - kTileP] = 0.0f;
    __syncthreads();  // the epilogue reads them from other threads, also when C == 0 skips the loop

    const int col_frag = warp % kColFrags, first_row_frag = warp / kColFrags;
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kFragsPerWarp];
    for (int r = 0; r < kFragsPerWarp; ++r) wmma::fill_fragment(acc[r], 0.0f);

    for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
      if constexpr (kVec) {
        Pack<T> zeros;
        for (int e = 0; e < kVecElems; ++e) zeros.v[e] = zero;
        constexpr int kVisualPacks = kTileC * kTileP / kVecElems;
        for (int i = tid; i < kVisualPacks; i += kThreads) {
          // NHWC: 4 packs of channels per pixel; NCHW: 8 packs of pixels per channel (C, P multiples of 8)
          const int c = kNHWC ? (i % (kTileC / kVecElems)) * kVecElems : i / (kTileP / kVecElems);
          const int p = kNHWC ? i / (kTileC / kVecElems) : (i % (kTileP / kVecElems)) * kVecElems;
          const bool ok = c0 + c < C && p0 + p < P;
          *reinterpret_cast<Pack<T>*>(&v_at(c, p)) =
              ok ? *reinterpret_cast<const Pack<T>*>(vb + (c0 + c) * s_vc + (p0 + p) * s_vp) : zeros;
        }
        constexpr int kTextPacks = kTileK * kTileC / kVecElems;
        for (int i = tid; i < kTextPacks; i += kThreads) {
          const int k = i / (kTileC / kVecElems), c = (i % (kTileC / kVecElems)) * kVecElems;
          const bool ok = k0 + k < K && c0 + c < C;
          *reinterpret_cast<Pack<T>*>(&ts[k * kLdT + c]) =
              ok ? *reinterpret_cast<const Pack<T>*>(tb + (k0 + k) * s_tk + c0 + c) : zeros;
        }
      } else {
        for (int i = tid; i < kTileC * kTileP; i += kThreads) {  // consecutive threads along the contiguous dim
          const int c = kNHWC ? i % kTileC : i / kTileP, p = kNHWC ? i / kTileC : i % kTileP;
          const bool ok = c0 + c < C && p0 + p < P;
          v_at(c, p) = ok ? vb[(c0 + c) * s_vc + (p0 + p) * s_vp] : zero;
        }
        for (int i = tid; i < kTileK * kTileC; i += kThreads) {
          const int k = i / kTileC, c = i % kTileC;
          const bool ok = k0 + k < K && c0 + c < C;
          ts[k * kLdT + c] = ok ? tb[(k0 + k) * s_tk + c0 + c] : zero;
        }
      }
      __syncthreads();
      if (tid < kTileP) {
        if constexpr (kNHWC) {
          v_sq[tid] += row_sum_of_squares(&vs[tid * kLdV]);
        } else {  // a column of [c][p]: consecutive threads, consecutive addresses
          float ss = 0.0f;
          for (int c = 0; c < kTileC; ++c) {
            const float x = to_float(vs[c * kLdV + tid]);
            ss += x * x;
          }
          v_sq[tid] += ss;
        }
      } else if (tid < kTileP + kTileK) {
        t_sq[tid - kTileP] += row_sum_of_squares(&ts[(tid - kTileP) * kLdT]);
      }
      for (int kk = 0; kk < kTileC; kk += kFrag) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, BLayout> b_frag;
        const int p = col_frag * kFrag;
        wmma::load_matrix_sync(b_frag, kNHWC ? &vs[p * kLdV + kk] : &vs[kk * kLdV + p], kLdV);
        for (int r = 0; r < kFragsPerWarp; ++r) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a_frag;
          wmma::load_matrix_sync(a_frag, &ts[(first_row_frag + 2 * r) * kFrag * kLdT + kk], kLdT);
          wmma::mma_sync(acc[r], a_frag, b_frag, acc[r]);
        }
      }
      __syncthreads();
    }

    const float eps = 1e-12f;  // kNormEps, F.normalize's eps
    if (blockIdx.y == 0 && tid < kTileP && p0 + tid < P) {  // the pixel norms (B, P), from the first class tile
      norm[static_cast<int64_t>(blockIdx.z) * P + p0 + tid] = sqrtf(v_sq[tid]);
    }
    float* sc = scratch[warp];
    // Consecutive lanes write consecutive output addresses: along the pixels for NCHW output (scratch row-major,
    // a row per class), along the classes for NHWC (scratch column-major, a row per pixel).
    for (int r = 0; r < kFragsPerWarp; ++r) {
      wmma::store_matrix_sync(sc, acc[r], kFrag, kNHWC ? wmma::mem_col_major : wmma::mem_row_major);
      __syncwarp();
      const int row0 = (first_row_frag + 2 * r) * kFrag, col0 = col_frag * kFrag;
      for (int e = lane; e < kFrag * kFrag; e += 32) {
        const int kr = row0 + (kNHWC ? e % kFrag : e / kFrag), pc = col0 + (kNHWC ? e / kFrag : e % kFrag);
        const int64_t k = k0 + kr, p = p0 + pc;
        if (k < K && p < P) {
          const float denom = clamp_min(sqrtf(t_sq[kr]), eps) * clamp_min(sqrtf(v_sq[pc]), eps);
          out[static_cast<int64_t>(blockIdx.z) * s_ob + k * s_ok + p * s_op] = from_float<T>(sc[e] * scale / denom);
        }
      }
      __syncwarp();
    }
  } else {
    __trap();  // compiled for an older GPU than T needs; the launcher checks the kernel's PTX version first
  }
}

// ------------------------------------------------------------------------------------------------ backward

// The visual half of pixel_text_score's backward (the algorithm of the Triton kernel _score_bwd_visual_kernel).
// With t^ the normalised text (K, C) and G = dL/dscore (K, P) per image:
//   g^ = scale * t^^T G                     (C x P; recomputed, never stored)
//   dv = (g^ - v * <v, g^> / max(|v|, eps)^2) / max(|v|, eps), the radial term only where |v| >= eps
// A block takes 64 pixels of one image and keeps their G (K_pad x 64, K <= kMaxBwdK) in shared memory. It walks
// the channels twice, 32 at a time: each step stages t^ (K_pad x 32), the 8 warps compute the 2 x 4 fragments of g^
// (K_pad / 16 products each), store them to a float scratch that reuses the t^ buffer, and the threads combine
// them with v read from global memory (4 threads per pixel, 8 channels each): pass 1 sums |v|^2 and <v, g^> per
// pixel, pass 2 writes dv in visual's layout. Given the forward's output S = scale <v^, t^> (s_map, not null),
// pass 1 only sums |v|^2 (no t^ staging, no products) and <v^, g^> = sum_k G S comes from the G tile and S.
// Both give dv; S's rounding to T adds an error to the radial term (in bfloat16 ~1e-3 of dv). Between the passes the
// block writes each pixel's 1 / max(|v|, eps) (float32, (B, P); NaN stays NaN), from which the launcher makes v^ for
// the text gradient's GEMM (G v^^T: no float16 overflow, where G * scale / |v| in T overflowed at tiny norms).
constexpr int kMaxBwdK = 192;

// Whether the backward's visual accesses are 16-byte vectors: NHWC, C a multiple of 8, both tensors aligned.
inline bool backward_vec(int64_t C, bool nhwc, std::uintptr_t visual_ptr, std::uintptr_t grad_ptr) {
  return nhwc && C % kVecElems == 0 && visual_ptr % 16 == 0 && grad_ptr % 16 == 0;
}
constexpr int kBwdLdG = kTileP + kPad;    // G tile row stride (16-bit elements)
constexpr int kBwdLdT = kTileC + kPad;    // t^ tile row stride
constexpr int kBwdLdS = kTileP + 4;       // float scratch row stride (a multiple of 4 floats)
constexpr int kBwdTBytes = kMaxBwdK * kBwdLdT * 2;
static_assert(kTileC * kBwdLdS * 4 <= kBwdTBytes, "the g^ scratch fits in the t^ buffer it reuses");

// kVec (NHWC only): a thread's 8 channels of a pixel are one 16-byte load and store (see backward_vec).
template <typename T, bool kNHWC, bool kVec>
__global__ void __launch_bounds__(kThreads)
    score_backward_visual_tc_kernel(const T* __restrict__ v, const T* __restrict__ t_hat, const T* __restrict__ g,
                                    T* __restrict__ grad_v, float* __restrict__ inv_out, int64_t C, int64_t P,
                                    int64_t K, int64_t s_vb, int64_t s_vc, int64_t s_vp, int64_t s_tb, int64_t s_gb,
                                    int64_t s_gk, float scale, const T* __restrict__ s_map, int64_t s_sb,
                                    int64_t s_sk, int64_t s_sp) {
  if constexpr (DCF_TC_ARCH >= kMinArch<T>) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) T gs[kMaxBwdK * kBwdLdG];
    __shared__ __align__(32) unsigned char t_buf[kBwdTBytes];  // t^ tile, then the g^ scratch
    __shared__ float partial[2][4][kTileP];                     // per pixel and channel quarter: |v|^2, <v, g^>
    __shared__ float pixel_inv[kTileP], pixel_radial[kTileP];
    T* ts = reinterpret_cast<T*>(t_buf);
    float* scratch = reinterpret_cast<float*>(t_buf);

    const int tid = threadIdx.x, warp = tid / 32;
    const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTileP, b = blockIdx.y;
    const int k_pad = static_cast<int>((K + kFrag - 1) / kFrag) * kFrag;
    const T zero = from_float<T>(0.0f);
    const T* vb = v + b * s_vb;
    const T* tb = t_hat + b * s_tb;
    const T* gb = g + b * s_gb;  // G[b, k, p] at b * s_gb + k * s_gk + p: NCHW, or a channel slice of it
    T* gvb = grad_v + b * s_vb;
    // This thread's pixel and quarter of the 32 channels of a step: along the pixels for NCHW, along the channels
    // (4 consecutive threads cover one pixel's 32) for NHWC, so that global accesses are coalesced.
    const int my_p = kNHWC ? tid / 4 : tid % kTileP, my_q = kNHWC ? tid % 4 : tid / kTileP;
    const int64_t p = p0 + my_p;

    for (int i = tid; i < k_pad * kTileP; i += kThreads) {
      const int k = i / kTileP, pp = i % kTileP;
      gs[k * kBwdLdG + pp] = k < K && p0 + pp < P ? gb[k * s_gk + p0 + pp] : zero;
    }
    const int row_frag = warp / kColFrags, col_frag = warp % kColFrags;
    const bool has_score = s_map != nullptr;  // the same for the whole grid: no divergence at the barriers
    constexpr int kPerThread = kTileC / 4;
    static_assert(!kVec || (kNHWC && kPerThread == kVecElems), "vector access: one pack of channels per thread");
    float v_sq = 0.0f, v_dot = 0.0f, inv = 0.0f, radial = 0.0f;

    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1) {  // the pixel totals, from the 4 quarters
        if (has_score) {  // this thread's classes (every 4th) of sum_k G S = <v^, g^>
          __syncthreads();  // G staged by every thread (the first pass had no barrier)
          const T* sb = s_map + b * s_sb;
          if (p < P) {
            for (int k = my_q; k < K; k += 4) {
              v_dot += to_float(gs[k * kBwdLdG + my_p]) * to_float(sb[k * s_sk + p * s_sp]);
            }
          }
        }
        partial[0][my_q][my_p] = v_sq;
        partial[1][my_q][my_p] = v_dot;
        __syncthreads();
        if (tid < kTileP) {
          float sq = 0.0f, dot = 0.0f;
          for (int q = 0; q < 4; ++q) {
            sq += partial[0][q][tid];
            dot += partial[1][q][tid];
          }
          const float norm = sqrtf(sq), eps = 1e-12f;
          const float pinv = 1.0f / clamp_min(norm, eps);
          pixel_inv[tid] = pinv;
          pixel_radial[tid] = norm >= eps ? (has_score ? dot * pinv : dot * pinv * pinv) : 0.0f;
          if (p0 + tid < P) inv_out[b * P + p0 + tid] = pinv;
        }
        __syncthreads();
        inv = pixel_inv[my_p];
        radial = pixel_radial[my_p];
      }
      for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
        if (pass == 0 && has_score) {  // |v|^2 alone: the same accesses as below, without g^
          if constexpr (kVec) {
            if (p < P && c0 + my_q * kPerThread < C) {
              const Pack<T> xs = *reinterpret_cast<const Pack<T>*>(vb + p * s_vp + c0 + my_q * kPerThread);
              for (int e = 0; e < kPerThread; ++e) v_sq += to_float(xs.v[e]) * to_float(xs.v[e]);
            }
          } else if (p < P) {
            for (int e = 0; e < kPerThread; ++e) {
              const int64_t c = c0 + my_q * kPerThread + e;
              if (c >= C) break;
              const float x = to_float(vb[c * s_vc + p * s_vp]);
              v_sq += x * x;
            }
          }
          continue;
        }
        for (int i = tid; i < k_pad * kTileC; i += kThreads) {
          const int k = i / kTileC, c = i % kTileC;
          ts[k * kBwdLdT + c] = k < K && c0 + c < C ? tb[k * C + c0 + c] : zero;
        }
        __syncthreads();  // t^ staged (and G, at the first step: without a map it is the first barrier)
        wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int k = 0; k < k_pad; k += kFrag) {
          // A = t^^T (channels x classes): t^ is staged [k][c], so A is column-major
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::col_major> a_frag;
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b_frag;
          wmma::load_matrix_sync(a_frag, &ts[k * kBwdLdT + row_frag * kFrag], kBwdLdT);
          wmma::load_matrix_sync(b_frag, &gs[k * kBwdLdG + col_frag * kFrag], kBwdLdG);
          wmma::mma_sync(acc, a_frag, b_frag, acc);
        }
        __syncthreads();  // every warp is done with t^: its buffer becomes the scratch
        wmma::store_matrix_sync(&scratch[row_frag * kFrag * kBwdLdS + col_frag * kFrag], acc, kBwdLdS,
                                wmma::mem_row_major);
        __syncthreads();
        if constexpr (kVec) {
          if (p < P && c0 + my_q * kPerThread < C) {  // C % 8 == 0: the pack is in range or out of it whole
            const int64_t at = p * s_vp + c0 + my_q * kPerThread;
            const Pack<T> xs = *reinterpret_cast<const Pack<T>*>(vb + at);
            Pack<T> dv;
            for (int e = 0; e < kPerThread; ++e) {
              const float x = to_float(xs.v[e]), gh = scratch[(my_q * kPerThread + e) * kBwdLdS + my_p] * scale;
              if (pass == 0) {
                v_sq += x * x;
                v_dot += x * gh;
              } else {
                dv.v[e] = from_float<T>((gh - x * radial) * inv);
              }
            }
            if (pass == 1) *reinterpret_cast<Pack<T>*>(gvb + at) = dv;
          }
        } else if (p < P) {
          for (int e = 0; e < kPerThread; ++e) {
            const int c = my_q * kPerThread + e;
            if (c0 + c >= C) break;
            const int64_t at = (c0 + c) * s_vc + p * s_vp;
            const float x = to_float(vb[at]), gh = scratch[c * kBwdLdS + my_p] * scale;
            if (pass == 0) {
              v_sq += x * x;
              v_dot += x * gh;
            } else {
              gvb[at] = from_float<T>((gh - x * radial) * inv);
            }
          }
        }
        __syncthreads();  // the scratch is read before the next step stages t^ over it
      }
    }
  } else {
    __trap();  // compiled for an older GPU than T needs; the launcher checks the kernel's PTX version first
  }
}

// Calls launch(kernel) with the instantiation of score_forward_tc_kernel<T, ...> that cfg and the layout select.
template <typename T, typename Launch>
void dispatch(const Config& cfg, bool nhwc, Launch&& launch) {
  const int which = (cfg.row_frags == 4 ? 0 : 4) + (nhwc ? 2 : 0) + (cfg.vec ? 1 : 0);
  switch (which) {
    case 0: launch(score_forward_tc_kernel<T, 4, false, false>); break;
    case 1: launch(score_forward_tc_kernel<T, 4, false, true>); break;
    case 2: launch(score_forward_tc_kernel<T, 4, true, false>); break;
    case 3: launch(score_forward_tc_kernel<T, 4, true, true>); break;
    case 4: launch(score_forward_tc_kernel<T, kMaxRowFrags, false, false>); break;
    case 5: launch(score_forward_tc_kernel<T, kMaxRowFrags, false, true>); break;
    case 6: launch(score_forward_tc_kernel<T, kMaxRowFrags, true, false>); break;
    default: launch(score_forward_tc_kernel<T, kMaxRowFrags, true, true>); break;
  }
}

}  // namespace tc
}  // namespace denseclip_fast
