// Runs the tensor-core visual backward of pixel_text_score (tc::score_backward_visual_tc_kernel in
// csrc/cuda/score_tc.cuh) under the CUDA emulation on one case, against float64 from the same 16-bit inputs (the
// normalised text t^ as the launcher passes it, rounded to the dtype), and prints one line of key=value pairs:
//   rel_err        |dv - ref| / |ref| over the pixels with a nonzero vector
//   zero_rel_err   the same over the zero pixel (image 0, pixel P/2), whose gradient is g^ / eps (where that
//                  exceeds the dtype's range, as in float16, the kernel must write inf of the same sign)
//   gs_rel_err     the G * scale / max(|v|, eps) the kernel writes for the text gradient, clamped to the dtype's
//                  range (the zero pixel's 1 / eps saturates it in float16), against float64 rounded to the dtype
//   nan_ok         1 when the pixel holding a NaN (the last pixel of the last image, channel 0, where P > 1 and
//                  C > 0) got NaN in every channel of dv and every class of the scaled G, as torch's clamp_min
//                  keeps NaN (else 0); 1 where no NaN is planted
//   untouched      1 when nothing past the two output buffers was written
//   vec            the access width tc::backward_vec chose (as the CUDA launcher does)
// G is read as a channel slice: channels [X, X + K) of a (B, X + K, P) buffer (score_concat's gradient), X >= 0.
// SCORE: 0 the kernel computes <v, g^> itself (no score map); 1 or 2 it gets the forward's output S = scale <v^, t^>
// (from float64, rounded to the dtype; NaN at the NaN pixel, 0 at the zero pixel) as channels [X, X + K) of a
// (B, X + K, P) buffer, like G, in NCHW (1) or NHWC (2) layout.
// Usage: score_tc_backward_main DTYPE(half|bf16) B C H W K NHWC(0|1) BATCHED_TEXT(0|1) X SCORE(0|1|2) SEED
#include "cuda_emulation.h"

#include "../../csrc/cuda/score_tc.cuh"

#include <algorithm>
#include <random>
#include <string>

