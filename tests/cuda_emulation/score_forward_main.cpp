// Runs a forward kernel of pixel_text_score under the CUDA emulation on one case and prints what
// tests/test_cuda_emulation.py checks, as one line of key=value pairs. float16/bfloat16 run the tensor-core kernel
// (csrc/cuda/score_tc.cuh), float32/float64 the portable one (csrc/cuda/score_portable.cuh), as the CUDA launcher
// chooses on a GPU with tensor cores.
//   row_frags, vec       (tensor-core kernel only) the configuration tc::choose_config picked
//   rel_err              |out - ref| / |ref| over the scores, ref in double from the same inputs (rounded to DTYPE)
//   zeros_exact          1 when the zero pixel and the zero class score exactly 0
//   norm_err             max |norm - |v|| / max(|v|, 1) over the pixels: the pixel norms (B, P) the kernel writes
//                        (float, double for double), ref in double
//   untouched            1 when no element outside the scores (the feature channels of the concat view, the
//                        guard elements past the end of the scores and of the norms) was written
// Usage: score_forward_main DTYPE(half|bf16|float|double) B C H W K NHWC(0|1) BATCHED_TEXT(0|1) MISALIGN(0|1)
//        EXTRA_CHANNELS SMS SEED
// (MISALIGN: inputs one element past a 16-byte boundary; SMS: the multiprocessor count tc::choose_config is told)
#include "cuda_emulation.h"

#include "../../csrc/cuda/score_portable.cuh"
#include "../../csrc/cuda/score_tc.cuh"

#include <random>
#include <string>

namespace {

constexpr double kSentinel = 96.0;  // exact in every dtype; scores are at most |scale|
constexpr int64_t kGuard = 64;      // elements after each buffer that must stay untouched

template <typename T>
int run(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, bool nhwc, bool batched, bool misalign,
        int64_t extra, int sms, unsigned seed) {
  namespace tc = denseclip_fast::tc;
  namespace pt = denseclip_fast::portable;
  constexpr bool kTensorCores = !std::is_floating_point_v<T>;
  const int64_t P = H * W;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  // Values rounded to T once; the reference uses the rounded values in double.
  std::vector<double> vval(B * C * P), tval((batched ? B : 1) * K * C);
  for (auto& x : vval) x = as_double(from_double<T>(normal(rng)));
  for (auto& x : tval) x = as_double(from_double<T>(normal(rng)));
  for (int64_t c = 0; c < C; ++c) vval[c * P + P / 2] = 0.0;  // image 0, pixel P/2: a zero vector
  for (int64_t c = 0; c < C; ++c) tval[(K / 2) * C + c] = 0.0;  // class K/2 (of the first text): zero

  const int64_t off = misalign ? 1 : 0;
  std::vector<T> vbuf(off + B * C * P + kGuard), tbuf(off + tval.size() + kGuard);
  const int64_t s_vb = C * P, s_vc = nhwc ? 1 : P, s_vp = nhwc ? C : 1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p)
        vbuf[off + b * s_vb + c * s_vc + p * s_vp] = from_double<T>(vval[(b * C + c) * P + p]);
  for (size_t i = 0; i < tval.size(); ++i) tbuf[off + i] = from_double<T>(tval[i]);
  // Output: the score channels of a (B, EXTRA + K, H, W) tensor (score_concat's view), NCHW or NHWC like visual.
  const int64_t CO = extra + K;
  std::vector<T> obuf(B * CO * P + kGuard, from_double<T>(kSentinel));
  const int64_t s_ob = CO * P, s_ok = nhwc ? 1 : P, s_op = nhwc ? CO : 1;
  T* out = obuf.data() + extra * s_ok;
  using N = std::conditional_t<std::is_same_v<T, double>, double, float>;  // the norms' type: the accumulation's
  std::vector<N> nbuf(B * P + kGuard, static_cast<N>(kSentinel));
  N* norm = nbuf.data();

