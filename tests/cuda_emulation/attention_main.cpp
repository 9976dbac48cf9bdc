// Runs the CUDA kernels of context_attention (csrc/cuda/attention_kernels.cuh: forward, dQ, dK/dV) under the CUDA
// emulation on one case, against float64, and prints one line of key=value pairs: the relative errors (see Err) of
// out, lse, dq, dk, dv, and untouched=1 when nothing past the outputs was written.
// Usage: attention_main DTYPE(float|double) BH LQ LK D SEED   (BH: batch x heads)
#include "cuda_emulation.h"

#include "../../csrc/cuda/attention_kernels.cuh"

#include <random>
#include <string>

namespace {

constexpr int64_t kGuard = 64;
constexpr double kSentinel = 96.0;

// |got - want| / max(|want|, sqrt(n)): relative, with a floor of 1 per element for results that are (nearly) zero,
// such as dQ and dK with one key (as tests/test_ops.py).
struct Err {
  double e2 = 0, r2 = 0, n = 0;
  void add(double got, double want) {
    e2 += (got - want) * (got - want);
    r2 += want * want;
    n += 1;
  }
  double rel() const { return std::sqrt(e2) / std::max(std::sqrt(r2), std::sqrt(n)); }
};

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

  // float64 reference: P = softmax(scale Q K^T), O = P V, lse; dP = dO V^T, delta = rowsum(dO * O) (from the
  // kernel's O, as the launcher computes it with ATen), dS = P (dP - delta), dQ = scale dS K, dK = scale dS^T Q,
  // dV = P^T dO.
  std::vector<T> delta(BH * Lq);
  Err e_out, e_lse, e_dq, e_dk, e_dv;
  std::vector<double> ref_dq(BH * Lq * D, 0), ref_dk(BH * Lk * D, 0), ref_dv(BH * Lk * D, 0);
  for (int64_t b = 0; b < BH; ++b)
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t qi = (b * Lq + i) * D;
      std::vector<double> s(Lk);
      double m = -INFINITY;
      for (int64_t j = 0; j < Lk; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += double(q[qi + d]) * double(k[(b * Lk + j) * D + d]);
        s[j] = dot / std::sqrt(static_cast<double>(D));
        m = std::max(m, s[j]);
      }
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      for (double& x : s) x /= l;  // P
      e_lse.add(double(lse[b * Lq + i]), m + std::log(l));
      double dl = 0;
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < Lk; ++j) o += s[j] * double(v[(b * Lk + j) * D + d]);
        e_out.add(double(out[qi + d]), o);
        dl += double(g[qi + d]) * double(out[qi + d]);
      }
      delta[b * Lq + i] = static_cast<T>(dl);
      for (int64_t j = 0; j < Lk; ++j) {
        double dp = 0;
        for (int d = 0; d < D; ++d) dp += double(g[qi + d]) * double(v[(b * Lk + j) * D + d]);
        const double ds = s[j] * (dp - double(delta[b * Lq + i]));
        for (int d = 0; d < D; ++d) {
          ref_dq[qi + d] += ds * double(k[(b * Lk + j) * D + d]) / std::sqrt(static_cast<double>(D));
          ref_dk[(b * Lk + j) * D + d] += ds * double(q[qi + d]) / std::sqrt(static_cast<double>(D));
          ref_dv[(b * Lk + j) * D + d] += s[j] * double(g[qi + d]);
        }
      }
    }
  emu::launch(grid_q, threads, at_::attention_dq_kernel<T, T>, q.data(), k.data(), v.data(), g.data(),
              static_cast<const T*>(lse.data()), static_cast<const T*>(delta.data()), dq.data(), Lq, Lk, D, scale);
  emu::launch(grid_k, threads, at_::attention_dkdv_kernel<T, T>, q.data(), k.data(), v.data(), g.data(),
              static_cast<const T*>(lse.data()), static_cast<const T*>(delta.data()), dk.data(), dv.data(), Lq, Lk,
              D, scale);
  for (size_t i = 0; i < ref_dq.size(); ++i) e_dq.add(double(dq[i]), ref_dq[i]);
  for (size_t i = 0; i < ref_dk.size(); ++i) {
    e_dk.add(double(dk[i]), ref_dk[i]);
    e_dv.add(double(dv[i]), ref_dv[i]);
  }
  bool untouched = true;
  auto guarded = [&](const std::vector<T>& x, size_t n) {
    for (size_t i = n; i < x.size(); ++i)
      if (x[i] != static_cast<T>(kSentinel)) untouched = false;
  };
  guarded(out, BH * Lq * D);
  guarded(dq, BH * Lq * D);
  guarded(dk, BH * Lk * D);
  guarded(dv, BH * Lk * D);
  guarded(lse, BH * Lq);
  std::printf("out=%.3e lse=%.3e dq=%.3e dk=%.3e dv=%.3e untouched=%d\n", e_out.rel(), e_lse.rel(), e_dq.rel(),
              e_dk.rel(), e_dv.rel(), untouched ? 1 : 0);
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
