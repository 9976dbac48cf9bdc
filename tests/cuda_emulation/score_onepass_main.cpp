// Runs the one-pass tensor-core backward of pixel_text_score (onepass::pixel_coef_kernel, then
// onepass::onepass_kernel, csrc/cuda/score_backward_tc.cuh) under the CUDA emulation on one case, as score.cu
// launches them, sums the d t^ partials over the splits as the launcher does, and prints one line of key=value
// pairs, against float64 from the same 16-bit inputs:
//   splits           the number of splits the plan chose (onepass::plan; SPLITS > 0 forces it)
//   vec              the access width onepass::vec_access chose
//   rel_err          |dv - ref| / |ref| over the pixels with a nonzero vector (and no NaN)
//   zero_rel_err     the same over the zero pixel (image 0, pixel P/2), whose gradient is g^ / eps (where that
//                    exceeds the dtype's range, as in float16, the kernel must write inf of the same sign)
//   text_rel_err     d t^ = scale * sum_p G v^_p^T (before the text Jacobian; the launcher's scale applied to the
//                    summed partials), ref with v^ = v / max(|v|, eps) in float, rounded to the dtype (what the
//                    kernel multiplies); over the texts no NaN reaches
//   nan_ok           with NAN=1 (a NaN in channel 0 of the last pixel of the last image): every channel of that
//                    pixel's dv is NaN, and so is every element of the d t^ it reaches (its image's text, or the
//                    shared text); 1 where no NaN is planted
//   untouched        1 when nothing past dv was written
//   partial_written  1 when every element of the partials (splits x K_pad x C_pad per text) was written
// G is read as channels [X, X + K) of a (B, X + K, P) buffer (score_concat's gradient), the score map the same in
// NCHW (SMAP_NHWC=0) or NHWC (1) layout; the pixel norms are given in float32, as the forward writes them.
// Usage: score_onepass_main DTYPE(half|bf16) B C H W K NHWC(0|1) BATCHED_TEXT(0|1) X SMAP_NHWC(0|1) SPLITS NAN SEED
#include "score_backward_reference.h"

#include "../../csrc/cuda/score_backward_tc.cuh"

#include <string>

namespace {

template <typename T>
int run(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, bool nhwc, bool batched, int64_t X, bool smap_nhwc,
        int64_t force_splits, bool plant_nan, unsigned seed) {
  namespace op = denseclip_fast::onepass;
  using score_ref::kSentinel;
  const score_ref::BackwardCase<T> cs(B, C, H, W, K, nhwc, batched, X, smap_nhwc, plant_nan, seed);
  const int64_t P = cs.P, KT = batched ? B : 1;

  // As score.cu: the coefficients, then the one-pass kernel over the plan's grid
  std::vector<float> coef(2 * B * P, kSentinel);
  emu::launch(dim3{static_cast<unsigned>((B * P + op::kCoefThreads - 1) / op::kCoefThreads), 1, 1}, op::kCoefThreads,
              op::pixel_coef_kernel<T>, cs.g_data(), cs.map_data(), static_cast<const float*>(cs.norm.data()),
              coef.data(), B, P, K, (X + K) * P, P, cs.s_sb, cs.s_sk, cs.s_sp);
  const op::Plan plan = op::plan(B, C, P, K, batched, /*resident_blocks=*/8, force_splits);
  std::vector<T> gv(B * C * P + score_ref::kGuard, from_float_any<T>(kSentinel));
  // the partials, 256-bit aligned as cudaMalloc's memory (the WMMA stores check it)
  const size_t partial_size = plan.z * plan.splits * plan.k_pad * plan.c_pad();
  std::vector<float> partial_buf(partial_size + 8, kSentinel);
  float* const partial = partial_buf.data() + (8 - reinterpret_cast<std::uintptr_t>(partial_buf.data()) % 32 / 4) % 8;
  const dim3 grid{static_cast<unsigned>(plan.c_blocks), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.z)};
  const bool vec = op::vec_access(C, nhwc, reinterpret_cast<std::uintptr_t>(cs.vbuf.data()),
                                  reinterpret_cast<std::uintptr_t>(gv.data()));
  auto launch = [&](auto kernel) {
    emu::launch(grid, op::kThreads, kernel, static_cast<const T*>(cs.vbuf.data()),
                static_cast<const T*>(cs.tbuf.data()), cs.g_data(), static_cast<const float*>(coef.data()),
                gv.data(), partial, B, C, P, K, cs.s_vb, cs.s_vc, cs.s_vp, cs.s_tb(), (X + K) * P, P,
                plan.tiles_per_split, batched, cs.scale);
  };
  if (!nhwc) launch(op::onepass_kernel<T, false, false>);
  else if (vec) launch(op::onepass_kernel<T, true, true>);
  else launch(op::onepass_kernel<T, true, false>);

