// Tensor-core kernels of context_attention for float16 (sm_70+) and bfloat16 (sm_80+), forward and backward, with
// the WMMA API (16x16x16 fragments, float accumulation). Included by attention.cu, which launches them, and by the
// CPU emulation test (tests/cuda_emulation), which runs them thread by thread on the host.
//
// Forward, flash attention: a block of 4 warps serves 64 query rows of one (batch, head), 16 rows a warp. The
// query tile is staged once in shared memory and each warp keeps its 16 x D slice in registers as matrix_a
// fragments (D padded to 32, 64 or 128 with zeros). Keys and values stream through shared memory 32 rows at a
// time; per key tile each warp
//   1. computes S = Q K^T (16 x 32, float) on the tensor cores and stores it to its shared scratch;
//   2. runs the online softmax, two lanes per query row (the even and the odd columns, partners combined by one
//      shuffle): the new running max m, P = exp(scale * S - m) (zero past Lk) written as T for the next product,
//      the running sum l in float, and the correction exp(m_old - m_new) per row;
//   3. rescales its output accumulators by the corrections when a row's max moved (the fragments pass through the
//      scratch, whose rows the lanes scale: the WMMA accumulator layout is opaque), skipped when no max moved;
//   4. accumulates O += P V on the tensor cores.
// No Lq x Lk matrix exists. The epilogue writes O / l (through the scratch, coalesced along D) and the row
// log-sum-exp m + log(l) in float.
// Backward (FlashAttention-2's split, P recomputed from that log-sum-exp, delta = rowsum(dO * O) from the
// launcher): one kernel accumulates dQ per query block over the key tiles, one accumulates dK and dV per block of
// 32 keys over the query tiles; see attention_dq_tc_kernel and attention_dkdv_tc_kernel.
// Tiles of 32 keys (queries in dK/dV) keep every block's shared memory static (at most 44 KB, for D = 128); loads
// are 16-byte vectors when D is a multiple of 8 and the tensors are 16-byte aligned (`vec`, a block-uniform
// argument rather than a template parameter: one instantiation fewer per kernel keeps the build time down), else
// element by element.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "tc_common.cuh"

namespace denseclip_fast {
namespace tc {
namespace attention {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kWarpRows = kFrag, kBlockM = kWarps * kWarpRows;  // 64 query rows per block
constexpr int kBlockN = 32;                                      // keys per tile
constexpr int kLdS = kBlockN + 4;                                // float scratch row stride (144 bytes)
constexpr int kLdP = kBlockN + kPad;                             // P row stride (80 bytes)

// How many 16-wide fragments cover head dim D (the kernel is instantiated for 2, 4 and 8).
inline int d_frags(int64_t D) { return D <= 32 ? 2 : D <= 64 ? 4 : 8; }

// 16-byte loads: D a multiple of 8 (every row starts 16-byte aligned) and every tensor the kernels read aligned.
inline bool use_vec(int64_t D, std::initializer_list<const void*> tensors) {
  return D % kVecElems == 0 && std::all_of(tensors.begin(), tensors.end(), [](const void* p) {
           return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
         });
}

__device__ __forceinline__ float fast_exp(float x) {
#ifdef DCF_CUDA_EMULATION
  return std::exp(x);
#else
  return __expf(x);
#endif
}

// Rows [r0, r0 + kRows) of a row-major (L, D) matrix into `dst` (row stride kLd), zeros past L and past D up to kDp;
// by the kBlockThreads threads of the block.
template <typename T, int kRows, int kDp, int kLd, int kBlockThreads = kThreads>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int64_t r0, int64_t L, int D, bool vec) {
  if (vec) {
    constexpr int kPacksPerRow = kDp / kVecElems;
    Pack<T> zeros;
    for (int e = 0; e < kVecElems; ++e) zeros.v[e] = from_float<T>(0.0f);
    for (int i = threadIdx.x; i < kRows * kPacksPerRow; i += kBlockThreads) {
      const int r = i / kPacksPerRow, c = (i % kPacksPerRow) * kVecElems;
      const bool ok = r0 + r < L && c < D;  // D % 8 == 0: a pack is wholly inside or wholly past D
      *reinterpret_cast<Pack<T>*>(dst + r * kLd + c) =
          ok ? *reinterpret_cast<const Pack<T>*>(src + (r0 + r) * D + c) : zeros;
    }
  } else {
    for (int i = threadIdx.x; i < kRows * kDp; i += kBlockThreads) {
      const int r = i / kDp, c = i % kDp;
      dst[r * kLd + c] = r0 + r < L && c < D ? src[(r0 + r) * D + c] : from_float<T>(0.0f);
    }
  }
}

namespace wmma = nvcuda::wmma;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major>;
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major>;
template <typename T>
using FragBt = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major>;  // B^T of a row-major tile
using FragAcc = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;

// out (16 x 32 float, row stride kLdS) = A B^T, on the tensor cores: A the warp's 16 x D rows (fragment f given by
// a(f): held in registers, or loaded from shared memory), B the 32 rows of a staged tile (row stride kLd), read as
// column-major matrix_b fragments. S = Q K^T, dP = dO V^T and their transposes.
template <typename T, int kDFrags, int kLd, typename FragOfA>
__device__ __forceinline__ void times_tile_transposed(FragOfA&& a, const T* b, float* out) {
  for (int u = 0; u < kBlockN / kFrag; ++u) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int f = 0; f < kDFrags; ++f) {
      FragBt<T> bf;
      wmma::load_matrix_sync(bf, b + u * kFrag * kLd + f * kFrag, kLd);
      wmma::mma_sync(acc, a(f), bf, acc);
    }
    wmma::store_matrix_sync(out + u * kFrag, acc, kLdS, wmma::mem_row_major);
  }
}

