// Runs the portable CUDA forward of pixel_text_score (csrc/cuda/score_portable.cuh) under the CUDA emulation on one
// case, against float64, and prints one line: rel_err, zeros_exact (the zero pixel and the zero class score exactly
// 0) and untouched (nothing outside the score channels of the (B, EXTRA + K, H, W) output was written).
// Usage: score_portable_main DTYPE(float|double) B C H W K NHWC(0|1) BATCHED_TEXT(0|1) EXTRA_CHANNELS SEED
#include "cuda_emulation.h"

#include "../../csrc/cuda/score_portable.cuh"

#include <random>
#include <string>

namespace {

constexpr int64_t kGuard = 64;
constexpr double kSentinel = 96.0;

template <typename T>
int run(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, bool nhwc, bool batched, int64_t extra, unsigned seed) {
  namespace pt = denseclip_fast::portable;
  const int64_t P = H * W, KT = batched ? B : 1;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> vval(B * C * P), tval(KT * K * C);
  for (auto& x : vval) x = static_cast<T>(normal(rng));
  for (auto& x : tval) x = static_cast<T>(normal(rng));
  for (int64_t c = 0; c < C; ++c) vval[c * P + P / 2] = 0;  // image 0, pixel P/2
  for (int64_t c = 0; c < C; ++c) tval[(K / 2) * C + c] = 0;  // class K/2 (of the first text)

  const int64_t s_vb = C * P, s_vc = nhwc ? 1 : P, s_vp = nhwc ? C : 1;
  std::vector<T> vbuf(B * C * P + kGuard), tbuf(tval.size() + kGuard);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) vbuf[b * s_vb + c * s_vc + p * s_vp] = static_cast<T>(vval[(b * C + c) * P + p]);
  for (size_t i = 0; i < tval.size(); ++i) tbuf[i] = static_cast<T>(tval[i]);
  const int64_t CO = extra + K, s_ob = CO * P, s_ok = nhwc ? 1 : P, s_op = nhwc ? CO : 1;
  std::vector<T> obuf(B * CO * P + kGuard, static_cast<T>(kSentinel));
  T* out = obuf.data() + extra * s_ok;
  const T scale = static_cast<T>(0.5);
  const dim3 grid{static_cast<unsigned>((P + pt::kTileP - 1) / pt::kTileP),
                  static_cast<unsigned>((K + pt::kTileK - 1) / pt::kTileK), static_cast<unsigned>(B)};
  emu::launch(grid, pt::kThreads, pt::score_forward_kernel<T, T>, static_cast<const T*>(vbuf.data()),
              static_cast<const T*>(tbuf.data()), out, C, P, K, s_vb, s_vc, s_vp, batched ? K * C : 0, C, s_ob, s_ok,
              s_op, scale);

  double err2 = 0, ref2 = 0;
  bool zeros_exact = true, untouched = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      const double* tk = tval.data() + ((batched ? b * K : 0) + k) * C;
      double tn = 0;
      for (int64_t c = 0; c < C; ++c) tn += tk[c] * tk[c];
      for (int64_t p = 0; p < P; ++p) {
        double dot = 0, vn = 0;
        for (int64_t c = 0; c < C; ++c) {
          const double x = vval[(b * C + c) * P + p];
          dot += x * tk[c];
          vn += x * x;
        }
        const double ref = 0.5 * dot / (std::max(std::sqrt(tn), 1e-12) * std::max(std::sqrt(vn), 1e-12));
        const double got = out[b * s_ob + k * s_ok + p * s_op];
        err2 += (got - ref) * (got - ref);
        ref2 += ref * ref;
        if (((b == 0 && p == P / 2) || (k == K / 2 && (b == 0 || !batched))) && got != 0.0) zeros_exact = false;
      }
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < extra; ++c)
      for (int64_t p = 0; p < P; ++p)
        if (obuf[b * s_ob + c * s_ok + p * s_op] != static_cast<T>(kSentinel)) untouched = false;
  for (size_t i = B * CO * P; i < obuf.size(); ++i)
    if (obuf[i] != static_cast<T>(kSentinel)) untouched = false;
  std::printf("rel_err=%.3e zeros_exact=%d untouched=%d\n", std::sqrt(err2 / std::max(ref2, 1e-300)),
              zeros_exact ? 1 : 0, untouched ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s float|double B C H W K NHWC BATCHED EXTRA SEED\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[1];
  int64_t a[9];
  for (int i = 0; i < 9; ++i) a[i] = std::stoll(argv[2 + i]);
  if (dtype == "float") return run<float>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
  if (dtype == "double") return run<double>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
  std::fprintf(stderr, "dtype must be float or double, got %s\n", argv[1]);
  return 2;
}