  bool partial_written = true;
  for (size_t i = 0; i < partial_size; ++i) partial_written &= partial[i] != kSentinel;
  // d t^ (KT, K, C): the partials summed over the splits, in double
  std::vector<double> dth(KT * K * C, 0.0);
  for (int64_t z = 0; z < KT; ++z)
    for (int64_t s = 0; s < plan.splits; ++s)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c)
          dth[(z * K + k) * C + c] += partial[((z * plan.splits + s) * plan.k_pad + k) * plan.c_pad() + c];
  for (double& x : dth) x *= cs.scale;  // as the launcher, after the sum
  // its reference: scale * sum over the pixels of G (v * inv, in float as the kernel, rounded to T)^T
  std::vector<double> tref(KT * K * C, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      if (cs.is_nan_pixel(b, p)) continue;
      const float inv = 1.0f / std::max(cs.norm[b * P + p], 1e-12f);
      for (int64_t c = 0; c < C; ++c) {
        const double v_hat = to_float_any(from_float_any<T>(static_cast<float>(cs.v(b, c, p)) * inv));
        for (int64_t k = 0; k < K; ++k) {
          tref[((batched ? b : 0) * K + k) * C + c] += static_cast<double>(cs.g(b, k, p)) * cs.scale * v_hat;
        }
      }
    }
  const score_ref::DvErrors dv = score_ref::dv_errors(cs, gv);
  bool nan_ok = dv.nan_ok;
  double terr2 = 0, tref2 = 0;
  for (int64_t z = 0; z < KT; ++z) {
    const bool reached = cs.nan_planted && (!batched || z == B - 1);
    for (int64_t i = z * K * C; i < (z + 1) * K * C; ++i) {
      if (reached) {
        nan_ok &= std::isnan(dth[i]);
        continue;
      }
      terr2 += (dth[i] - tref[i]) * (dth[i] - tref[i]);
      tref2 += tref[i] * tref[i];
    }
  }
  std::printf("splits=%lld vec=%d rel_err=%.3e zero_rel_err=%.3e text_rel_err=%.3e nan_ok=%d untouched=%d "
              "partial_written=%d\n",
              static_cast<long long>(plan.splits), vec ? 1 : 0, dv.rel, dv.zero_rel,
              std::sqrt(terr2 / std::max(tref2, 1e-300)), nan_ok ? 1 : 0,
              score_ref::untouched_past(gv, B * C * P) ? 1 : 0, partial_written ? 1 : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int64_t> a =
      emu::int_args(argc, argv, 2, 12, "half|bf16 B C H W K NHWC BATCHED X SMAP_NHWC SPLITS NAN SEED");
  const std::string dtype = argv[1];
  auto call = [&](auto tag) {
    using T = decltype(tag);
    return run<T>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], static_cast<unsigned>(a[11]));
  };
  if (dtype == "half") return call(__half{});
  if (dtype == "bf16") return call(__nv_bfloat16{});
  std::fprintf(stderr, "dtype must be half or bf16, got %s\n", argv[1]);
  return 2;
}