namespace {

constexpr float kSentinel = 96.0f;
template <typename T>
constexpr double kMaxFinite = std::is_same_v<T, __half> ? 65504.0 : 3.3895313892515355e38;
constexpr int64_t kGuard = 64;

template <typename T>
int run(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, bool nhwc, bool batched, int64_t X, int score_mode,
        unsigned seed) {
  namespace tc = denseclip_fast::tc;
  const int64_t P = H * W, KT = batched ? B : 1;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  auto rounded = [&] { return to_float_any(from_float_any<T>(normal(rng))); };
  std::vector<float> vval(B * C * P), that(KT * K * C), gval(B * K * P);
  for (auto& x : vval) x = rounded();
  for (auto& x : gval) x = rounded();
  for (int64_t c = 0; c < C; ++c) vval[c * P + P / 2] = 0.0f;  // image 0, pixel P/2: a zero vector
  const bool nan_planted = P > 1 && C > 0;  // the last pixel of the last image, channel 0 (never the zero pixel)
  if (nan_planted) vval[((B - 1) * C + 0) * P + P - 1] = NAN;
  for (int64_t r = 0; r < KT * K; ++r) {  // t^: unit rows (as float32 on the host), then rounded to T
    std::vector<float> row(C);
    double n2 = 0;
    for (auto& x : row) {
      x = normal(rng);
      n2 += double(x) * x;
    }
    for (int64_t c = 0; c < C; ++c)
      that[r * C + c] = to_float_any(from_float_any<T>(static_cast<float>(row[c] / std::max(std::sqrt(n2), 1e-12))));
  }

  const int64_t s_vb = C * P, s_vc = nhwc ? 1 : P, s_vp = nhwc ? C : 1;
  std::vector<T> vbuf(B * C * P + kGuard), tbuf(that.size() + kGuard), gbuf(B * (X + K) * P + kGuard);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p)
        vbuf[b * s_vb + c * s_vc + p * s_vp] = from_float_any<T>(vval[(b * C + c) * P + p]);
  for (size_t i = 0; i < that.size(); ++i) tbuf[i] = from_float_any<T>(that[i]);
  for (auto& x : gbuf) x = from_float_any<T>(kSentinel);  // the other channels of the buffer: never read
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t p = 0; p < P; ++p) gbuf[(b * (X + K) + X + k) * P + p] = from_float_any<T>(gval[(b * K + k) * P + p]);
  const float scale = 0.5f;
  // The forward's output, as the kernel may read it: S[b, k, p] at b * s_sb + (X + k) * s_sk + p * s_sp, the other
  // channels of the buffer (sentinels) never read
  const int64_t s_sb = (X + K) * P, s_sk = score_mode == 2 ? 1 : P, s_sp = score_mode == 2 ? X + K : 1;
  std::vector<T> sbuf(B * (X + K) * P + kGuard, from_float_any<T>(kSentinel));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      double n2 = 0;
      for (int64_t c = 0; c < C; ++c) n2 += double(vval[(b * C + c) * P + p]) * vval[(b * C + c) * P + p];
      const double inv = 1.0 / std::max(std::sqrt(n2), 1e-12);
      for (int64_t k = 0; k < K; ++k) {
        double dot = 0;
        for (int64_t c = 0; c < C; ++c) {
          dot += double(that[((batched ? b : 0) * K + k) * C + c]) * vval[(b * C + c) * P + p];
        }
        sbuf[b * s_sb + (X + k) * s_sk + p * s_sp] = from_float_any<T>(static_cast<float>(scale * dot * inv));
      }
    }
  std::vector<T> gv(B * C * P + kGuard, from_float_any<T>(kSentinel));
  std::vector<T> gs(B * K * P + kGuard, from_float_any<T>(kSentinel));

  const dim3 grid{static_cast<unsigned>((P + tc::kTileP - 1) / tc::kTileP), static_cast<unsigned>(B), 1};
  const int64_t s_tb = batched ? K * C : 0;
  auto launch = [&](auto kernel) {
    emu::launch(grid, tc::kThreads, kernel, static_cast<const T*>(vbuf.data()), static_cast<const T*>(tbuf.data()),
                static_cast<const T*>(gbuf.data() + X * P), gv.data(), gs.data(), C, P, K, s_vb, s_vc, s_vp, s_tb,
                (X + K) * P, P, scale, score_mode ? static_cast<const T*>(sbuf.data() + X * s_sk) : nullptr, s_sb, s_sk,
                s_sp);
  };
  const bool vec = tc::backward_vec(C, nhwc, reinterpret_cast<std::uintptr_t>(vbuf.data()),
                                    reinterpret_cast<std::uintptr_t>(gv.data()));
  if (!nhwc) launch(tc::score_backward_visual_tc_kernel<T, false, false>);
  else if (vec) launch(tc::score_backward_visual_tc_kernel<T, true, true>);
  else launch(tc::score_backward_visual_tc_kernel<T, true, false>);

  double err2 = 0, ref2 = 0, zerr2 = 0, zref2 = 0, ierr2 = 0, iref2 = 0;
  bool nan_ok = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      if (nan_planted && b == B - 1 && p == P - 1) {
        for (int64_t c = 0; c < C; ++c) nan_ok &= std::isnan(to_float_any(gv[b * s_vb + c * s_vc + p * s_vp]));
        for (int64_t k = 0; k < K; ++k) nan_ok &= std::isnan(to_float_any(gs[(b * K + k) * P + p]));
        continue;
      }
      std::vector<double> gh(C);
      double n2 = 0, dot = 0;
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0;
        for (int64_t k = 0; k < K; ++k)
          sum += double(that[((batched ? b : 0) * K + k) * C + c]) * gval[(b * K + k) * P + p];
        gh[c] = scale * sum;
        const double x = vval[(b * C + c) * P + p];
        n2 += x * x;
        dot += x * gh[c];
      }
      const double norm = std::sqrt(n2), pinv = 1.0 / std::max(norm, 1e-12);
      const double radial = norm >= 1e-12 ? dot * pinv * pinv : 0.0;
      const bool zero = b == 0 && p == P / 2;
      for (int64_t c = 0; c < C; ++c) {
        const double ref = (gh[c] - vval[(b * C + c) * P + p] * radial) * pinv;
        const double got = to_float_any(gv[b * s_vb + c * s_vc + p * s_vp]);
        if (std::abs(ref) > kMaxFinite<T>) {  // float16 overflows on g^ / eps: the kernel must give inf, as a cast
          if (got != std::copysign(INFINITY, ref)) zerr2 = INFINITY;
          continue;
        }
        (zero ? zerr2 : err2) += (got - ref) * (got - ref);
        (zero ? zref2 : ref2) += ref * ref;
      }
      for (int64_t k = 0; k < K; ++k) {
        const double want = std::clamp(gval[(b * K + k) * P + p] * pinv * scale, -kMaxFinite<T>, kMaxFinite<T>);
        const double ref = to_float_any(from_float_any<T>(static_cast<float>(want)));  // what a correct kernel stores
        const double got = to_float_any(gs[(b * K + k) * P + p]);
        ierr2 += (got - ref) * (got - ref);
        iref2 += ref * ref;
      }
    }
  bool untouched = true;
  for (size_t i = B * C * P; i < gv.size(); ++i)
    if (to_float_any(gv[i]) != kSentinel) untouched = false;
  for (size_t i = B * K * P; i < gs.size(); ++i)
    if (to_float_any(gs[i]) != kSentinel) untouched = false;
  auto rel = [](double e2, double r2) { return std::sqrt(e2 / std::max(r2, 1e-300)); };
  std::printf("vec=%d rel_err=%.3e zero_rel_err=%.3e gs_rel_err=%.3e nan_ok=%d untouched=%d\n", vec ? 1 : 0,
              rel(err2, ref2), rel(zerr2, zref2), rel(ierr2, iref2), nan_ok ? 1 : 0, untouched ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int64_t> a = emu::int_args(argc, argv, 2, 10, "half|bf16 B C H W K NHWC BATCHED X SCORE SEED");
  const std::string dtype = argv[1];
  if (dtype == "half") return run<__half>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]);
  if (dtype == "bf16") return run<__nv_bfloat16>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]);
  std::fprintf(stderr, "dtype must be half or bf16, got %s\n", argv[1]);
  return 2;
}
