// Runs the tensor-core visual backward of pixel_text_score (tc::score_backward_visual_tc_kernel in
// csrc/cuda/score_tc.cuh) under the CUDA emulation on one case, against float64 from the same 16-bit inputs (the
// normalised text t^ as the launcher passes it, rounded to the dtype), and prints one line of key=value pairs:
//   rel_err        |dv - ref| / |ref| over the pixels with a nonzero vector
//   zero_rel_err   the same over the zero pixel (image 0, pixel P/2), whose gradient is g^ / eps (where that
//                  exceeds the dtype's range, as in float16, the kernel must write inf of the same sign)
//   inv_rel_err    the 1 / max(|v|, eps) the kernel writes per pixel for the text gradient (float32), against
//                  float64 (the zero pixel's is 1 / eps)
//   nan_ok         1 when the pixel holding a NaN (the last pixel of the last image, channel 0, where C > 0 and it
//                  is not the zero pixel) got NaN in every channel of dv and as its 1 / max(|v|, eps), as torch's
//                  clamp_min keeps NaN (else 0); 1 where no NaN is planted
//   untouched      1 when nothing past the two output buffers was written
//   vec            the access width tc::backward_vec chose (as the CUDA launcher does)
// G is read as a channel slice: channels [X, X + K) of a (B, X + K, P) buffer (score_concat's gradient), X >= 0.
// SCORE: 0 the kernel computes <v, g^> itself (no score map); 1 or 2 it gets the forward's output S = scale <v^, t^>
// (from float64, rounded to the dtype; NaN at the NaN pixel, 0 at the zero pixel) as channels [X, X + K) of a
// (B, X + K, P) buffer, like G, in NCHW (1) or NHWC (2) layout.
// Usage: score_tc_backward_main DTYPE(half|bf16) B C H W K NHWC(0|1) BATCHED_TEXT(0|1) X SCORE(0|1|2) SEED
#include "score_backward_reference.h"

#include "../../csrc/cuda/score_tc.cuh"

#include <string>

namespace {

template <typename T>
int run(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, bool nhwc, bool batched, int64_t X, int score_mode,
        unsigned seed) {
  namespace tc = denseclip_fast::tc;
  using score_ref::kSentinel;
  const score_ref::BackwardCase<T> cs(B, C, H, W, K, nhwc, batched, X, score_mode == 2, /*plant_nan=*/true, seed);
  const int64_t P = cs.P;
  std::vector<T> gv(B * C * P + score_ref::kGuard, from_float_any<T>(kSentinel));
  std::vector<float> inv(B * P + score_ref::kGuard, kSentinel);

  const dim3 grid{static_cast<unsigned>((P + tc::kTileP - 1) / tc::kTileP), static_cast<unsigned>(B), 1};
  auto launch = [&](auto kernel) {
    emu::launch(grid, tc::kThreads, kernel, static_cast<const T*>(cs.vbuf.data()),
                static_cast<const T*>(cs.tbuf.data()), cs.g_data(), gv.data(), inv.data(), C, P, K, cs.s_vb, cs.s_vc,
                cs.s_vp, cs.s_tb(), (X + K) * P, P, cs.scale, score_mode ? cs.map_data() : nullptr, cs.s_sb,
                cs.s_sk, cs.s_sp);
  };
  const bool vec = tc::backward_vec(C, nhwc, reinterpret_cast<std::uintptr_t>(cs.vbuf.data()),
                                    reinterpret_cast<std::uintptr_t>(gv.data()));
  if (!nhwc) launch(tc::score_backward_visual_tc_kernel<T, false, false>);
  else if (vec) launch(tc::score_backward_visual_tc_kernel<T, true, true>);
  else launch(tc::score_backward_visual_tc_kernel<T, true, false>);

  const score_ref::DvErrors dv = score_ref::dv_errors(cs, gv);
  double ierr2 = 0, iref2 = 0;
  bool nan_ok = dv.nan_ok;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const double got = inv[b * P + p];
      if (cs.is_nan_pixel(b, p)) {
        nan_ok &= std::isnan(got);
        continue;
      }
      const double ref = cs.pinv[b * P + p];
      ierr2 += (got - ref) * (got - ref) / (ref * ref);  // relative per pixel: the zero pixel's is 1e12
      iref2 += 1.0;
    }
  bool untouched = score_ref::untouched_past(gv, B * C * P);
  for (size_t i = B * P; i < inv.size(); ++i) untouched &= inv[i] == kSentinel;
  std::printf("vec=%d rel_err=%.3e zero_rel_err=%.3e inv_rel_err=%.3e nan_ok=%d untouched=%d\n", vec ? 1 : 0, dv.rel,
              dv.zero_rel, std::sqrt(ierr2 / std::max(iref2, 1e-300)), nan_ok ? 1 : 0, untouched ? 1 : 0);
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
