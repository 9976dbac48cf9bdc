// Runs the tensor-core kernels of context_attention (csrc/cuda/attention_tc.cuh: forward, dQ, dK/dV) under the
// CUDA emulation on one case, in the instantiation the launcher (attention.cu) picks, against float64 on the same
// (rounded) inputs, and prints one line of key=value pairs: the relative errors of out, lse, dq, dk and dv, the
// kernels' head-dim fragments and load width, and untouched=1 when nothing past the outputs was written.
// Usage: attention_tc_main DTYPE(half|bf16) BH LQ LK D MISALIGN SEED   (MISALIGN 1: inputs one element off 16 bytes)
#include "cuda_emulation.h"

#include "../../csrc/cuda/attention_tc.cuh"

#include <algorithm>
#include <random>
#include <string>

namespace {

constexpr int64_t kGuard = 64;
constexpr float kSentinel = 96.0f;

// |got - want| / |want|; with floor > 0, |want| counts at least floor per element (gradients that are (nearly)
// zero, such as dQ and dK with one key, as in attention_main.cpp).
struct Err {
  double floor = 0, e2 = 0, r2 = 0, n = 0;
  void add(double got, double want) {
    e2 += (got - want) * (got - want);
    r2 += want * want;
    n += 1;
  }
  double rel() const { return std::sqrt(e2) / std::max({std::sqrt(r2), floor * std::sqrt(n), 1e-300}); }
};

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
  const bool vec = ta::use_vec(D, reinterpret_cast<std::uintptr_t>(qp), reinterpret_cast<std::uintptr_t>(kp),
                               reinterpret_cast<std::uintptr_t>(vp));
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

  // float64: P = softmax(scale Q K^T), O = P V, lse; dP = dO V^T, delta = rowsum(dO * O), dS = P (dP - delta),
  // dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
  const double sd = 1.0 / std::sqrt(static_cast<double>(D));
  auto f64 = [](T x) { return static_cast<double>(to_float_any(x)); };
  std::vector<double> ref_dq(BH * Lq * D, 0), ref_dk(BH * Lk * D, 0), ref_dv(BH * Lk * D, 0);
  Err e_out, e_lse, e_dq{1.0}, e_dk{1.0}, e_dv{1.0};
  for (int64_t b = 0; b < BH; ++b)
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t qi = (b * Lq + i) * D;
      std::vector<double> s(Lk), o(D, 0.0);
      double m = -INFINITY;
      for (int64_t j = 0; j < Lk; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += f64(qp[qi + d]) * f64(kp[(b * Lk + j) * D + d]);
        s[j] = dot * sd;
        m = std::max(m, s[j]);
      }
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      for (double& x : s) x /= l;  // P
      e_lse.add(lse[b * Lq + i], m + std::log(l));
      double dl = 0;
      for (int d = 0; d < D; ++d) {
        for (int64_t j = 0; j < Lk; ++j) o[d] += s[j] * f64(vp[(b * Lk + j) * D + d]);
        e_out.add(f64(out[qi + d]), o[d]);
        dl += f64(gp[qi + d]) * o[d];
      }
      for (int64_t j = 0; j < Lk; ++j) {
        double dpij = 0;
        for (int d = 0; d < D; ++d) dpij += f64(gp[qi + d]) * f64(vp[(b * Lk + j) * D + d]);
        const double ds = s[j] * (dpij - dl);
        for (int d = 0; d < D; ++d) {
          ref_dq[qi + d] += ds * f64(kp[(b * Lk + j) * D + d]) * sd;
          ref_dk[(b * Lk + j) * D + d] += ds * f64(qp[qi + d]) * sd;
          ref_dv[(b * Lk + j) * D + d] += s[j] * f64(gp[qi + d]);
        }
      }
    }
  for (size_t i = 0; i < ref_dq.size(); ++i) e_dq.add(f64(dq[i]), ref_dq[i]);
  for (size_t i = 0; i < ref_dk.size(); ++i) {
    e_dk.add(f64(dk[i]), ref_dk[i]);
    e_dv.add(f64(dv[i]), ref_dv[i]);
  }
  bool untouched = true;
  auto guarded = [&](const std::vector<T>& x, size_t n) {
    for (size_t i = n; i < x.size(); ++i) untouched &= to_float_any(x[i]) == kSentinel;
  };
  guarded(out, BH * Lq * D);
  guarded(dq, BH * Lq * D);
  guarded(dk, BH * Lk * D);
  guarded(dv, BH * Lk * D);
  for (size_t i = BH * Lq; i < lse.size(); ++i) untouched &= lse[i] == kSentinel;
  std::printf("out=%.3e lse=%.3e dq=%.3e dk=%.3e dv=%.3e d_frags=%d vec=%d untouched=%d\n", e_out.rel(),
              e_lse.rel(), e_dq.rel(), e_dk.rel(), e_dv.rel(), ta::d_frags(D), vec ? 1 : 0, untouched ? 1 : 0);
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
