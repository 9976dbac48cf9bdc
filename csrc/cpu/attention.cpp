// CPU implementation of context_attention and its backward: softmax(q k^T / sqrt(D)) v.
//
// Both are ATen's CPU flash attention (at::_scaled_dot_product_flash_attention_for_cpu and its backward): blocked
// over queries and keys with an online softmax, vectorised for the CPU it runs on, the (batch, head, query-block)
// work spread over the OpenMP threads, float32 accumulation for float16/bfloat16 inputs; it returns the row
// log-sum-exp this operator's schema carries (natural log, float32, float64 for float64 inputs). It replaced a
// blockwise implementation over batched GEMMs here, which took 5.9 ms forward and 12.9 ms backward where this takes
// 4.8 and 11.2 (K150 x N1601, B2, 4 heads, 2 threads: benchmarks/results/ops_cpu_2threads*.md). This operator adds
// the checks with DenseCLIP's messages, contiguous outputs (what the fake kernels promise; ATen keeps the inputs'
// layout), the empty cases ATen's kernel does not take, and the autocast exclusion of the other operators.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common.h"

namespace denseclip_fast {
namespace {

// ATen's kernel reads and writes every tensor as if its last dimension had stride 1 (the public
// scaled_dot_product_attention makes sure of it before choosing this kernel; calling it directly, we must): a q
// transposed in its last two dimensions gave garbage, and so did an `out` of that kind in the backward.
at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// Whether the n elements at `data` (floating point of Bits' width, exponent bits `exponent`) hold a NaN or an
// infinity: an element is not finite exactly when its exponent bits are all set, that is when adding the lowest
// exponent bit to them carries into the bit above (the sign bit's place). And, add and or: one read of the data that
// the compiler vectorises, spread over the OpenMP threads. at::isfinite(q).all() and k's, with their temporaries,
// took about as long as ATen's kernel: the forward at B2, 4 heads, K150 x N257 took 1.38 ms, now 0.72 (SDPA 0.59),
// at N1601 6.0 ms, now 3.5 (SDPA 3.4); 2 threads, benchmarks/results/ops_cpu_2threads_finite_scan.md against
// ops_cpu_2threads_before_b8d4981.md.
template <typename Bits>
bool holds_non_finite(const void* data, int64_t n, Bits exponent) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  const Bits lowest = exponent & Bits(~exponent + 1);
  const Bits carries = at::parallel_reduce(
      int64_t{0}, n, int64_t{1} << 16, Bits{0},
      [&](int64_t begin, int64_t end, Bits acc) {
        for (int64_t i = begin; i < end; ++i) {
          Bits bits;
          std::memcpy(&bits, bytes + i * int64_t(sizeof(Bits)), sizeof(Bits));
          acc |= Bits((bits & exponent) + lowest);
        }
        return acc;
      },
      [](Bits a, Bits b) { return Bits(a | b); });
  return (carries & Bits(exponent + lowest)) != 0;
}

// A tensor whose elements fill its memory without gaps or overlaps (the decoder's q, k and v are transposed views of
// that kind) is read in memory order, as it lies: the answer does not depend on the order, and copying it
// contiguous first cost more than the read.
bool all_finite(const at::Tensor& x) {
  const at::Tensor c = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  const int64_t n = c.numel();
  switch (c.scalar_type()) {
    case at::kFloat: return !holds_non_finite<uint32_t>(c.const_data_ptr(), n, 0x7f800000u);
    case at::kDouble: return !holds_non_finite<uint64_t>(c.const_data_ptr(), n, 0x7ff0000000000000ull);
    case at::kHalf: return !holds_non_finite<uint16_t>(c.const_data_ptr(), n, uint16_t{0x7c00});
    case at::kBFloat16: return !holds_non_finite<uint16_t>(c.const_data_ptr(), n, uint16_t{0x7f80});
    default:  // unreachable: check_attention_inputs admits these four
      TORCH_INTERNAL_ASSERT(false, "all_finite: a ", c.scalar_type(), " tensor");
  }
}

std::tuple<at::Tensor, at::Tensor> context_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v) {
  const AttentionShape s = check_attention_inputs(q, k, v, "context_attention");
  if (s.B * s.heads * s.Lq == 0) {  // ATen's kernel divides by the number of query blocks (SIGFPE at Lq = 0)
    return {at::empty_like(q, at::MemoryFormat::Contiguous),
            at::empty({s.B, s.heads, s.Lq}, q.options().dtype(lse_type(q)))};
  }
  // ATen's kernel gives a query row whose scores are all NaN or all -inf the output 0 (its row maximum skips NaN,
  // and it guards a row maximum of -inf), where softmax(q k^T) v, the reference and the official decoder, gives NaN.
  // A q or k holding a NaN or an infinity (all_finite: one read of each) is computed as the reference writes
  // it, in the accumulation type; the log-sum-exp of a row whose softmax is NaN is NaN, so that ATen's backward,
  // which recomputes the probabilities from it, gives NaN gradients where the reference's are.
  if (!all_finite(q) || !all_finite(k)) {
    const at::ScalarType acc = lse_type(q);
    const at::Tensor scores = at::matmul(q.to(acc), k.to(acc).transpose(-2, -1)).mul_(1.0 / std::sqrt(double(s.D)));
    const at::Tensor probabilities = at::softmax(scores, -1);
    at::Tensor lse = at::logsumexp(scores, -1);
    lse.masked_fill_(at::isnan(probabilities).any(-1), std::numeric_limits<double>::quiet_NaN());
    return {at::matmul(probabilities, v.to(acc)).to(q.scalar_type()).contiguous(), lse.contiguous()};
  }
  auto [out, lse] =
      at::_scaled_dot_product_flash_attention_for_cpu(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v));
  return {out.contiguous(), lse.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  const BelowAutograd below_autograd;
  const AttentionShape s = check_attention_backward_inputs(grad_out, q, k, v, out, lse);
  if (s.B * s.heads * s.Lq == 0) {  // no query: nothing reaches k and v (and ATen's kernel would divide by zero)
    return {at::empty_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  }
  const auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      unit_last_stride(grad_out), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), unit_last_stride(out),
      lse.contiguous(), 0.0, false);
  return {dq.contiguous(), dk.contiguous(), dv.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(denseclip_fast, CPU, m) {
  m.impl("context_attention", &context_attention_cpu);
  m.impl("context_attention_backward", &context_attention_backward_cpu);
}

}  // namespace denseclip_fast