// a(f) for times_tile_transposed: A's fragments held in registers.
template <typename T, int kN>
__device__ __forceinline__ auto held(const FragA<T> (&frags)[kN]) {
  return [&frags](int f) -> const FragA<T>& { return frags[f]; };
}

// a(f) for times_tile_transposed: A's 16 rows staged in shared memory (row stride kLd), a fragment loaded per use.
template <typename T, int kLd>
__device__ __forceinline__ auto staged(const T* rows) {
  return [rows](int f) {
    FragA<T> a;
    wmma::load_matrix_sync(a, rows + f * kFrag, kLd);
    return a;
  };
}

// acc[f] += P B for every 16-column fragment f, on the tensor cores: P the warp's 16 x 32 tile (row stride kLdP),
// B the 32 rows of a staged tile (row stride kLd). O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <typename T, int kDFrags, int kLd>
__device__ __forceinline__ void accumulate_times_tile(FragAcc* acc, const T* p, const T* b) {
  for (int kk = 0; kk < kBlockN / kFrag; ++kk) {
    FragA<T> pf;
    wmma::load_matrix_sync(pf, p + kk * kFrag, kLdP);
    for (int f = 0; f < kDFrags; ++f) {
      FragB<T> bf;
      wmma::load_matrix_sync(bf, b + kk * kFrag * kLd + f * kFrag, kLd);
      wmma::mma_sync(acc[f], pf, bf, acc[f]);
    }
  }
}

// Writes the warp's 16 x D accumulators (rows first_row.. of a row-major (L, D) matrix) to `dst`, row r multiplied
// by row_factor[r] when row_factor is given, through the warp's scratch two fragments at a time; rows past L and
// columns past D are dropped. Coalesced along D.
template <typename T, int kDFrags>
__device__ __forceinline__ void write_rows(const FragAcc* acc, float* sw, const float* row_factor, T* dst,
                                           int64_t first_row, int64_t L, int D) {
  const int lane = threadIdx.x % 32;
  for (int f = 0; f < kDFrags; f += 2) {
    wmma::store_matrix_sync(sw, acc[f], kLdS, wmma::mem_row_major);
    wmma::store_matrix_sync(sw + kFrag, acc[f + 1], kLdS, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < kFrag * 2 * kFrag; i += 32) {
      const int r = i / 32, d = f * kFrag + i % 32;
      const float x = sw[r * kLdS + i % 32] * (row_factor != nullptr ? row_factor[r] : 1.0f);
      if (first_row + r < L && d < D) dst[(first_row + r) * D + d] = from_float<T>(x);
    }
    __syncwarp();  // every lane has read the scratch before the next stores
  }
}

