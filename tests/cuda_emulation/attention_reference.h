// What the two attention programs share: the float64 reference of context_attention, forward and backward
// (attention_main.cpp checks the portable kernels against it, attention_tc_main.cpp the tensor-core ones), the
// error measure they report, and the check that nothing was written past an output.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda_emulation.h"

namespace ref {

// |got - want| / |want| over a tensor; with floor > 0, |want| counts at least floor per element (results that are
// (nearly) zero, such as dQ and dK with one key, as the absolute floor of tests/test_ops.py).
struct Err {
  double floor = 0, e2 = 0, r2 = 0, n = 0;
  void add(double got, double want) {
    e2 += (got - want) * (got - want);
    r2 += want * want;
    n += 1;
  }
  double rel() const { return std::sqrt(e2) / std::max({std::sqrt(r2), floor * std::sqrt(n), 1e-300}); }
};

struct Attention {
  std::vector<double> out, lse, dq, dk, dv;
};

// q, dO (BH, Lq, D) and k, v (BH, Lk, D), row-major, the first elements of the buffers: P = softmax(Q K^T / sqrt(D)),
// O = P V, lse = log-sum-exp of the scaled scores; dP = dO V^T, delta = rowsum(dO * O), dS = P (dP - delta),
// dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D), dV = P^T dO; in float64 from the inputs' values.
template <typename T>
Attention attention(const T* q, const T* k, const T* v, const T* g, int64_t BH, int64_t Lq, int64_t Lk, int D) {
  const double sd = 1.0 / std::sqrt(static_cast<double>(D));
  Attention r{std::vector<double>(BH * Lq * D, 0.0), std::vector<double>(BH * Lq, 0.0),
              std::vector<double>(BH * Lq * D, 0.0), std::vector<double>(BH * Lk * D, 0.0),
              std::vector<double>(BH * Lk * D, 0.0)};
  for (int64_t b = 0; b < BH; ++b)
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t qi = (b * Lq + i) * D;
      std::vector<double> p(Lk);
      double m = -INFINITY;
      for (int64_t j = 0; j < Lk; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += as_double(q[qi + d]) * as_double(k[(b * Lk + j) * D + d]);
        p[j] = dot * sd;
        m = std::max(m, p[j]);
      }
      double l = 0;
      for (double& x : p) l += (x = std::exp(x - m));
      for (double& x : p) x /= l;
      r.lse[b * Lq + i] = m + std::log(l);
      double delta = 0;
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < Lk; ++j) o += p[j] * as_double(v[(b * Lk + j) * D + d]);
        r.out[qi + d] = o;
        delta += as_double(g[qi + d]) * o;
      }
      for (int64_t j = 0; j < Lk; ++j) {
        double dp = 0;
        for (int d = 0; d < D; ++d) dp += as_double(g[qi + d]) * as_double(v[(b * Lk + j) * D + d]);
        const double ds = p[j] * (dp - delta);
        for (int d = 0; d < D; ++d) {
          r.dq[qi + d] += ds * as_double(k[(b * Lk + j) * D + d]) * sd;
          r.dk[(b * Lk + j) * D + d] += ds * as_double(q[qi + d]) * sd;
          r.dv[(b * Lk + j) * D + d] += p[j] * as_double(g[qi + d]);
        }
      }
    }
  return r;
}

// The error of the first want.size() elements of `got` against `want`.
template <typename T>
double rel_err(const std::vector<T>& got, const std::vector<double>& want, double floor = 0) {
  Err e{floor};
  for (size_t i = 0; i < want.size(); ++i) e.add(as_double(got[i]), want[i]);
  return e.rel();
}

// Whether every element of x from index n on still holds `sentinel`.
template <typename T>
bool untouched_past(const std::vector<T>& x, size_t n, double sentinel) {
  return std::all_of(x.begin() + n, x.end(), [&](const T& e) { return as_double(e) == sentinel; });
}

}  // namespace ref
