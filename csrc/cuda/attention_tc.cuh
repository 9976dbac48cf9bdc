// Tensor-core forward of context_attention for float16 (sm_70+) and bfloat16 (sm_80+): flash attention with the
// WMMA API (16x16x16 fragments, float accumulation). Included by attention.cu, which launches it, and by the CPU
// emulation test (tests/cuda_emulation), which runs it thread by thread on the host.
//
// A block of 4 warps serves 64 query rows of one (batch, head), 16 rows a warp. The query tile is staged once in
// shared memory and each warp keeps its 16 x D slice in registers as matrix_a fragments (D padded to 32, 64 or
// 128 with zeros). Keys and values stream through shared memory 32 rows at a time; per key tile each warp
//   1. computes S = Q K^T (16 x 32, float) on the tensor cores and stores it to its shared scratch;
//   2. runs the online softmax, two lanes per query row (16 columns each, partners combined by one shuffle): the new
//      running max m, P = exp(scale * S - m) (zero past Lk) written as T for the next product, the running sum l in
//      float, and the correction exp(m_old - m_new) per row;
//   3. rescales its output accumulators by the corrections when a row's max moved (the fragments pass through the
//      scratch, whose rows the lanes scale: the WMMA accumulator layout is opaque), skipped when no max moved;
//   4. accumulates O += P V on the tensor cores.
// No Lq x Lk matrix exists. The epilogue writes O / l (through the scratch, coalesced along D) and the row
// log-sum-exp m + log(l) in float, which the backward (attention.cu) reads as it reads the portable kernel's.
// 32-key tiles keep the shared memory of a block at 31 KB for D = 128 (static, no opt-in); loads of K, V and Q are
// 16-byte vectors when D is a multiple of 8 and the tensors are 16-byte aligned (kVec), else element by element.
#pragma once

#include <cmath>
#include <cstdint>

#include "tc_common.cuh"