// T: __half or __nv_bfloat16. kDFrags: D padded to 16 * kDFrags (2, 4 or 8). vec: 16-byte loads (use_vec).
// Grid: (batch * heads, ceil(Lq / 64)); q, out (BH, Lq, D), k, v (BH, Lk, D) contiguous; lse (BH, Lq) float.
template <typename T, int kDFrags>
__global__ void __launch_bounds__(kThreads)
    attention_forward_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                T* __restrict__ out, float* __restrict__ lse, int64_t Lq, int64_t Lk, int D,
                                float scale, bool vec) {
  if constexpr (DCF_TC_ARCH >= kMinArch<T>) {
    constexpr int kDp = kDFrags * kFrag, kLd = kDp + kPad;
    static_assert(2 * kBlockN == kBlockM, "the key and value tiles together hold the query tile");
    static_assert(kDFrags % 2 == 0, "accumulators pass through the 32-column scratch two at a time");

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

    stage_rows<T, kBlockM, kDp, kLd>(kv, q + bh * Lq * D, m0, Lq, D, vec);
    __syncthreads();
    FragA<T> qf[kDFrags];
    for (int f = 0; f < kDFrags; ++f) wmma::load_matrix_sync(qf[f], kv + warp * kWarpRows * kLd + f * kFrag, kLd);
    FragAcc acc[kDFrags];
    for (int f = 0; f < kDFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);
    __syncthreads();  // every warp holds its queries before the keys overwrite them

    // Lanes 2r and 2r + 1 own query row r of the warp, the even and the odd columns of a tile (interleaved, the
    // 32 lanes' scratch reads of one step hit 16 banks, two lanes each: 2-way conflicts, not the 4-way of halves).
    const int row = lane / 2, odd = lane % 2;
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
      stage_rows<T, kBlockN, kDp, kLd>(ks, kb, j0, Lk, D, vec);
      stage_rows<T, kBlockN, kDp, kLd>(vs, vb, j0, Lk, D, vec);
      __syncthreads();

      // 1. S = Q K^T.
      times_tile_transposed<T, kDFrags, kLd>(held(qf), ks, sw);
      __syncwarp();

      // 2. Online softmax of row `row`; key columns past Lk count as -inf.
      const int valid = static_cast<int>(Lk - j0 < kBlockN ? Lk - j0 : kBlockN);
      const float* srow = sw + row * kLdS + odd;
      float tile_max = -INFINITY;
      for (int c = 0; c < kFrag; ++c) {
        if (2 * c + odd < valid) tile_max = fmaxf(tile_max, srow[2 * c] * scale);
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float m_new = fmaxf(m_i, tile_max);  // finite: every tile holds at least one key
      const float correction = fast_exp(m_i - m_new);
      float sum = 0.0f;
      T* prow = pw + row * kLdP + odd;
      for (int c = 0; c < kFrag; ++c) {
        const float p = 2 * c + odd < valid ? fast_exp(srow[2 * c] * scale - m_new) : 0.0f;
        prow[2 * c] = from_float<T>(p);
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      l_i = l_i * correction + sum;
      const bool moved = j0 > 0 && m_new > m_i;  // on the first tile the accumulators are still zero
      m_i = m_new;
      if (odd == 0) fw[row] = correction;
      float any_moved = moved ? 1.0f : 0.0f;
      for (int offset = 16; offset > 0; offset /= 2) {
        any_moved = fmaxf(any_moved, __shfl_xor_sync(0xffffffffu, any_moved, offset));
      }
      __syncwarp();  // P and the corrections are in shared memory; the scratch (S) may be overwritten

      // 3. O *= correction, row by row, when some row's max moved.
      if (any_moved > 0.0f) scale_accumulators();

      // 4. O += P V.
      accumulate_times_tile<T, kDFrags, kLd>(acc, pw, vs);
      __syncthreads();  // every warp is done with this tile's keys and values (and its own P) before the next
    }

    // Epilogue: O / l and the log-sum-exp.
    const int64_t first_row = m0 + warp * kWarpRows;
    if (odd == 0) {
      fw[row] = 1.0f / l_i;
      if (first_row + row < Lq) lse[bh * Lq + first_row + row] = m_i + logf(l_i);
    }
    __syncwarp();
    write_rows<T, kDFrags>(acc, sw, fw, out + bh * Lq * D, first_row, Lq, D);
  } else {
    __trap();  // compiled for an older GPU than T needs; the launcher checks the PTX version first
  }
}

// dQ, a block of 4 warps x 16 query rows as in the forward: Q and dO of the block's queries are staged (one after
// the other) and kept as matrix_a fragments; per tile of 32 keys and values each warp computes S = Q K^T and
// dP = dO V^T (16 x 32, float, through its scratch), its lanes form dS = P (dP - delta) * scale with
// P = exp(scale * S - lse) from the forward's log-sum-exp (zero past Lk), written as T, and dQ += dS K.
// Grid: (batch * heads, ceil(Lq / 64)); lse and delta (BH, Lq) float.
template <typename T, int kDFrags>
__global__ void __launch_bounds__(kThreads)
    attention_dq_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const T* __restrict__ dout, const float* __restrict__ lse,
                           const float* __restrict__ delta, T* __restrict__ dq, int64_t Lq, int64_t Lk, int D,
                           float scale, bool vec) {
  if constexpr (DCF_TC_ARCH >= kMinArch<T>) {
    constexpr int kDp = kDFrags * kFrag, kLd = kDp + kPad;
    static_assert(kDFrags % 2 == 0, "accumulators pass through the 32-column scratch two at a time");

    __shared__ __align__(32) T kv[2 * kBlockN * kLd];  // the query tile, then the dO tile, then keys and values
    __shared__ __align__(32) float scratch[kWarps][kWarpRows * kLdS];
    __shared__ __align__(32) T ps[kWarps][kWarpRows * kLdP];  // dS
    T* const ks = kv;
    T* const vs = kv + kBlockN * kLd;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t bh = blockIdx.x, m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
    const int64_t first_row = m0 + warp * kWarpRows;
    const T* kb = k + bh * Lk * D;
    const T* vb = v + bh * Lk * D;
    float* const sw = scratch[warp];
    T* const pw = ps[warp];

    FragA<T> qf[kDFrags], gf[kDFrags];
    stage_rows<T, kBlockM, kDp, kLd>(kv, q + bh * Lq * D, m0, Lq, D, vec);
    __syncthreads();
    for (int f = 0; f < kDFrags; ++f) wmma::load_matrix_sync(qf[f], kv + warp * kWarpRows * kLd + f * kFrag, kLd);
    __syncthreads();
    stage_rows<T, kBlockM, kDp, kLd>(kv, dout + bh * Lq * D, m0, Lq, D, vec);
    __syncthreads();
    for (int f = 0; f < kDFrags; ++f) wmma::load_matrix_sync(gf[f], kv + warp * kWarpRows * kLd + f * kFrag, kLd);
    FragAcc acc[kDFrags];
    for (int f = 0; f < kDFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);
    __syncthreads();

    // Lanes 2r and 2r + 1 own query row r of the warp, the even and the odd columns of a tile. Rows past
    // Lq have zero Q and dO, so their dS is zero.
    const int row = lane / 2, odd = lane % 2;
    const bool live = first_row + row < Lq;
    const float l_row = live ? lse[bh * Lq + first_row + row] : 0.0f;
    const float d_row = live ? delta[bh * Lq + first_row + row] : 0.0f;

    for (int64_t j0 = 0; j0 < Lk; j0 += kBlockN) {
      stage_rows<T, kBlockN, kDp, kLd>(ks, kb, j0, Lk, D, vec);
      stage_rows<T, kBlockN, kDp, kLd>(vs, vb, j0, Lk, D, vec);
      __syncthreads();
      const int valid = static_cast<int>(Lk - j0 < kBlockN ? Lk - j0 : kBlockN);
      float p[kFrag];

      // S = Q K^T, then P in registers.
      times_tile_transposed<T, kDFrags, kLd>(held(qf), ks, sw);
      __syncwarp();
      for (int c = 0; c < kFrag; ++c) {
        const int col = 2 * c + odd;
        p[c] = col < valid ? fast_exp(sw[row * kLdS + col] * scale - l_row) : 0.0f;
      }
      __syncwarp();  // S is read: the scratch takes dP

      // dP = dO V^T, then dS = P (dP - delta) * scale.
      times_tile_transposed<T, kDFrags, kLd>(held(gf), vs, sw);
      __syncwarp();
      for (int c = 0; c < kFrag; ++c) {
        const int col = 2 * c + odd;
        pw[row * kLdP + col] = from_float<T>(p[c] * (sw[row * kLdS + col] - d_row) * scale);
      }
      __syncwarp();

      // dQ += dS K.
      accumulate_times_tile<T, kDFrags, kLd>(acc, pw, ks);
      __syncthreads();  // every warp is done with this tile (and its dS) before the next
    }
    write_rows<T, kDFrags>(acc, sw, nullptr, dq + bh * Lq * D, first_row, Lq, D);
  } else {
    __trap();
  }
}

