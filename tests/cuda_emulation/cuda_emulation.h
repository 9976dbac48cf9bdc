// Just enough of CUDA to run the kernels of csrc/cuda on the host, so that CI (no GPU) checks their indexing, tiling,
// bounds, synchronisation points and epilogues; the GPU tests check them on hardware.
//
// A launch runs the blocks one after another; a block runs as blockDim.x host threads that meet at a
// std::barrier in __syncthreads() and, per warp of 32, in __syncwarp(); __shfl_xor_sync exchanges through memory
// between two warp barriers. __shared__ variables are function-level statics: one copy, shared by the threads of
// the block running now. Device math (exp, log, sqrt, max, fmaxf) is the host's.
// nvcuda::wmma fragments hold their whole 16x16 tile in every lane (as float); loads and stores check what the
// WMMA API requires (256-bit aligned pointers, ldm a multiple of 16 bytes) and abort with a message if not; a store
// is written by lane 0 only, so a lane that reads it before __syncwarp() races, as on the GPU.
// __half is _Float16 (round to nearest even), __nv_bfloat16 the upper 16 bits of a float (round to nearest even).
#pragma once

#define DCF_CUDA_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>  // the float and double overloads of exp, log, sqrt at global scope, as CUDA's device math
#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
inline thread_local dim3 thread_idx;
inline dim3 block_idx, block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<double> shuffle_slots;  // one per thread: what it offers in __shfl_xor_sync

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// Runs kernel(args...) over grid with `threads` threads per block (a multiple of 32).
template <typename Kernel, typename... Args>
void launch(dim3 grid, unsigned threads, Kernel kernel, Args... args) {
  if (threads % 32 != 0) fail("launch: threads per block must be a multiple of 32 here");
  std::barrier<> block(threads);
  block_barrier = &block;
  block_dim = dim3{threads, 1, 1};
  grid_dim = grid;
  shuffle_slots.assign(threads, 0.0);
  warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3{t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            if (t == 0) block_idx = dim3{x, y, z};
            block.arrive_and_wait();  // every thread sees this block's index
            kernel(args...);
            block.arrive_and_wait();  // the block is done before the next one reuses the shared memory
          }
    });
  }
  for (auto& th : pool) th.join();
  block_barrier = nullptr;
}
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emu::warp_barriers[emu::thread_idx.x / 32]->arrive_and_wait(); }
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }

// The whole warp exchanges (every lane must call it, as the kernels here do with a full mask); float and double.
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float and double are emulated");
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only the full-warp mask is emulated");
  const unsigned t = emu::thread_idx.x, partner = (t & ~31u) | ((t % 32) ^ static_cast<unsigned>(lane_mask));
  emu::shuffle_slots[t] = static_cast<double>(value);
  __syncwarp();
  const T got = static_cast<T>(emu::shuffle_slots[partner]);
  __syncwarp();
  return got;
}

using std::max;  // CUDA's device max(float, float) and max(double, double)

struct __half {
  _Float16 x;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(h.x); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (inputs here are finite)
  return __nv_bfloat16{static_cast<std::uint16_t>(u >> 16)};
}
inline float to_float_any(float x) { return x; }
inline float to_float_any(__half x) { return __half2float(x); }
inline float to_float_any(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_float_any(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
// Any element type of the test programs (float, double, __half, __nv_bfloat16) from and to double.
template <typename T>
T from_double(double x) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<T>(x);
  else return from_float_any<T>(static_cast<float>(x));
}
template <typename T>
double as_double(T x) {
  if constexpr (std::is_floating_point_v<T>) return x;
  else return to_float_any(x);
}

namespace emu {
// For the test programs: argv[first .. first + count) as integers, or the usage line and exit 2.
inline std::vector<int64_t> int_args(int argc, char** argv, int first, int count, const char* usage) {
  if (argc != first + count) {
    std::fprintf(stderr, "usage: %s %s\n", argv[0], usage);
    std::exit(2);
  }
  std::vector<int64_t> values;
  for (int i = first; i < argc; ++i) values.push_back(std::stoll(argv[i]));
  return values;
}
}  // namespace emu

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];
};

template <typename T>
void check_access(const void* p, unsigned ldm, const char* op) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    std::fprintf(stderr, "%s: pointer %p is not 256-bit aligned\n", op, p);
    emu::fail("misaligned fragment");
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    std::fprintf(stderr, "%s: ldm %u is not a multiple of 16 bytes\n", op, ldm);
    emu::fail("bad ldm");
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  check_access<T>(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = to_float_any(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  check_access<float>(p, ldm, "load_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.x[i * N + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float value) {
  for (float& x : f.x) x = value;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float result[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      result[i * N + j] = s;
    }
  std::memcpy(d.x, result, sizeof result);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_access<float>(p, ldm, "store_matrix_sync");
  if (emu::thread_idx.x % 32 != 0) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * N + j];
}
}  // namespace wmma
}  // namespace nvcuda
