// The engine's label maps on a CPU: the bilinear resize of (N, K, h, w) float32 scores to (H, W) and the argmax over
// the K classes in one pass, without the (N, K, H, W) resized scores in memory (denseclip_fast.engine.segmenter's
// labels; a photo's 150 planes at its size are gigabytes, whose writing and reading took most of predict's time).
//
// The values are ATen's CPU bilinear resize (align_corners=False, sizes given, no scale factors) bit for bit, as its
// generic kernel computes a single-channel plane of a large output: per axis, scale = in / out and
// src = fma(scale, dst + 0.5, -0.5) clamped at 0, index floor(src) (and the next one but at the edge), lambda1 =
// src - index clamped to [0, 1], lambda0 = 1 - lambda1 (an axis of the same size: the identity, lambda 1 and 0); a
// value, height outer: fma(fma(a, w0, b * w1), h0, fma(c, w0, d * w1) * h1). Its additions are single products and
// fused multiply-adds, so the separable order here (each source row resized along the width once, kept for the
// output rows that read it) rounds exactly as ATen's per-pixel one. The engine uses these kernels only where
// denseclip_fast_engine::resize_bilinear equals F.interpolate on a probe (a torch whose kernel rounds otherwise
// keeps the resize-then-argmax path); tests/test_cpu_labels.py checks odd shapes, non-finite values and ties.
//
// The argmax keeps the first class of a tie and lets a NaN win (the first NaN stays), as torch.argmax: a class
// replaces the best so far when not (value <= best) and the best is not NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace denseclip_fast {
namespace {

// One axis of the resize: for each output index, the two source indices and their weights.
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

Axis make_axis(int64_t in, int64_t out) {
  Axis a;
  a.i0.resize(out);
  a.i1.resize(out);
  a.l0.resize(out);
  a.l1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    if (in == out) {
      a.i0[d] = a.i1[d] = d;
      a.l0[d] = 1.f;
      a.l1[d] = 0.f;
      continue;
    }
    float src = std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f);
    if (src < 0.f) src = 0.f;
    const int64_t i = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const float l1 = std::min(std::max(src - static_cast<float>(i), 0.f), 1.f);
    a.i0[d] = i;
    a.i1[d] = i + (i < in - 1 ? 1 : 0);
    a.l1[d] = l1;
    a.l0[d] = 1.f - l1;
  }
  return a;
}

// The hot loops, written once and compiled three times on x86-64: for CPUs with AVX-512, for those with AVX2 and FMA
// (a fused multiply-add instruction, vectorised), and for any other (std::fma through the C library: the same
// values, slower). Function attributes, not "#pragma GCC target", which clang ignores.
#define DCF_ROW_LOOPS(SUFFIX, ATTRIBUTES)                                                                          \
  /* a source row resized along the width: out[j] = fma(row[i0[j]], l0[j], row[i1[j]] * l1[j]) */                 \
  ATTRIBUTES static void resize_row##SUFFIX(const float* __restrict row, const int64_t* __restrict i0,             \
                                            const int64_t* __restrict i1, const float* __restrict l0,             \
                                            const float* __restrict l1, float* __restrict out, int64_t n) {       \
    for (int64_t j = 0; j < n; ++j) out[j] = std::fma(row[i0[j]], l0[j], row[i1[j]] * l1[j]);                     \
  }                                                                                                                \
  /* two width-resized rows combined along the height: out[j] = fma(t0[j], h0, t1[j] * h1) */                      \
  ATTRIBUTES static void combine##SUFFIX(const float* __restrict t0, const float* __restrict t1, float h0,        \
                                         float h1, float* __restrict out, int64_t n) {                             \
    for (int64_t j = 0; j < n; ++j) out[j] = std::fma(t0[j], h0, t1[j] * h1);                                      \
  }                                                                                                                \
  /* the same, each value offered to the running argmax of its pixel as class k */                                \
  ATTRIBUTES static void combine_max##SUFFIX(const float* __restrict t0, const float* __restrict t1, float h0,    \
                                             float h1, float* __restrict best, int64_t* __restrict index,          \
                                             int64_t k, int64_t n) {                                               \
    for (int64_t j = 0; j < n; ++j) {                                                                              \
      const float v = std::fma(t0[j], h0, t1[j] * h1);                                                             \
      const float b = best[j];                                                                                     \
      const bool better = !(v <= b) && b == b;                                                                     \
      best[j] = better ? v : b;                                                                                    \
      index[j] = better ? k : index[j];                                                                            \
    }                                                                                                              \
  }