  const T* v = vbuf.data() + off;
  const T* t = tbuf.data() + off;
  const double scale = 0.5;
  const int64_t s_tb = batched ? K * C : 0;
  std::string config;
  if constexpr (kTensorCores) {
    const tc::Config cfg = tc::choose_config(B, C, P, K, nhwc, reinterpret_cast<std::uintptr_t>(v),
                                             reinterpret_cast<std::uintptr_t>(t), sms);
    const dim3 grid{static_cast<unsigned>((P + tc::kTileP - 1) / tc::kTileP),
                    static_cast<unsigned>((K + cfg.tile_k() - 1) / cfg.tile_k()), static_cast<unsigned>(B)};
    tc::dispatch<T>(cfg, nhwc, [&](auto kernel) {
      emu::launch(grid, tc::kThreads, kernel, v, t, out, norm, C, P, K, s_vb, s_vc, s_vp, s_tb, C, s_ob, s_ok, s_op,
                  static_cast<float>(scale));
    });
    config = "row_frags=" + std::to_string(cfg.row_frags) + " vec=" + std::to_string(cfg.vec ? 1 : 0) + " ";
  } else {
    const dim3 grid{static_cast<unsigned>((P + pt::kTileP - 1) / pt::kTileP),
                    static_cast<unsigned>((K + pt::kTileK - 1) / pt::kTileK), static_cast<unsigned>(B)};
    emu::launch(grid, pt::kThreads, pt::score_forward_kernel<T, T>, v, t, out, norm, C, P, K, s_vb, s_vc, s_vp, s_tb, C,
                s_ob, s_ok, s_op, static_cast<T>(scale));
  }

  double err2 = 0, ref2 = 0, norm_err = 0;
  bool zeros_exact = true, untouched = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      double vn = 0;
      for (int64_t c = 0; c < C; ++c) vn += vval[(b * C + c) * P + p] * vval[(b * C + c) * P + p];
      const double want = std::sqrt(vn);
      norm_err = std::max(norm_err, std::abs(static_cast<double>(norm[b * P + p]) - want) / std::max(want, 1.0));
    }
  for (int64_t i = B * P; i < static_cast<int64_t>(nbuf.size()); ++i)
    if (static_cast<double>(nbuf[i]) != kSentinel) untouched = false;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      const double* tk = tval.data() + (batched ? b * K : 0) * C + k * C;
      double tn = 0;
      for (int64_t c = 0; c < C; ++c) tn += tk[c] * tk[c];
      for (int64_t p = 0; p < P; ++p) {
        double dot = 0, vn = 0;
        for (int64_t c = 0; c < C; ++c) {
          const double x = vval[(b * C + c) * P + p];
          dot += x * tk[c];
          vn += x * x;
        }
        const double ref = scale * dot / (std::max(std::sqrt(tn), 1e-12) * std::max(std::sqrt(vn), 1e-12));
        const double got = as_double(out[b * s_ob + k * s_ok + p * s_op]);
        err2 += (got - ref) * (got - ref);
        ref2 += ref * ref;
        const bool zero_pair = (b == 0 && p == P / 2) || (k == K / 2 && (b == 0 || !batched));
        if (zero_pair && got != 0.0) zeros_exact = false;
      }
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < extra; ++c)
      for (int64_t p = 0; p < P; ++p)
        if (as_double(obuf[b * s_ob + c * s_ok + p * s_op]) != kSentinel) untouched = false;
  for (int64_t i = B * CO * P; i < static_cast<int64_t>(obuf.size()); ++i)
    if (as_double(obuf[i]) != kSentinel) untouched = false;
  std::printf("%srel_err=%.3e norm_err=%.3e zeros_exact=%d untouched=%d\n", config.c_str(),
              std::sqrt(err2 / std::max(ref2, 1e-300)), norm_err, zeros_exact ? 1 : 0, untouched ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int64_t> a =
      emu::int_args(argc, argv, 2, 11, "half|bf16|float|double B C H W K NHWC BATCHED MISALIGN EXTRA SMS SEED");
  const std::string dtype = argv[1];
  auto call = [&](auto tag) {
    using T = decltype(tag);
    return run<T>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], static_cast<int>(a[9]),
                  static_cast<unsigned>(a[10]));
  };
  if (dtype == "half") return call(__half{});
  if (dtype == "bf16") return call(__nv_bfloat16{});
  if (dtype == "float") return call(float{});
  if (dtype == "double") return call(double{});
  std::fprintf(stderr, "dtype must be half, bf16, float or double, got %s\n", argv[1]);
  return 2;
}
