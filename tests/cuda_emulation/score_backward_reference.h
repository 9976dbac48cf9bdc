// What the two programs of pixel_text_score's tensor-core backward share (score_tc_backward_main.cpp: the
// two-kernel visual backward of score_tc.cuh; score_onepass_main.cpp: the one-pass backward of
// score_backward_tc.cuh): a case's inputs, in the buffers the kernels read, and the float64 reference of dv.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_emulation.h"

namespace score_ref {

constexpr float kSentinel = 96.0f;  // fills what the kernels must neither read nor write
constexpr int64_t kGuard = 64;      // elements past each output that must stay untouched
template <typename T>
constexpr double kMaxFinite = std::is_same_v<T, __half> ? 65504.0 : 3.3895313892515355e38;

// One case: visual (B, C, P) with a zero pixel (image 0, pixel P/2) and, with plant_nan, a NaN in channel 0 of the
// last pixel of the last image (not where it would be the zero pixel); t^ unit rows, (K, C) or per image
// (B, K, C); G (B, K, P); all rounded to T, kept as floats (vval, that, gval) and in the kernels' buffers: visual
// in its layout (strides s_vb, s_vc, s_vp), t^ dense, G and the forward's map S = scale <v^, t^> (rounded to T) as
// channels [X, X + K) of (B, X + K, P) buffers (G with contiguous pixels, S NCHW or NHWC), and |v| in float.
template <typename T>
struct BackwardCase {
  int64_t B, C, P, K, X;
  bool nhwc, batched, nan_planted;
  float scale = 0.5f;
  std::vector<float> vval, that, gval, norm;
  std::vector<double> pinv;  // 1 / max(|v|, eps) per pixel, from float64
  std::vector<T> vbuf, tbuf, gbuf, sbuf;
  int64_t s_vb, s_vc, s_vp, s_sb, s_sk, s_sp;

  BackwardCase(int64_t B_, int64_t C_, int64_t H, int64_t W, int64_t K_, bool nhwc_, bool batched_, int64_t X_,
               bool map_nhwc, bool plant_nan, unsigned seed)
      : B(B_), C(C_), P(H * W), K(K_), X(X_), nhwc(nhwc_), batched(batched_),
        nan_planted(plant_nan && C_ > 0 && !(B_ == 1 && P / 2 == P - 1)) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    auto rounded = [&] { return to_float_any(from_float_any<T>(normal(rng))); };
    vval.resize(B * C * P);
    gval.resize(B * K * P);
    that.resize((batched ? B : 1) * K * C);
    for (auto& x : vval) x = rounded();
    for (auto& x : gval) x = rounded();
    for (int64_t c = 0; c < C; ++c) vval[c * P + P / 2] = 0.0f;
    if (nan_planted) vval[((B - 1) * C + 0) * P + P - 1] = NAN;
    for (int64_t r = 0; r < (batched ? B : 1) * K; ++r) {  // unit rows, as text_normalize_kernel writes t^
      std::vector<double> row(C);
      double n2 = 0;
      for (auto& x : row) {
        x = normal(rng);
        n2 += x * x;
      }
      for (int64_t c = 0; c < C; ++c)
        that[r * C + c] = to_float_any(from_float_any<T>(static_cast<float>(row[c] / std::max(std::sqrt(n2), 1e-12))));
    }
    s_vb = C * P, s_vc = nhwc ? 1 : P, s_vp = nhwc ? C : 1;
    vbuf.assign(B * C * P + kGuard, from_float_any<T>(kSentinel));
    tbuf.assign(that.size() + kGuard, from_float_any<T>(kSentinel));
    gbuf.assign(B * (X + K) * P + kGuard, from_float_any<T>(kSentinel));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) vbuf[b * s_vb + c * s_vc + p * s_vp] = from_float_any<T>(v(b, c, p));
    for (size_t i = 0; i < that.size(); ++i) tbuf[i] = from_float_any<T>(that[i]);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t p = 0; p < P; ++p) gbuf[(b * (X + K) + X + k) * P + p] = from_float_any<T>(g(b, k, p));
    s_sb = (X + K) * P, s_sk = map_nhwc ? 1 : P, s_sp = map_nhwc ? X + K : 1;
    sbuf.assign(B * (X + K) * P + kGuard, from_float_any<T>(kSentinel));
    norm.resize(B * P);
    pinv.resize(B * P);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < P; ++p) {
        double n2 = 0;
        for (int64_t c = 0; c < C; ++c) n2 += double(v(b, c, p)) * v(b, c, p);
        norm[b * P + p] = static_cast<float>(std::sqrt(n2));
        pinv[b * P + p] = 1.0 / std::max(std::sqrt(n2), 1e-12);
        for (int64_t k = 0; k < K; ++k) {
          double dot = 0;
          for (int64_t c = 0; c < C; ++c) dot += double(t(b, k, c)) * v(b, c, p);
          sbuf[b * s_sb + (X + k) * s_sk + p * s_sp] =
              from_float_any<T>(static_cast<float>(scale * dot * pinv[b * P + p]));
        }
      }
  }
  float v(int64_t b, int64_t c, int64_t p) const { return vval[(b * C + c) * P + p]; }
  float t(int64_t b, int64_t k, int64_t c) const { return that[((batched ? b : 0) * K + k) * C + c]; }
  float g(int64_t b, int64_t k, int64_t p) const { return gval[(b * K + k) * P + p]; }
  bool is_nan_pixel(int64_t b, int64_t p) const { return nan_planted && b == B - 1 && p == P - 1; }
  const T* g_data() const { return gbuf.data() + X * P; }  // G[b, k, p] at b * (X + K) * P + k * P + p
  const T* map_data() const { return sbuf.data() + X * s_sk; }
  int64_t s_tb() const { return batched ? K * C : 0; }
};

