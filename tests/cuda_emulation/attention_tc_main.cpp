// Runs the tensor-core kernels of context_attention (csrc/cuda/attention_tc.cuh: forward, dQ, dK/dV) under the
// CUDA emulation on one case, in the instantiation the launcher (attention.cu) picks, against float64 on the same
// (rounded) inputs (attention_reference.h), and prints one line of key=value pairs: the relative errors of out,
// lse, dq, dk and dv, the kernels' head-dim fragments and load width, and untouched=1 when nothing past the outputs
// was written.
// Usage: attention_tc_main DTYPE(half|bf16) BH LQ LK D MISALIGN SEED   (MISALIGN 1: inputs one element off 16 bytes)
#include "cuda_emulation.h"

#include "../../csrc/cuda/attention_tc.cuh"
#include "attention_reference.h"

#include <random>
#include <string>

namespace {

constexpr int64_t kGuard = 64;
constexpr float kSentinel = 96.0f;

template <typename T>
int run(int64_t BH, int64_t Lq, int64_t Lk, int D, bool misalign, unsigned seed) {
  namespace ta = denseclip_fast::tc::attention;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const int64_t off = misalign ? 1 : 0;
  // Buffers start 32-byte aligned; `off` elements in, the kernel sees a pointer 2 bytes past 16-byte alignment.
  auto fill = [&](int64_t n) {
    std::vector<T> x(n + off + kGuard, from_float_any<T>(kSentinel));
    for (int64_t i = 0; i < n; ++i) x[off + i] = from_float_any<T>(normal(rng) * 2.0f);
    return x;
  };
  std::vector<T> q = fill(BH * Lq * D), k = fill(BH * Lk * D), v = fill(BH * Lk * D), g = fill(BH * Lq * D);
  std::vector<T> out(BH * Lq * D + kGuard, from_float_any<T>(kSentinel)), dq = out;
  std::vector<T> dk(BH * Lk * D + kGuard, from_float_any<T>(kSentinel)), dv = dk;
  std::vector<float> lse(BH * Lq + kGuard, kSentinel);
  const T *qp = q.data() + off, *kp = k.data() + off, *vp = v.data() + off, *gp = g.data() + off;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const bool vec = ta::use_vec(D, {qp, kp, vp, gp});  // as the backward's launcher (the forward's reads no dO)
  const dim3 grid{static_cast<unsigned>(BH), static_cast<unsigned>((Lq + ta::kBlockM - 1) / ta::kBlockM), 1};
  const int kv_rows = ta::kKvWarps * ta::kWarpRows;
  const dim3 grid_k{static_cast<unsigned>(BH), static_cast<unsigned>((Lk + kv_rows - 1) / kv_rows), 1};
  std::vector<float> delta(BH * Lq);  // rowsum(dO * O) from the kernel's O, as the launcher computes it with ATen
  ta::dispatch<T>(D, [&](auto kernels) {
    using K = decltype(kernels);
    emu::launch(grid, ta::kThreads, K::forward, qp, kp, vp, out.data(), lse.data(), Lq, Lk, D, scale, vec);
    for (int64_t i = 0; i < BH * Lq; ++i) {
      float dl = 0;
      for (int d = 0; d < D; ++d) dl += to_float_any(gp[i * D + d]) * to_float_any(out[i * D + d]);
      delta[i] = dl;
    }
    const float* lp = lse.data();
    const float* dp = delta.data();
    emu::launch(grid, ta::kThreads, K::dq, qp, kp, vp, gp, lp, dp, dq.data(), Lq, Lk, D, scale, vec);
    emu::launch(grid_k, ta::kKvThreads, K::dkdv, qp, kp, vp, gp, lp, dp, dk.data(), dv.data(), Lq, Lk, D, scale,
                vec);
  });

  // Gradients with a floor of 1 per element (dQ and dK vanish with one key), as tests/test_ops.py.
  const ref::Attention want = ref::attention(qp, kp, vp, gp, BH, Lq, Lk, D);
  bool untouched = ref::untouched_past(lse, BH * Lq, kSentinel);
  for (const auto* x : {&out, &dq}) untouched &= ref::untouched_past(*x, BH * Lq * D, kSentinel);
  for (const auto* x : {&dk, &dv}) untouched &= ref::untouched_past(*x, BH * Lk * D, kSentinel);
  std::printf("out=%.3e lse=%.3e dq=%.3e dk=%.3e dv=%.3e d_frags=%d vec=%d untouched=%d\n",
              ref::rel_err(out, want.out), ref::rel_err(lse, want.lse), ref::rel_err(dq, want.dq, 1.0),
              ref::rel_err(dk, want.dk, 1.0), ref::rel_err(dv, want.dv, 1.0), ta::d_frags(D), vec ? 1 : 0,
              untouched ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int64_t> a = emu::int_args(argc, argv, 2, 6, "half|bf16 BH LQ LK D MISALIGN SEED");
  const std::string dtype = argv[1];
  const int d = static_cast<int>(a[3]);
  const unsigned seed = static_cast<unsigned>(a[5]);
  if (dtype == "half") return run<__half>(a[0], a[1], a[2], d, a[4] != 0, seed);
  if (dtype == "bf16") return run<__nv_bfloat16>(a[0], a[1], a[2], d, a[4] != 0, seed);
  std::fprintf(stderr, "dtype must be half or bf16, got %s\n", argv[1]);
  return 2;
}