namespace denseclip_fast {
namespace tc {
namespace attention {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kWarpRows = kFrag, kBlockM = kWarps * kWarpRows;  // 64 query rows per block
constexpr int kBlockN = 32;                                      // keys per tile
constexpr int kLdS = kBlockN + 4;                                // float scratch row stride (144 bytes)
constexpr int kLdP = kBlockN + kPad;                             // P row stride (80 bytes)
constexpr int kMaxD = 128;

// How many 16-wide fragments cover head dim D (the kernel is instantiated for 2, 4 and 8).
inline int d_frags(int64_t D) { return D <= 32 ? 2 : D <= 64 ? 4 : 8; }

inline bool use_vec(int64_t D, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v) {
  return D % kVecElems == 0 && q % 16 == 0 && k % 16 == 0 && v % 16 == 0;
}

__device__ __forceinline__ float fast_exp(float x) {
#ifdef DCF_CUDA_EMULATION
  return std::exp(x);
#else
  return __expf(x);
#endif
}

// Rows [r0, r0 + kRows) of a row-major (L, D) matrix into `dst` (row stride kLd), zeros past L and past D up to kDp.
template <typename T, bool kVec, int kRows, int kDp, int kLd>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int64_t r0, int64_t L, int D) {
  if constexpr (kVec) {
    constexpr int kPacksPerRow = kDp / kVecElems;
    Pack<T> zeros;
    for (int e = 0; e < kVecElems; ++e) zeros.v[e] = from_float<T>(0.0f);
    for (int i = threadIdx.x; i < kRows * kPacksPerRow; i += kThreads) {
      const int r = i / kPacksPerRow, c = (i % kPacksPerRow) * kVecElems;
      const bool ok = r0 + r < L && c < D;  // D % 8 == 0: a pack is wholly inside or wholly past D
      *reinterpret_cast<Pack<T>*>(dst + r * kLd + c) =
          ok ? *reinterpret_cast<const Pack<T>*>(src + (r0 + r) * D + c) : zeros;
    }
  } else {
    for (int i = threadIdx.x; i < kRows * kDp; i += kThreads) {
      const int r = i / kDp, c = i % kDp;
      dst[r * kLd + c] = r0 + r < L && c < D ? src[(r0 + r) * D + c] : from_float<T>(0.0f);
    }
  }
}

// T: __half or __nv_bfloat16. kDFrags: D padded to 16 * kDFrags (2, 4 or 8). kVec: 16-byte loads (use_vec).
// Grid: (batch * heads, ceil(Lq / 64)); q, out (BH, Lq, D), k, v (BH, Lk, D) contiguous; lse (BH, Lq) float.
template <typename T, int kDFrags, bool kVec>
__global__ void __launch_bounds__(kThreads)
    attention_forward_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                T* __restrict__ out, float* __restrict__ lse, int64_t Lq, int64_t Lk, int D,
                                float scale) {
  if constexpr (DCF_TC_ARCH >= kMinArch<T>) {
    namespace wmma = nvcuda::wmma;
    constexpr int kDp = kDFrags * kFrag, kLd = kDp + kPad;
    static_assert(2 * kBlockN == kBlockM, "the key and value tiles together hold the query tile");
    static_assert(kDFrags % 2 == 0, "accumulators pass through the 32-column scratch two at a time");
    using FragA = wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major>;
    using FragAcc = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;

    __shared__ __align__(32) T kv[2 * kBlockN * kLd];  // the query tile first, then keys (rows 0-31) and values
    __shared__ __align__(32) float scratch[kWarps][kWarpRows * kLdS];
    __shared__ __align__(32) T ps[kWarps][kWarpRows * kLdP];
    __shared__ float row_factor[kWarps][kWarpRows];
    T* const ks = kv;
    T* const vs = kv + kBlockN * kLd;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t bh = blockIdx.x, m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
    const T* kb = k + bh * Lk * D;
    const T* vb = v + bh * Lk * D;
    float* const sw = scratch[warp];
    T* const pw = ps[warp];
    float* const fw = row_factor[warp];

    stage_rows<T, kVec, kBlockM, kDp, kLd>(kv, q + bh * Lq * D, m0, Lq, D);
    __syncthreads();
    FragA qf[kDFrags];
    for (int f = 0; f < kDFrags; ++f) wmma::load_matrix_sync(qf[f], kv + warp * kWarpRows * kLd + f * kFrag, kLd);
    FragAcc acc[kDFrags];
    for (int f = 0; f < kDFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);
    __syncthreads();  // every warp holds its queries before the keys overwrite them

    // Lanes 2r and 2r + 1 own query row r of the warp, columns [16 * half, 16 * half + 16) of a tile.
    const int row = lane / 2, half = lane % 2;
    float m_i = -INFINITY, l_i = 0.0f;

    // Each lane scales row r of the warp's scratch-staged accumulators by fw[r]; two fragments per round trip.
    auto scale_accumulators = [&]() {
      for (int f = 0; f < kDFrags; f += 2) {
        wmma::store_matrix_sync(sw, acc[f], kLdS, wmma::mem_row_major);
        wmma::store_matrix_sync(sw + kFrag, acc[f + 1], kLdS, wmma::mem_row_major);
        __syncwarp();
        for (int i = lane; i < kWarpRows * 2 * kFrag; i += 32) sw[(i / 32) * kLdS + i % 32] *= fw[i / 32];
        __syncwarp();
        wmma::load_matrix_sync(acc[f], sw, kLdS, wmma::mem_row_major);
        wmma::load_matrix_sync(acc[f + 1], sw + kFrag, kLdS, wmma::mem_row_major);
        __syncwarp();  // every lane has loaded before the next round's stores
      }
    };

    for (int64_t j0 = 0; j0 < Lk; j0 += kBlockN) {
      stage_rows<T, kVec, kBlockN, kDp, kLd>(ks, kb, j0, Lk, D);
      stage_rows<T, kVec, kBlockN, kDp, kLd>(vs, vb, j0, Lk, D);
      __syncthreads();

      // 1. S = Q K^T: K^T's fragment (d, j) is ks[j][d], a column-major matrix_b.
      for (int u = 0; u < kBlockN / kFrag; ++u) {
        FragAcc s;
        wmma::fill_fragment(s, 0.0f);
        for (int f = 0; f < kDFrags; ++f) {
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, ks + u * kFrag * kLd + f * kFrag, kLd);
          wmma::mma_sync(s, qf[f], kf, s);
        }
        wmma::store_matrix_sync(sw + u * kFrag, s, kLdS, wmma::mem_row_major);
      }
      __syncwarp();

      // 2. Online softmax of row `row`; key columns past Lk count as -inf.
      const int valid = static_cast<int>(Lk - j0 < kBlockN ? Lk - j0 : kBlockN);
      const float* srow = sw + row * kLdS + half * kFrag;
      float tile_max = -INFINITY;
      for (int c = 0; c < kFrag; ++c) {
        if (half * kFrag + c < valid) tile_max = fmaxf(tile_max, srow[c] * scale);
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float m_new = fmaxf(m_i, tile_max);  // finite: every tile holds at least one key
      const float correction = fast_exp(m_i - m_new);
      float sum = 0.0f;
      T* prow = pw + row * kLdP + half * kFrag;
      for (int c = 0; c < kFrag; ++c) {
        const float p = half * kFrag + c < valid ? fast_exp(srow[c] * scale - m_new) : 0.0f;
        prow[c] = from_float<T>(p);
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      l_i = l_i * correction + sum;
      const bool moved = j0 > 0 && m_new > m_i;  // on the first tile the accumulators are still zero
      m_i = m_new;
      if (half == 0) fw[row] = correction;
      float any_moved = moved ? 1.0f : 0.0f;
      for (int offset = 16; offset > 0; offset /= 2) {
        any_moved = fmaxf(any_moved, __shfl_xor_sync(0xffffffffu, any_moved, offset));
      }
      __syncwarp();  // P and the corrections are in shared memory; the scratch (S) may be overwritten

      // 3. O *= correction, row by row, when some row's max moved.
      if (any_moved > 0.0f) scale_accumulators();

      // 4. O += P V.
      for (int kk = 0; kk < kBlockN / kFrag; ++kk) {
        FragA pf;
        wmma::load_matrix_sync(pf, pw + kk * kFrag, kLdP);
        for (int f = 0; f < kDFrags; ++f) {
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> vf;
          wmma::load_matrix_sync(vf, vs + kk * kFrag * kLd + f * kFrag, kLd);
          wmma::mma_sync(acc[f], pf, vf, acc[f]);
        }
      }
      __syncthreads();  // every warp is done with this tile's keys and values (and its own P) before the next
    }

    // Epilogue: O / l and the log-sum-exp.
    const int64_t first_row = m0 + warp * kWarpRows;
    if (half == 0) {
      fw[row] = 1.0f / l_i;
      if (first_row + row < Lq) lse[bh * Lq + first_row + row] = m_i + logf(l_i);
    }
    __syncwarp();
    T* const ob = out + bh * Lq * D;
    for (int f = 0; f < kDFrags; f += 2) {
      wmma::store_matrix_sync(sw, acc[f], kLdS, wmma::mem_row_major);
      wmma::store_matrix_sync(sw + kFrag, acc[f + 1], kLdS, wmma::mem_row_major);
      __syncwarp();
      for (int i = lane; i < kWarpRows * 2 * kFrag; i += 32) {
        const int r = i / 32, d = f * kFrag + i % 32;
        if (first_row + r < Lq && d < D) ob[(first_row + r) * D + d] = from_float<T>(sw[r * kLdS + i % 32] * fw[r]);
      }
      __syncwarp();
    }
  } else {
    __trap();  // compiled for an older GPU than T needs; the launcher checks the PTX version first
  }
}

// Calls launch(kernel) with the instantiation for head dim D and the load width.
template <typename T, typename Launch>
void dispatch(int64_t D, bool vec, Launch&& launch) {
  const int frags = d_frags(D);
  if (frags == 2) {
    vec ? launch(attention_forward_tc_kernel<T, 2, true>) : launch(attention_forward_tc_kernel<T, 2, false>);
  } else if (frags == 4) {
    vec ? launch(attention_forward_tc_kernel<T, 4, true>) : launch(attention_forward_tc_kernel<T, 4, false>);
  } else {
    vec ? launch(attention_forward_tc_kernel<T, 8, true>) : launch(attention_forward_tc_kernel<T, 8, false>);
  }
}

}  // namespace attention
}  // namespace tc
}  // namespace denseclip_fast