constexpr int kKvWarps = 2, kKvThreads = 32 * kKvWarps;  // dK/dV: 32 keys per block

// dK and dV, a block of 2 warps x 16 key rows: the block's keys and values stay in shared memory; per tile of 32
// queries (Q, dO, and their lse and delta staged) each warp computes S^T = K Q^T, P^T = exp(scale * S^T - lse)
// (kept in registers and written as T; queries past Lq get lse = +inf, so P = 0), dP^T = V dO^T,
// dS^T = P^T (dP^T - delta) * scale (written as T), then dV += P^T dO and dK += dS^T Q.
// Grid: (batch * heads, ceil(Lk / 32)).
template <typename T, int kDFrags>
__global__ void __launch_bounds__(kKvThreads)
    attention_dkdv_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const T* __restrict__ dout, const float* __restrict__ lse,
                             const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv, int64_t Lq,
                             int64_t Lk, int D, float scale, bool vec) {
  if constexpr (DCF_TC_ARCH >= kMinArch<T>) {
    constexpr int kDp = kDFrags * kFrag, kLd = kDp + kPad;
    constexpr int kKeys = kKvWarps * kWarpRows, kQueries = kBlockN;
    static_assert(kDFrags % 2 == 0, "accumulators pass through the 32-column scratch two at a time");
    static_assert(kQueries <= kKvThreads, "a thread per query stages lse and delta");
    static_assert(kQueries == kBlockN, "query tiles go through the key-tile products");

    __shared__ __align__(32) T kvs[2 * kKeys * kLd];     // keys (rows 0-31), values (rows 32-63)
    __shared__ __align__(32) T qgs[2 * kQueries * kLd];  // a query tile, its dO tile
    __shared__ __align__(32) float scratch[kKvWarps][kWarpRows * kLdS];
    __shared__ __align__(32) T pts[kKvWarps][kWarpRows * kLdP];  // P^T
    __shared__ __align__(32) T dts[kKvWarps][kWarpRows * kLdP];  // dS^T
    __shared__ float lse_s[kQueries], delta_s[kQueries];
    T* const ks = kvs;
    T* const vs = kvs + kKeys * kLd;
    T* const qs = qgs;
    T* const gs = qgs + kQueries * kLd;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t bh = blockIdx.x, n0 = static_cast<int64_t>(blockIdx.y) * kKeys;
    const int64_t first_row = n0 + warp * kWarpRows;
    const T* qb = q + bh * Lq * D;
    const T* gb = dout + bh * Lq * D;
    float* const sw = scratch[warp];
    T* const pw = pts[warp];
    T* const dw = dts[warp];
    const T* const kw = ks + warp * kWarpRows * kLd;
    const T* const vw = vs + warp * kWarpRows * kLd;

    stage_rows<T, kKeys, kDp, kLd, kKvThreads>(ks, k + bh * Lk * D, n0, Lk, D, vec);
    stage_rows<T, kKeys, kDp, kLd, kKvThreads>(vs, v + bh * Lk * D, n0, Lk, D, vec);
    FragAcc dk_acc[kDFrags], dv_acc[kDFrags];
    for (int f = 0; f < kDFrags; ++f) {
      wmma::fill_fragment(dk_acc[f], 0.0f);
      wmma::fill_fragment(dv_acc[f], 0.0f);
    }
    // Lanes 2r and 2r + 1 own key row r of the warp, the even and the odd query columns of a tile.
    const int row = lane / 2, odd = lane % 2;

    for (int64_t i0 = 0; i0 < Lq; i0 += kQueries) {
      stage_rows<T, kQueries, kDp, kLd, kKvThreads>(qs, qb, i0, Lq, D, vec);
      stage_rows<T, kQueries, kDp, kLd, kKvThreads>(gs, gb, i0, Lq, D, vec);
      if (threadIdx.x < kQueries) {
        const int64_t i = i0 + threadIdx.x;
        lse_s[threadIdx.x] = i < Lq ? lse[bh * Lq + i] : INFINITY;
        delta_s[threadIdx.x] = i < Lq ? delta[bh * Lq + i] : 0.0f;
      }
      __syncthreads();  // (the first time also the keys and values)
      float p[kFrag];

      // S^T = K Q^T, then P^T in registers and as T.
      times_tile_transposed<T, kDFrags, kLd>(staged<T, kLd>(kw), qs, sw);  // K, V: no registers left for them
      __syncwarp();
      for (int c = 0; c < kFrag; ++c) {
        const int col = 2 * c + odd;
        p[c] = fast_exp(sw[row * kLdS + col] * scale - lse_s[col]);
        pw[row * kLdP + col] = from_float<T>(p[c]);
      }
      __syncwarp();  // S^T is read: the scratch takes dP^T

      // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) * scale.
      times_tile_transposed<T, kDFrags, kLd>(staged<T, kLd>(vw), gs, sw);
      __syncwarp();
      for (int c = 0; c < kFrag; ++c) {
        const int col = 2 * c + odd;
        dw[row * kLdP + col] = from_float<T>(p[c] * (sw[row * kLdS + col] - delta_s[col]) * scale);
      }
      __syncwarp();

      // dV += P^T dO, dK += dS^T Q.
      accumulate_times_tile<T, kDFrags, kLd>(dv_acc, pw, gs);
      accumulate_times_tile<T, kDFrags, kLd>(dk_acc, dw, qs);
      __syncthreads();  // both warps are done with this query tile before the next
    }
    write_rows<T, kDFrags>(dk_acc, sw, nullptr, dk + bh * Lk * D, first_row, Lk, D);
    write_rows<T, kDFrags>(dv_acc, sw, nullptr, dv + bh * Lk * D, first_row, Lk, D);
  } else {
    __trap();
  }
}

// The kernels for one (T, head-dim fragments).
template <typename T, int kDFrags>
struct Kernels {
  static constexpr auto forward = attention_forward_tc_kernel<T, kDFrags>;
  static constexpr auto dq = attention_dq_tc_kernel<T, kDFrags>;
  static constexpr auto dkdv = attention_dkdv_tc_kernel<T, kDFrags>;
};

// Calls launch(Kernels<T, ...>{}) with the instantiation for head dim D.
template <typename T, typename Launch>
void dispatch(int64_t D, Launch&& launch) {
  const int frags = d_frags(D);
  if (frags == 2) {
    launch(Kernels<T, 2>{});
  } else if (frags == 4) {
    launch(Kernels<T, 4>{});
  } else {
    launch(Kernels<T, 8>{});
  }
}

}  // namespace attention
}  // namespace tc
}  // namespace denseclip_fast
