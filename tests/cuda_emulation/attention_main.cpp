// Runs the CUDA kernels of context_attention (csrc/cuda/attention_kernels.cuh: forward, dQ, dK/dV) under the CUDA
// emulation on one case, against float64 (attention_reference.h), and prints one line of key=value pairs: the
// relative errors (see ref::Err) of out, lse, dq, dk, dv, and untouched=1 when nothing past the outputs was written.
// Usage: attention_main DTYPE(float|double) BH LQ LK D SEED   (BH: batch x heads)
#include "cuda_emulation.h"

#include "../../csrc/cuda/attention_kernels.cuh"
#include "attention_reference.h"

#include <random>
#include <string>

namespace {

constexpr int64_t kGuard = 64;
constexpr double kSentinel = 96.0;

template <typename T>
int run(int64_t BH, int64_t Lq, int64_t Lk, int D, unsigned seed) {
  namespace at_ = denseclip_fast::attn;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  auto fill = [&](int64_t n) {
    std::vector<T> x(n + kGuard, static_cast<T>(kSentinel));
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(normal(rng));
    return x;
  };
  const std::vector<T> q = fill(BH * Lq * D), k = fill(BH * Lk * D), v = fill(BH * Lk * D), g = fill(BH * Lq * D);
  std::vector<T> out(BH * Lq * D + kGuard, static_cast<T>(kSentinel)), dq = out;
  std::vector<T> dk(BH * Lk * D + kGuard, static_cast<T>(kSentinel)), dv = dk;
  std::vector<T> lse(BH * Lq + kGuard, static_cast<T>(kSentinel));
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
  const unsigned threads = at_::kWarps * 32;
  const dim3 grid_q{static_cast<unsigned>(BH), static_cast<unsigned>((Lq + at_::kWarps - 1) / at_::kWarps), 1};
  const dim3 grid_k{static_cast<unsigned>(BH), static_cast<unsigned>((Lk + at_::kWarps - 1) / at_::kWarps), 1};
  emu::launch(grid_q, threads, at_::attention_forward_kernel<T, T>, q.data(), k.data(), v.data(), out.data(),
              lse.data(), Lq, Lk, D, scale);
  std::vector<T> delta(BH * Lq);  // rowsum(dO * O) from the kernel's O, as the launcher computes it with ATen
  for (int64_t i = 0; i < BH * Lq; ++i) {
    double dl = 0;
    for (int d = 0; d < D; ++d) dl += double(g[i * D + d]) * double(out[i * D + d]);
    delta[i] = static_cast<T>(dl);
  }
  emu::launch(grid_q, threads, at_::attention_dq_kernel<T, T>, q.data(), k.data(), v.data(), g.data(),
              static_cast<const T*>(lse.data()), static_cast<const T*>(delta.data()), dq.data(), Lq, Lk, D, scale);
  emu::launch(grid_k, threads, at_::attention_dkdv_kernel<T, T>, q.data(), k.data(), v.data(), g.data(),
              static_cast<const T*>(lse.data()), static_cast<const T*>(delta.data()), dk.data(), dv.data(), Lq, Lk,
              D, scale);

  // Errors with a floor of 1 per element (dQ and dK vanish with one key), as tests/test_ops.py.
  const ref::Attention want = ref::attention(q.data(), k.data(), v.data(), g.data(), BH, Lq, Lk, D);
  bool untouched = ref::untouched_past(lse, BH * Lq, kSentinel);
  for (const auto* x : {&out, &dq}) untouched &= ref::untouched_past(*x, BH * Lq * D, kSentinel);
  for (const auto* x : {&dk, &dv}) untouched &= ref::untouched_past(*x, BH * Lk * D, kSentinel);
  std::printf("out=%.3e lse=%.3e dq=%.3e dk=%.3e dv=%.3e untouched=%d\n", ref::rel_err(out, want.out, 1.0),
              ref::rel_err(lse, want.lse, 1.0), ref::rel_err(dq, want.dq, 1.0), ref::rel_err(dk, want.dk, 1.0),
              ref::rel_err(dv, want.dv, 1.0), untouched ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int64_t> a = emu::int_args(argc, argv, 2, 5, "float|double BH LQ LK D SEED");
  const std::string dtype = argv[1];
  const int d = static_cast<int>(a[3]);
  const unsigned seed = static_cast<unsigned>(a[4]);
  if (dtype == "float") return run<float>(a[0], a[1], a[2], d, seed);
  if (dtype == "double") return run<double>(a[0], a[1], a[2], d, seed);
  std::fprintf(stderr, "dtype must be float or double, got %s\n", argv[1]);
  return 2;
}
