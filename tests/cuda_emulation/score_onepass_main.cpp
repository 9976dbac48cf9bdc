// Runs the one-pass tensor-core backward of pixel_text_score (onepass::pixel_coef_kernel, then
// onepass::onepass_kernel, csrc/cuda/score_backward_tc.cuh) under the CUDA emulation on one case, as score.cu
// launches them, sums the d t^ partials over the splits as the launcher does, and prints one line of key=value
// pairs, against float64 from the same 16-bit inputs:
//   splits           the number of splits the plan chose (onepass::plan; SPLITS > 0 forces it)
//   vec              the access width onepass::vec_access chose
//   rel_err          |dv - ref| / |ref| over the pixels with a nonzero vector (and no NaN)
//   zero_rel_err     the same over the zero pixel (image 0, pixel P/2), whose gradient is g^ / eps (where that
//                    exceeds the dtype's range, as in float16, the kernel must write inf of the same sign)
//   text_rel_err     d t^ = sum_p (G * scale / max(|v|, eps)) v_p^T (before the text Jacobian), ref with G * scale /
//                    max(|v|, eps) in float, clamped to the dtype's range and rounded to it (what the kernel
//                    multiplies);
//                    over the texts no NaN reaches
//   nan_ok           with NAN=1 (a NaN in channel 0 of the last pixel of the last image): every channel of that
//                    pixel's dv is NaN, and so is every element of the d t^ it reaches (its image's text, or the
//                    shared text); 1 where no NaN is planted
//   untouched        1 when nothing past dv was written
//   partial_written  1 when every element of the partials (splits x K_pad x C_pad per text) was written
// G is read as channels [X, X + K) of a (B, X + K, P) buffer (score_concat's gradient), the score map the same in
// NCHW (SMAP_NHWC=0) or NHWC (1) layout; the pixel norms are given in float32, as the forward writes them.
// Usage: score_onepass_main DTYPE(half|bf16) B C H W K NHWC(0|1) BATCHED_TEXT(0|1) X SMAP_NHWC(0|1) SPLITS NAN SEED
#include "cuda_emulation.h"

#include "../../csrc/cuda/score_backward_tc.cuh"

#include <algorithm>
#include <random>
#include <string>

