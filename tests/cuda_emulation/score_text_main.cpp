// Runs the text kernels of pixel_text_score's tensor-core backward (text::text_normalize_kernel and
// text::text_grad_kernel in csrc/cuda/score_text.cuh) under the CUDA emulation on one case, against float64 from the
// same 16-bit text, and prints one line of key=value pairs:
//   norm        relative error of |t| per row
//   that32      relative error of t^ in float32
//   that        relative error of t^ in the dtype (what the tensor-core kernel reads)
//   grad        relative error of grad_t (from a random float32 g^_t (R, C), a sum of NB planes), rows past 1
//   clamped     the same over rows 0 and 1 (g / eps; where that passes float16's range the kernel must give inf)
//   untouched   1 when nothing past the four output buffers was written
// Row 0 is zero and row 1 shorter than eps (when R > 1): both follow F.normalize's clamp (g / eps, no projection).
// Usage: score_text_main DTYPE(half|bf16) R C NB SEED
#include "cuda_emulation.h"

#include "../../csrc/cuda/score_text.cuh"

#include <random>
#include <string>

namespace {

constexpr float kSentinel = 96.0f;
constexpr int64_t kGuard = 64;
template <typename T>
constexpr double kMaxFinite = std::is_same_v<T, __half> ? 65504.0 : 3.3895313892515355e38;

double rel(double e2, double r2) { return std::sqrt(e2 / std::max(r2, 1e-300)); }

template <typename T>
int run(int64_t R, int64_t C, int64_t NB, unsigned seed) {
  namespace text = denseclip_fast::text;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<T> t(R * C + kGuard);
  std::vector<double> tval(R * C);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float x = r == 0 ? 0.0f : r == 1 ? 1e-14f * normal(rng) : normal(rng);
      t[r * C + c] = from_float_any<T>(x);
      tval[r * C + c] = to_float_any(t[r * C + c]);
    }
  std::vector<float> gt(R * C, 0.0f);  // g^_t summed over NB planes (the launcher's ATen sum for shared text)
  for (int64_t nb = 0; nb < NB; ++nb)
    for (auto& x : gt) x += normal(rng);
  std::vector<float> that32(R * C + kGuard, kSentinel), norm(R + kGuard, kSentinel);
  std::vector<T> that(R * C + kGuard, from_float_any<T>(kSentinel)), out(R * C + kGuard, from_float_any<T>(kSentinel));

  const dim3 grid{static_cast<unsigned>((R + text::kWarps - 1) / text::kWarps), 1, 1};
  emu::launch(grid, text::kWarps * 32, text::text_normalize_kernel<T>, static_cast<const T*>(t.data()), that32.data(),
              that.data(), norm.data(), R, C);
  emu::launch(grid, text::kWarps * 32, text::text_grad_kernel<T>, static_cast<const float*>(gt.data()),
              static_cast<const float*>(that32.data()), static_cast<const float*>(norm.data()), out.data(), R, C);

  double n_e = 0, n_r = 0, h32_e = 0, h_e = 0, h_r = 0, g_e = 0, g_r = 0, c_e = 0, c_r = 0;
  for (int64_t r = 0; r < R; ++r) {
    double n2 = 0;
    for (int64_t c = 0; c < C; ++c) n2 += tval[r * C + c] * tval[r * C + c];
    const double n = std::sqrt(n2), inv = 1.0 / std::max(n, 1e-12);
    n_e += (norm[r] - n) * (norm[r] - n);
    n_r += n * n;
    std::vector<double> hat(C), g(C, 0.0);
    double dot = 0;
    for (int64_t c = 0; c < C; ++c) {
      hat[c] = tval[r * C + c] * inv;
      g[c] = gt[r * C + c];
      dot += hat[c] * g[c];
      h32_e += (that32[r * C + c] - hat[c]) * (that32[r * C + c] - hat[c]);
      const double h = to_float_any(that[r * C + c]);
      h_e += (h - hat[c]) * (h - hat[c]);
      h_r += hat[c] * hat[c];
    }
    const double radial = n >= 1e-12 ? dot : 0.0;
    const bool clamped = n < 1e-12;  // rows 0 and 1 (in float16 row 1 underflows to zero as well)
    for (int64_t c = 0; c < C; ++c) {
      const double want = (g[c] - hat[c] * radial) * inv, got = to_float_any(out[r * C + c]);
      if (std::abs(want) > kMaxFinite<T>) {  // g / eps past float16's range: the kernel must give inf, as a cast
        if (got != std::copysign(INFINITY, want)) c_e = INFINITY;
        continue;
      }
      (clamped ? c_e : g_e) += (got - want) * (got - want);
      (clamped ? c_r : g_r) += want * want;
    }
  }
  bool untouched = true;
  for (size_t i = R * C; i < that32.size(); ++i) untouched &= that32[i] == kSentinel;
  for (size_t i = R; i < norm.size(); ++i) untouched &= norm[i] == kSentinel;
  for (size_t i = R * C; i < that.size(); ++i) untouched &= to_float_any(that[i]) == kSentinel;
  for (size_t i = R * C; i < out.size(); ++i) untouched &= to_float_any(out[i]) == kSentinel;
  std::printf("norm=%.3e that32=%.3e that=%.3e grad=%.3e clamped=%.3e untouched=%d\n", rel(n_e, n_r),
              rel(h32_e, h_r), rel(h_e, h_r), rel(g_e, g_r), rel(c_e, c_r), untouched ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int64_t> a = emu::int_args(argc, argv, 2, 4, "half|bf16 R C NB SEED");
  const std::string dtype = argv[1];
  if (dtype == "half") return run<__half>(a[0], a[1], a[2], a[3]);
  if (dtype == "bf16") return run<__nv_bfloat16>(a[0], a[1], a[2], a[3]);
  std::fprintf(stderr, "dtype must be half or bf16, got %s\n", argv[1]);
  return 2;
}