DCF_ROW_LOOPS(_generic, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DCF_HAVE_FMA_CLONE 1
DCF_ROW_LOOPS(_fma, __attribute__((target("avx2,fma"))))
DCF_ROW_LOOPS(_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))))
#endif
#undef DCF_ROW_LOOPS

struct RowLoops {
  void (*resize_row)(const float*, const int64_t*, const int64_t*, const float*, const float*, float*, int64_t);
  void (*combine)(const float*, const float*, float, float, float*, int64_t);
  void (*combine_max)(const float*, const float*, float, float, float*, int64_t*, int64_t, int64_t);
};

constexpr RowLoops kGeneric{resize_row_generic, combine_generic, combine_max_generic};
#ifdef DCF_HAVE_FMA_CLONE
constexpr RowLoops kAvx2{resize_row_fma, combine_fma, combine_max_fma};
constexpr RowLoops kAvx512{resize_row_avx512, combine_avx512, combine_max_avx512};
#endif

// The loops compiled for ``isa`` ("avx512", "avx2" (with FMA) or "generic"), or nullptr where this build or this CPU
// has not that one.
const RowLoops* loops_for(const std::string& isa) {
#ifdef DCF_HAVE_FMA_CLONE
  if (isa == "avx512") {
    const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                     __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return has ? &kAvx512 : nullptr;
  }
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &kAvx2 : nullptr;
#endif
  return isa == "generic" ? &kGeneric : nullptr;
}

// The widest loops this CPU runs (AVX-512 took 0.8x the time of AVX2 on an Intel Xeon).
const RowLoops& row_loops() {
  static const RowLoops* loops = [] {
    for (const char* isa : {"avx512", "avx2"}) {
      if (const RowLoops* found = loops_for(isa)) return found;
    }
    return &kGeneric;
  }();
  return *loops;
}

void check_scores(const at::Tensor& scores, int64_t height, int64_t width, const char* op) {
  TORCH_CHECK(scores.device().is_cpu(), op, ": scores must be a CPU tensor, got one on ", scores.device());
  TORCH_CHECK(scores.scalar_type() == at::kFloat, op, ": scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.dim() == 4, op, ": scores must be (N, K, h, w), got shape ", scores.sizes());
  TORCH_CHECK(scores.is_contiguous(), op, ": scores must be contiguous (NCHW), got strides ", scores.strides());
  TORCH_CHECK(scores.size(1) >= 1 && scores.size(2) >= 1 && scores.size(3) >= 1, op,
              ": scores must have K, h, w >= 1, got shape ", scores.sizes());
  TORCH_CHECK(height >= 1 && width >= 1, op, ": height and width must be >= 1, got ", height, " and ", width);
}

// Each output row of each image of ``scores`` (N, K, h, w), resized: ``emit(image, out_row, h0, h1, t0, t1)``
// with t0 and t1 the K width-resized source rows (each ``width`` long, class after class) that the row combines
// with weights h0 and h1. Output rows are spread over the threads in contiguous ranges; a thread keeps the
// width-resized rows of the last two source rows it used (an upsampled row's neighbours read the same ones).
template <typename Emit>
void for_each_output_row(const at::Tensor& scores, int64_t height, int64_t width, const RowLoops& loops,
                         const Emit& emit) {
  const int64_t n = scores.size(0), k = scores.size(1), h = scores.size(2), w = scores.size(3);
  const Axis rows = make_axis(h, height), cols = make_axis(w, width);
  const float* src = scores.data_ptr<float>();
  // about 64 KiB of output values a task, at least one row
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, k * width));
  at::parallel_for(0, n * height, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cache(static_cast<size_t>(2 * k * width));
    int64_t cached[2] = {-1, -1};  // the source row (image * h + row) each half of the cache holds
    auto source_row = [&](int64_t image, int64_t r) -> const float* {
      const int64_t key = image * h + r;
      for (int s = 0; s < 2; ++s) {
        if (cached[s] == key) return cache.data() + s * k * width;
      }
      // replace the half that does not hold the other row this output row needs (the older one)
      const int s = cached[0] == -1 ? 0 : (cached[1] == -1 ? 1 : (cached[0] < cached[1] ? 0 : 1));
      float* out = cache.data() + s * k * width;
      for (int64_t c = 0; c < k; ++c) {
        loops.resize_row(src + ((image * k + c) * h + r) * w, cols.i0.data(), cols.i1.data(), cols.l0.data(),
                         cols.l1.data(), out + c * width, width);
      }
      cached[s] = key;
      return out;
    };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t image = i / height, oh = i % height;
      const float* t0 = source_row(image, rows.i0[oh]);
      const float* t1 = source_row(image, rows.i1[oh]);
      emit(image, oh, rows.l0[oh], rows.l1[oh], t0, t1, loops);
    }
  });
}