// dv against float64 (g^ = scale t^^T G; dv = (g^ - v <v, g^> / max(|v|, eps)^2) / max(|v|, eps), the radial term
// only where |v| >= eps), as |dv - ref| / |ref| over the pixels with a nonzero vector (rel) and over the zero pixel
// (zero_rel: where |ref| exceeds T's range, as g^ / eps does in float16, dv must be inf of the same sign); nan_ok:
// the NaN pixel's dv is NaN in every channel.
struct DvErrors {
  double rel, zero_rel;
  bool nan_ok;
};

template <typename T>
DvErrors dv_errors(const BackwardCase<T>& cs, const std::vector<T>& gv) {
  double err2 = 0, ref2 = 0, zerr2 = 0, zref2 = 0;
  bool nan_ok = true;
  for (int64_t b = 0; b < cs.B; ++b)
    for (int64_t p = 0; p < cs.P; ++p) {
      auto got = [&](int64_t c) { return double(to_float_any(gv[b * cs.s_vb + c * cs.s_vc + p * cs.s_vp])); };
      if (cs.is_nan_pixel(b, p)) {
        for (int64_t c = 0; c < cs.C; ++c) nan_ok &= std::isnan(got(c));
        continue;
      }
      std::vector<double> gh(cs.C);
      double n2 = 0, dot = 0;
      for (int64_t c = 0; c < cs.C; ++c) {
        double sum = 0;
        for (int64_t k = 0; k < cs.K; ++k) sum += double(cs.t(b, k, c)) * cs.g(b, k, p);
        gh[c] = cs.scale * sum;
        n2 += double(cs.v(b, c, p)) * cs.v(b, c, p);
        dot += cs.v(b, c, p) * gh[c];
      }
      const double pinv = cs.pinv[b * cs.P + p], radial = std::sqrt(n2) >= 1e-12 ? dot * pinv * pinv : 0.0;
      const bool zero = b == 0 && p == cs.P / 2;
      for (int64_t c = 0; c < cs.C; ++c) {
        const double ref = (gh[c] - cs.v(b, c, p) * radial) * pinv;
        if (std::abs(ref) > kMaxFinite<T>) {
          if (got(c) != std::copysign(INFINITY, ref)) zerr2 = INFINITY;
          continue;
        }
        (zero ? zerr2 : err2) += (got(c) - ref) * (got(c) - ref);
        (zero ? zref2 : ref2) += ref * ref;
      }
    }
  auto rel = [](double e2, double r2) { return std::sqrt(e2 / std::max(r2, 1e-300)); };
  return {rel(err2, ref2), rel(zerr2, zref2), nan_ok};
}

// Whether nothing past the first n elements of buf was written.
template <typename T>
bool untouched_past(const std::vector<T>& buf, int64_t n) {
  for (size_t i = n; i < buf.size(); ++i)
    if (double(to_float_any(buf[i])) != kSentinel) return false;
  return true;
}

}  // namespace score_ref
