// Runs the tensor-core forward of context_attention (csrc/cuda/attention_tc.cuh) under the CUDA emulation on one
// case, in the instantiation the launcher (attention.cu) picks, against float64 on the same (rounded) inputs, and
// prints one line of key=value pairs: the relative errors of out and lse, the kernel's head-dim fragments and load
// width, and untouched=1 when nothing past the outputs was written.
// Usage: attention_tc_main DTYPE(half|bf16) BH LQ LK D MISALIGN SEED   (MISALIGN 1: inputs one element off 16 bytes)
#include "cuda_emulation.h"

#include "../../csrc/cuda/attention_tc.cuh"

#include <random>
#include <string>

namespace {

constexpr int64_t kGuard = 64;
constexpr float kSentinel = 96.0f;

struct Err {
  double e2 = 0, r2 = 0;
  void add(double got, double want) {
    e2 += (got - want) * (got - want);
    r2 += want * want;
  }
  double rel() const { return std::sqrt(e2 / std::max(r2, 1e-300)); }
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
  std::vector<T> q = fill(BH * Lq * D), k = fill(BH * Lk * D), v = fill(BH * Lk * D);
  std::vector<T> out(BH * Lq * D + kGuard, from_float_any<T>(kSentinel));
  std::vector<float> lse(BH * Lq + kGuard, kSentinel);
  const T *qp = q.data() + off, *kp = k.data() + off, *vp = v.data() + off;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const bool vec = ta::use_vec(D, reinterpret_cast<std::uintptr_t>(qp), reinterpret_cast<std::uintptr_t>(kp),
                               reinterpret_cast<std::uintptr_t>(vp));
  const dim3 grid{static_cast<unsigned>(BH), static_cast<unsigned>((Lq + ta::kBlockM - 1) / ta::kBlockM), 1};
  ta::dispatch<T>(D, vec, [&](auto kernel) {
    emu::launch(grid, ta::kThreads, kernel, qp, kp, vp, out.data(), lse.data(), Lq, Lk, D, scale);
  });

  Err e_out, e_lse;
  for (int64_t b = 0; b < BH; ++b)
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t qi = (b * Lq + i) * D;
      std::vector<double> s(Lk);
      double m = -INFINITY;
      for (int64_t j = 0; j < Lk; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += to_float_any(qp[qi + d]) * double(to_float_any(kp[(b * Lk + j) * D + d]));
        s[j] = dot / std::sqrt(static_cast<double>(D));
        m = std::max(m, s[j]);
      }
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      e_lse.add(lse[b * Lq + i], m + std::log(l));
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < Lk; ++j) o += s[j] * to_float_any(vp[(b * Lk + j) * D + d]);
        e_out.add(to_float_any(out[qi + d]), o / l);
      }
    }
  bool untouched = true;
  for (size_t i = BH * Lq * D; i < out.size(); ++i) untouched &= to_float_any(out[i]) == kSentinel;
  for (size_t i = BH * Lq; i < lse.size(); ++i) untouched &= lse[i] == kSentinel;
  std::printf("out=%.3e lse=%.3e d_frags=%d vec=%d untouched=%d\n", e_out.rel(), e_lse.rel(), ta::d_frags(D),
              vec ? 1 : 0, untouched ? 1 : 0);
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