at::Tensor resize_with(const at::Tensor& scores, int64_t height, int64_t width, const RowLoops& loops) {
  const int64_t n = scores.size(0), k = scores.size(1);
  at::Tensor out = at::empty({n, k, height, width}, scores.options());
  if (out.numel() == 0) return out;
  float* dst = out.data_ptr<float>();
  for_each_output_row(scores, height, width, loops,
                      [&](int64_t image, int64_t oh, float h0, float h1, const float* t0, const float* t1,
                          const RowLoops& loops) {
                        for (int64_t c = 0; c < k; ++c) {
                          loops.combine(t0 + c * width, t1 + c * width, h0, h1,
                                        dst + ((image * k + c) * height + oh) * width, width);
                        }
                      });
  return out;
}

at::Tensor resize_bilinear_cpu(const at::Tensor& scores, int64_t height, int64_t width) {
  check_scores(scores, height, width, "resize_bilinear");
  return resize_with(scores, height, width, row_loops());
}

// A test hook: the resize through the loops compiled for ``isa`` (see loops_for), which the dispatch may not pick.
at::Tensor resize_bilinear_isa(const at::Tensor& scores, int64_t height, int64_t width, const std::string& isa) {
  check_scores(scores, height, width, "resize_bilinear_isa");
  const RowLoops* loops = loops_for(isa);
  TORCH_CHECK(loops != nullptr, "resize_bilinear_isa: no ", isa, " loops in this build or on this CPU");
  return resize_with(scores, height, width, *loops);
}

void resize_argmax_cpu(const at::Tensor& scores, int64_t height, int64_t width, const at::Tensor& best,
                       const at::Tensor& index, int64_t first) {
  const char* op = "resize_argmax_";
  check_scores(scores, height, width, op);
  const int64_t n = scores.size(0), k = scores.size(1);
  TORCH_CHECK(best.device().is_cpu() && best.scalar_type() == at::kFloat && best.is_contiguous() &&
                  best.sizes() == at::IntArrayRef({n, height, width}),
              op, ": best must be a contiguous float32 CPU tensor of shape (", n, ", ", height, ", ", width,
              "), got ", best.scalar_type(), " ", best.sizes(), " on ", best.device());
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.sizes() == best.sizes(),
              op, ": index must be a contiguous int64 CPU tensor of best's shape ", best.sizes(), ", got ",
              index.scalar_type(), " ", index.sizes(), " on ", index.device());
  if (best.numel() == 0) return;
  float* best_data = best.data_ptr<float>();
  int64_t* index_data = index.data_ptr<int64_t>();
  for_each_output_row(scores, height, width, row_loops(),
                      [&](int64_t image, int64_t oh, float h0, float h1, const float* t0, const float* t1,
                          const RowLoops& loops) {
                        const int64_t offset = (image * height + oh) * width;
                        for (int64_t c = 0; c < k; ++c) {
                          loops.combine_max(t0 + c * width, t1 + c * width, h0, h1, best_data + offset,
                                            index_data + offset, first + c, width);
                        }
                      });
}

}  // namespace

TORCH_LIBRARY(denseclip_fast_engine, m) {
  m.def("resize_bilinear(Tensor scores, int height, int width) -> Tensor");
  m.def("resize_argmax_(Tensor scores, int height, int width, Tensor(a!) best, Tensor(b!) index, int first) -> ()");
}

TORCH_LIBRARY_IMPL(denseclip_fast_engine, CPU, m) {
  m.impl("resize_bilinear", &resize_bilinear_cpu);
  m.impl("resize_argmax_", &resize_argmax_cpu);
}

TORCH_LIBRARY_FRAGMENT(denseclip_fast_testing, m) {
  m.def("resize_bilinear_isa(Tensor scores, int height, int width, str isa) -> Tensor", &resize_bilinear_isa);
}

}  // namespace denseclip_fast