namespace {

constexpr float kSentinel = 96.0f;
template <typename T>
constexpr double kMaxFinite = std::is_same_v<T, __half> ? 65504.0 : 3.3895313892515355e38;
constexpr int64_t kGuard = 64;

template <typename T>
int run(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, bool nhwc, bool batched, int64_t X, bool smap_nhwc,
        int64_t force_splits, bool plant_nan, unsigned seed) {
  namespace op = denseclip_fast::onepass;
  const int64_t P = H * W, KT = batched ? B : 1;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  auto rounded = [&] { return to_float_any(from_float_any<T>(normal(rng))); };
  std::vector<float> vval(B * C * P), that(KT * K * C), gval(B * K * P);
  for (auto& x : vval) x = rounded();
  for (auto& x : gval) x = rounded();
  for (int64_t c = 0; c < C; ++c) vval[c * P + P / 2] = 0.0f;  // image 0, pixel P/2: a zero vector
  const bool nan_planted = plant_nan && C > 0 && !(B == 1 && P / 2 == P - 1);
  if (nan_planted) vval[((B - 1) * C + 0) * P + P - 1] = NAN;
  for (int64_t r = 0; r < KT * K; ++r) {  // t^: unit rows, rounded to T (as text_normalize_kernel writes them)
    std::vector<double> row(C);
    double n2 = 0;
    for (auto& x : row) {
      x = normal(rng);
      n2 += x * x;
    }
    for (int64_t c = 0; c < C; ++c)
      that[r * C + c] = to_float_any(from_float_any<T>(static_cast<float>(row[c] / std::max(std::sqrt(n2), 1e-12))));
  }
  const float scale = 0.5f;
  const int64_t s_vb = C * P, s_vc = nhwc ? 1 : P, s_vp = nhwc ? C : 1;
  std::vector<T> vbuf(B * C * P + kGuard), tbuf(that.size() + kGuard);
  std::vector<T> gbuf(B * (X + K) * P + kGuard, from_float_any<T>(kSentinel));  // other channels never read
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) vbuf[b * s_vb + c * s_vc + p * s_vp] = from_float_any<T>(vval[(b * C + c) * P + p]);
  for (size_t i = 0; i < that.size(); ++i) tbuf[i] = from_float_any<T>(that[i]);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t p = 0; p < P; ++p) gbuf[(b * (X + K) + X + k) * P + p] = from_float_any<T>(gval[(b * K + k) * P + p]);
  // The forward's outputs: S (rounded to T, in its buffer's channels [X, X + K)) and |v| in float
  const int64_t s_sb = (X + K) * P, s_sk = smap_nhwc ? 1 : P, s_sp = smap_nhwc ? X + K : 1;
  std::vector<T> sbuf(B * (X + K) * P + kGuard, from_float_any<T>(kSentinel));
  std::vector<float> norm(B * P);
  std::vector<double> pinv(B * P);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      double n2 = 0;
      for (int64_t c = 0; c < C; ++c) n2 += double(vval[(b * C + c) * P + p]) * vval[(b * C + c) * P + p];
      norm[b * P + p] = static_cast<float>(std::sqrt(n2));
      pinv[b * P + p] = 1.0 / std::max(std::sqrt(n2), 1e-12);
      for (int64_t k = 0; k < K; ++k) {
        double dot = 0;
        for (int64_t c = 0; c < C; ++c) dot += double(that[((batched ? b : 0) * K + k) * C + c]) * vval[(b * C + c) * P + p];
        sbuf[b * s_sb + (X + k) * s_sk + p * s_sp] = from_float_any<T>(static_cast<float>(scale * dot * pinv[b * P + p]));
      }
    }

  // As score.cu: the coefficients, then the one-pass kernel over the plan's grid
  std::vector<float> coef(2 * B * P, kSentinel);
  emu::launch(dim3{static_cast<unsigned>((B * P + op::kCoefThreads - 1) / op::kCoefThreads), 1, 1}, op::kCoefThreads,
              op::pixel_coef_kernel<T>, static_cast<const T*>(gbuf.data() + X * P),
              static_cast<const T*>(sbuf.data() + X * s_sk), static_cast<const float*>(norm.data()), coef.data(), B,
              P, K, (X + K) * P, P, s_sb, s_sk, s_sp);
  const op::Plan plan = op::plan(B, C, P, K, batched, /*sm_count=*/4, force_splits);
  std::vector<T> gv(B * C * P + kGuard, from_float_any<T>(kSentinel));
  // the partials, 256-bit aligned as cudaMalloc's memory (the WMMA stores check it)
  const size_t partial_size = plan.z * plan.splits * plan.k_pad * plan.c_pad();
  std::vector<float> partial_buf(partial_size + 8, kSentinel);
  float* const partial = partial_buf.data() + (8 - reinterpret_cast<std::uintptr_t>(partial_buf.data()) % 32 / 4) % 8;
  const dim3 grid{static_cast<unsigned>(plan.c_blocks), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.z)};
  const bool vec = op::vec_access(C, nhwc, reinterpret_cast<std::uintptr_t>(vbuf.data()),
                                  reinterpret_cast<std::uintptr_t>(gv.data()));
  auto launch = [&](auto kernel) {
    emu::launch(grid, op::kThreads, kernel, static_cast<const T*>(vbuf.data()), static_cast<const T*>(tbuf.data()),
                static_cast<const T*>(gbuf.data() + X * P), static_cast<const float*>(coef.data()), gv.data(),
                partial, B, C, P, K, s_vb, s_vc, s_vp, batched ? K * C : int64_t{0}, (X + K) * P, P,
                plan.tiles_per_split, scale);
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

  double err2 = 0, ref2 = 0, zerr2 = 0, zref2 = 0, terr2 = 0, tref2 = 0;
  bool nan_ok = true;
  std::vector<double> tref(KT * K * C, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      if (nan_planted && b == B - 1 && p == P - 1) {
        for (int64_t c = 0; c < C; ++c) nan_ok &= std::isnan(to_float_any(gv[b * s_vb + c * s_vc + p * s_vp]));
        continue;
      }
      const double pi = pinv[b * P + p];
      const float inv_f = 1.0f / std::max(norm[b * P + p], 1e-12f);  // as the kernel: G * scale * inv in float
      std::vector<double> gh(C);
      double n2 = 0, dot = 0;
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += double(that[((batched ? b : 0) * K + k) * C + c]) * gval[(b * K + k) * P + p];
        gh[c] = scale * sum;
        const double x = vval[(b * C + c) * P + p];
        n2 += x * x;
        dot += x * gh[c];
      }
      const double radial = std::sqrt(n2) >= 1e-12 ? dot * pi * pi : 0.0;
      const bool zero = b == 0 && p == P / 2;
      for (int64_t c = 0; c < C; ++c) {
        const double ref = (gh[c] - vval[(b * C + c) * P + p] * radial) * pi;
        const double got = to_float_any(gv[b * s_vb + c * s_vc + p * s_vp]);
        if (std::abs(ref) > kMaxFinite<T>) {  // float16 overflows on g^ / eps: the kernel must give inf, as a cast
          if (got != std::copysign(INFINITY, ref)) zerr2 = INFINITY;
          continue;
        }
        (zero ? zerr2 : err2) += (got - ref) * (got - ref);
        (zero ? zref2 : ref2) += ref * ref;
      }
      for (int64_t k = 0; k < K; ++k) {
        const float lim = static_cast<float>(kMaxFinite<T>);
        const float gs = std::clamp(gval[(b * K + k) * P + p] * scale * inv_f, -lim, lim);
        const double gs_t = to_float_any(from_float_any<T>(gs));
        for (int64_t c = 0; c < C; ++c) tref[((batched ? b : 0) * K + k) * C + c] += gs_t * vval[(b * C + c) * P + p];
      }
    }
  for (int64_t z = 0; z < KT; ++z) {
    const bool reached = nan_planted && (!batched || z == B - 1);
    for (int64_t i = z * K * C; i < (z + 1) * K * C; ++i) {
      if (reached) {
        nan_ok &= std::isnan(dth[i]);
        continue;
      }
      terr2 += (dth[i] - tref[i]) * (dth[i] - tref[i]);
      tref2 += tref[i] * tref[i];
    }
  }
  bool untouched = true;
  for (size_t i = B * C * P; i < gv.size(); ++i)
    if (to_float_any(gv[i]) != kSentinel) untouched = false;
  auto rel = [](double e2, double r2) { return std::sqrt(e2 / std::max(r2, 1e-300)); };
  std::printf("splits=%lld vec=%d rel_err=%.3e zero_rel_err=%.3e text_rel_err=%.3e nan_ok=%d untouched=%d "
              "partial_written=%d\n",
              static_cast<long long>(plan.splits), vec ? 1 : 0, rel(err2, ref2), rel(zerr2, zref2), rel(terr2, tref2),
              nan_ok ? 1 : 0, untouched ? 1 : 0, partial_written ? 1 : 0);
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
