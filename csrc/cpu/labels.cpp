// The engine's label maps on a CPU: the bilinear resizes of (N, K, h, w) float32 scores to each of a chain of sizes
// in turn (the network's input, then the image's own) and the argmax over the K classes in one pass, without any
// resized scores in memory but a few rows (denseclip_fast.engine.segmenter's labels; a photo's 150 planes at its
// size are gigabytes, whose writing and reading took most of predict's time). Each resize's rows are made as the
// next one needs them (class Level).
//
// The values are ATen's CPU bilinear resize (align_corners=False, sizes given, no scale factors) bit for bit, as its
// generic kernel computes a single-channel plane of a large output: per axis, scale = in / out and
// src = scale * (dst + 0.5) - 0.5 clamped at 0, index floor(src) (and the next one but at the edge), lambda1 =
// src - index clamped to [0, 1], lambda0 = 1 - lambda1 (an axis of the same size: the identity, lambda 1 and 0); a
// value, height outer: fma(fma(a, w0, b * w1), h0, fma(c, w0, d * w1) * h1). ATen writes src in plain C++, which
// its compiler may round once, as a fused multiply-add (torch 2.11 to 2.14 on x86-64), or twice, the product before
// the subtraction (torch 2.15; 1455 of the 21311 values of a 37x53 -> 101x211 plane differ between the two): the
// caller says which (fused_source: engine/cpu_labels.py's probe found which one F.interpolate gives). Its additions
// are single products and fused multiply-adds, so the separable order here (each source row resized along the width
// once, kept for the output rows that read it) rounds exactly as ATen's per-pixel one. The engine uses these kernels
// only where denseclip_fast_engine::resize_bilinear equals F.interpolate on a probe, in one of the two roundings (a
// torch whose kernel rounds otherwise keeps the resize-then-argmax path); tests/test_cpu_labels.py checks odd shapes,
// non-finite values and ties.
//
// The argmax keeps the first class of a tie and lets a NaN win (the first NaN stays), as torch.argmax: a class
// replaces the best so far when not (value <= best) and the best is not NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace denseclip_fast {
namespace {

// Outputs a block of the AVX-512 width resize makes at once (one vector).
constexpr int64_t kBlock = 16;

// One axis of the resize: for each output index, the two source indices and their weights (l0 and l1 padded with
// zeros to whole blocks). And for the AVX-512 width resize, per block of kBlock outputs: the first source index
// (base) and each output's two source indices past it (rel0, rel1, padded with zeros), and whether they all lie
// within the 32 source values from the base (an upsampling's do; else that block gathers).
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
  std::vector<int64_t> block_base;
  std::vector<int32_t> rel0, rel1;
  std::vector<uint8_t> block_near;
};

// The source position of output index d: one rounding of scale * (d + 0.5) - 0.5 where fused_source, else the
// product rounded first (a volatile, so that no compiler contracts the two into one fused multiply-add).
float source_position(float scale, int64_t d, bool fused_source) {
  const float center = static_cast<float>(d) + 0.5f;
  if (fused_source) return std::fma(scale, center, -0.5f);
  volatile float product = scale * center;
  return product - 0.5f;
}

Axis make_axis(int64_t in, int64_t out, bool fused_source) {
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
    float src = source_position(scale, d, fused_source);
    if (src < 0.f) src = 0.f;
    const int64_t i = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const float l1 = std::min(std::max(src - static_cast<float>(i), 0.f), 1.f);
    a.i0[d] = i;
    a.i1[d] = i + (i < in - 1 ? 1 : 0);
    a.l1[d] = l1;
    a.l0[d] = 1.f - l1;
  }
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  a.l0.resize(blocks * kBlock, 0.f);
  a.l1.resize(blocks * kBlock, 0.f);
  a.rel0.assign(blocks * kBlock, 0);
  a.rel1.assign(blocks * kBlock, 0);
  a.block_base.resize(blocks);
  a.block_near.resize(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t base = a.i0[b * kBlock];
    bool near = true;
    for (int64_t d = b * kBlock; d < std::min(out, (b + 1) * kBlock); ++d) {
      near = near && a.i0[d] >= base && a.i1[d] - base < 2 * kBlock;
      a.rel0[d] = static_cast<int32_t>(std::min<int64_t>(a.i0[d] - base, 2 * kBlock - 1));
      a.rel1[d] = static_cast<int32_t>(std::min<int64_t>(a.i1[d] - base, 2 * kBlock - 1));
    }
    a.block_base[b] = base;
    a.block_near[b] = near;
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

#ifdef DCF_HAVE_FMA_CLONE
// The AVX-512 width resize without gathers: a block of 16 outputs of an upsampling reads at most 32 consecutive
// source values, two vector loads from its base, from which two permutes pick each output's taps; the same fma as
// the other loops. A block whose taps lie further apart (a downsampling) takes resize_row_avx512's gathers.
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))) void resize_row_permute(const float* row,
                                                                                       const Axis& cols,
                                                                                       int64_t in_w, float* out) {
  const int64_t n = static_cast<int64_t>(cols.i0.size());
  for (int64_t b = 0, j = 0; j < n; ++b, j += kBlock) {
    const int64_t count = std::min(kBlock, n - j);
    if (!cols.block_near[b]) {  // this block and the gathering ones after it, in one loop
      int64_t last = b;
      while ((last + 1) * kBlock < n && !cols.block_near[last + 1]) ++last;
      const int64_t outputs = std::min((last + 1) * kBlock, n) - j;
      resize_row_avx512(row, cols.i0.data() + j, cols.i1.data() + j, cols.l0.data() + j, cols.l1.data() + j, out + j,
                        outputs);
      j += (last - b) * kBlock;
      b = last;
      continue;
    }
    const int64_t base = cols.block_base[b];
    const int64_t available = in_w - base;  // source values from the base to the row's end (masked loads past it)
    const auto low_mask = static_cast<__mmask16>(available >= kBlock ? 0xFFFF : (1u << available) - 1);
    const int64_t above = std::min(std::max<int64_t>(available - kBlock, 0), kBlock);
    const __m512 low = _mm512_maskz_loadu_ps(low_mask, row + base);
    // the second load only where the row goes on (a pointer past the end of a buffer is not formed)
    const __m512 high = above == 0 ? _mm512_setzero_ps()
                                   : _mm512_maskz_loadu_ps(static_cast<__mmask16>(above >= kBlock ? 0xFFFF
                                                                                                  : (1u << above) - 1),
                                                           row + base + kBlock);
    const __m512 a = _mm512_permutex2var_ps(low, _mm512_loadu_si512(cols.rel0.data() + j), high);
    const __m512 c = _mm512_permutex2var_ps(low, _mm512_loadu_si512(cols.rel1.data() + j), high);
    const __m512 value = _mm512_fmadd_ps(a, _mm512_loadu_ps(cols.l0.data() + j),
                                         _mm512_mul_ps(c, _mm512_loadu_ps(cols.l1.data() + j)));
    _mm512_mask_storeu_ps(out + j, static_cast<__mmask16>(count >= kBlock ? 0xFFFF : (1u << count) - 1), value);
  }
}
#endif

// A row loop of the old signature behind the Axis one.
template <void (*Loop)(const float*, const int64_t*, const int64_t*, const float*, const float*, float*, int64_t)>
void resize_row_of(const float* row, const Axis& cols, int64_t, float* out) {
  Loop(row, cols.i0.data(), cols.i1.data(), cols.l0.data(), cols.l1.data(), out,
       static_cast<int64_t>(cols.i0.size()));
}

struct RowLoops {
  void (*resize_row)(const float* row, const Axis& cols, int64_t in_w, float* out);
  void (*combine)(const float*, const float*, float, float, float*, int64_t);
  void (*combine_max)(const float*, const float*, float, float, float*, int64_t*, int64_t, int64_t);
};

constexpr RowLoops kGeneric{resize_row_of<resize_row_generic>, combine_generic, combine_max_generic};
#ifdef DCF_HAVE_FMA_CLONE
constexpr RowLoops kAvx2{resize_row_of<resize_row_fma>, combine_fma, combine_max_fma};
constexpr RowLoops kAvx512{resize_row_permute, combine_avx512, combine_max_avx512};
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

// The widest loops this CPU runs (AVX-512 took 0.8x the time of AVX2 on an Intel Xeon: benchmarks/results/
// labels_cpu_2threads_before_80682a6.md against labels_cpu_2threads.md as committed in 0bd5b2e).
const RowLoops& row_loops() {
  static const RowLoops* loops = [] {
    for (const char* isa : {"avx512", "avx2"}) {
      if (const RowLoops* found = loops_for(isa)) return found;
    }
    return &kGeneric;
  }();
  return *loops;
}

void check_scores(const at::Tensor& scores, const char* op) {
  TORCH_CHECK(scores.device().is_cpu(), op, ": scores must be a CPU tensor, got one on ", scores.device());
  TORCH_CHECK(scores.scalar_type() == at::kFloat, op, ": scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.dim() == 4, op, ": scores must be (N, K, h, w), got shape ", scores.sizes());
  TORCH_CHECK(scores.is_contiguous(), op, ": scores must be contiguous (NCHW), got strides ", scores.strides());
  TORCH_CHECK(scores.size(1) >= 1 && scores.size(2) >= 1 && scores.size(3) >= 1, op,
              ": scores must have K, h, w >= 1, got shape ", scores.sizes());
}

// Sizes (H1, W1, H2, W2, ...) as (height, width) pairs, each >= 1.
std::vector<std::pair<int64_t, int64_t>> size_pairs(at::IntArrayRef sizes, const char* op) {
  TORCH_CHECK(!sizes.empty() && sizes.size() % 2 == 0, op,
              ": sizes must be one or more (height, width) pairs, flattened, got ", sizes);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (size_t i = 0; i < sizes.size(); i += 2) {
    TORCH_CHECK(sizes[i] >= 1 && sizes[i + 1] >= 1, op, ": every height and width must be >= 1, got ", sizes);
    pairs.emplace_back(sizes[i], sizes[i + 1]);
  }
  return pairs;
}

// One resize of a chain, for one thread: its output rows made on demand, all K classes at a time, from the rows of
// the resize before it (from the scores for the first). It keeps the width-resized input rows of the last two input
// rows it used (an upsampled row's neighbour reads the same ones; a thread asks for rows in order, so the older of
// the two is never one that the row being made still needs) and one output row.
class Level {
 public:
  Level(Level* before, const float* scores, int64_t k, int64_t in_h, int64_t in_w, const Axis& rows,
        const Axis& cols, const RowLoops& loops)
      : before_(before),
        scores_(scores),
        k_(k),
        in_h_(in_h),
        in_w_(in_w),
        out_w_(static_cast<int64_t>(cols.i0.size())),
        rows_(rows),
        cols_(cols),
        loops_(loops),
        resized_(static_cast<size_t>(2 * k * out_w_)) {}

  const Axis& rows() const { return rows_; }

  // Input row r of ``image``, all classes resized along the width (K rows of the output's width, class after class).
  const float* width_resized(int64_t image, int64_t r) {
    const int64_t key = image * in_h_ + r;
    for (int s = 0; s < 2; ++s) {
      if (cached_[s] == key) return resized_.data() + s * k_ * out_w_;
    }
    const int s = cached_[0] == -1 ? 0 : (cached_[1] == -1 ? 1 : (cached_[0] < cached_[1] ? 0 : 1));
    float* out = resized_.data() + s * k_ * out_w_;
    // the input row, class c at base + c * stride: the scores' row (planes of in_h x in_w) or the level before's
    const float* base = before_ != nullptr ? before_->row(image, r) : scores_ + (image * k_ * in_h_ + r) * in_w_;
    const int64_t stride = before_ != nullptr ? in_w_ : in_h_ * in_w_;
    for (int64_t c = 0; c < k_; ++c) {
      loops_.resize_row(base + c * stride, cols_, in_w_, out + c * out_w_);
    }
    cached_[s] = key;
    return out;
  }

  // Output row oh of ``image`` (K rows of the output's width, class after class), valid until the next call.
  const float* row(int64_t image, int64_t oh) {
    const float* t0 = width_resized(image, rows_.i0[oh]);
    const float* t1 = width_resized(image, rows_.i1[oh]);
    if (row_.empty()) row_.resize(static_cast<size_t>(k_ * out_w_));  // the last level of a chain needs none
    for (int64_t c = 0; c < k_; ++c) {
      loops_.combine(t0 + c * out_w_, t1 + c * out_w_, rows_.l0[oh], rows_.l1[oh], row_.data() + c * out_w_,
                     out_w_);
    }
    return row_.data();
  }

 private:
  Level* before_;
  const float* scores_;
  int64_t k_, in_h_, in_w_, out_w_;
  const Axis& rows_;
  const Axis& cols_;
  const RowLoops& loops_;
  std::vector<float> resized_;
  std::vector<float> row_;
  int64_t cached_[2] = {-1, -1};  // the input row (image * in_h + row) each half of resized_ holds
};

// Each output row of the last resize of the chain ``sizes`` of each image of ``scores`` (N, K, h, w), in groups of
// consecutive rows that read the same two input rows: ``emit(image, first_row, rows, axis, t0, t1, loops)`` with
// t0 and t1 the K width-resized input rows (of the last resize's width, class after class) that row r of the group
// combines with weights axis.l0[r] and axis.l1[r] (an emit goes class by class over the group's rows, so that a
// class's two rows are read once for all of them: 0.68x the time of row by row for 128x171 -> 1536x2048, in
// benchmarks/results/labels_cpu_2threads.md against labels_cpu_2threads_before_0be9a0d.md). The
// resizes before the last one are made row by row as the last one needs them, never whole. Output rows are spread
// over the threads in contiguous ranges, each thread with its own chain.
template <typename Emit>
void for_each_output_row(const at::Tensor& scores, const std::vector<std::pair<int64_t, int64_t>>& sizes,
                         bool fused_source, const RowLoops& loops, const Emit& emit) {
  const int64_t n = scores.size(0), k = scores.size(1);
  std::vector<Axis> rows, cols;
  std::vector<std::pair<int64_t, int64_t>> inputs;  // each resize's input size
  int64_t h = scores.size(2), w = scores.size(3);
  for (const auto& [height, width] : sizes) {
    inputs.emplace_back(h, w);
    rows.push_back(make_axis(h, height, fused_source));
    cols.push_back(make_axis(w, width, fused_source));
    h = height;
    w = width;
  }
  const int64_t height = sizes.back().first, width = sizes.back().second;
  const float* src = scores.data_ptr<float>();
  // about 64 KiB of output values a task, at least one row
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, k * width));
  at::parallel_for(0, n * height, grain, [&](int64_t begin, int64_t end) {
    std::vector<std::unique_ptr<Level>> chain;
    for (size_t i = 0; i < sizes.size(); ++i) {
      chain.push_back(std::make_unique<Level>(i == 0 ? nullptr : chain.back().get(), src, k, inputs[i].first,
                                              inputs[i].second, rows[i], cols[i], loops));
    }
    Level& last = *chain.back();
    const Axis& out_rows = last.rows();
    for (int64_t i = begin; i < end;) {
      const int64_t image = i / height, oh = i % height;
      // the output rows after it that read the same two input rows (an upsampling's): one group, so that each
      // class's two width-resized rows are read once for all of them
      int64_t group = 1;
      while (i + group < end && oh + group < height && out_rows.i0[oh + group] == out_rows.i0[oh] &&
             out_rows.i1[oh + group] == out_rows.i1[oh]) {
        ++group;
      }
      const float* t0 = last.width_resized(image, out_rows.i0[oh]);
      const float* t1 = last.width_resized(image, out_rows.i1[oh]);
      emit(image, oh, group, out_rows, t0, t1, loops);
      i += group;
    }
  });
}

at::Tensor resize_with(const at::Tensor& scores, at::IntArrayRef sizes, bool fused_source, const RowLoops& loops,
                       const char* op) {
  check_scores(scores, op);
  const auto pairs = size_pairs(sizes, op);
  const int64_t n = scores.size(0), k = scores.size(1), height = pairs.back().first, width = pairs.back().second;
  at::Tensor out = at::empty({n, k, height, width}, scores.options());
  if (out.numel() == 0) return out;
  float* dst = out.data_ptr<float>();
  for_each_output_row(scores, pairs, fused_source, loops,
                      [&](int64_t image, int64_t oh, int64_t rows, const Axis& weights, const float* t0,
                          const float* t1, const RowLoops& loops) {
                        for (int64_t c = 0; c < k; ++c) {
                          for (int64_t r = oh; r < oh + rows; ++r) {
                            loops.combine(t0 + c * width, t1 + c * width, weights.l0[r], weights.l1[r],
                                          dst + ((image * k + c) * height + r) * width, width);
                          }
                        }
                      });
  return out;
}

at::Tensor resize_bilinear_cpu(const at::Tensor& scores, at::IntArrayRef sizes, bool fused_source) {
  return resize_with(scores, sizes, fused_source, row_loops(), "resize_bilinear");
}

// A test hook: the resize through the loops compiled for ``isa`` (see loops_for), which the dispatch may not pick.
at::Tensor resize_bilinear_isa(const at::Tensor& scores, at::IntArrayRef sizes, bool fused_source,
                               const std::string& isa) {
  const RowLoops* loops = loops_for(isa);
  TORCH_CHECK(loops != nullptr, "resize_bilinear_isa: no ", isa, " loops in this build or on this CPU");
  return resize_with(scores, sizes, fused_source, *loops, "resize_bilinear_isa");
}

void resize_argmax_cpu(const at::Tensor& scores, at::IntArrayRef sizes, bool fused_source, const at::Tensor& best,
                       const at::Tensor& index, int64_t first) {
  const char* op = "resize_argmax_";
  check_scores(scores, op);
  const auto pairs = size_pairs(sizes, op);
  const int64_t n = scores.size(0), k = scores.size(1), height = pairs.back().first, width = pairs.back().second;
  TORCH_CHECK(best.device().is_cpu() && best.scalar_type() == at::kFloat && best.is_contiguous() &&
                  best.sizes() == at::IntArrayRef({n, height, width}),
              op, ": best must be a contiguous float32 CPU tensor of shape (", n, ", ", height, ", ", width,
              "), got ", best.scalar_type(), " ", best.sizes(), " on ", best.device());
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.sizes() == best.sizes(),
              op, ": index must be a contiguous int64 CPU tensor of best's shape ", best.sizes(), ", got ",
              index.scalar_type(), " ", index.sizes(), " on ", index.device());
  TORCH_CHECK(first >= 0, op, ": first must be >= 0, got ", first);
  if (best.numel() == 0) return;
  float* best_data = best.data_ptr<float>();
  int64_t* index_data = index.data_ptr<int64_t>();
  for_each_output_row(scores, pairs, fused_source, row_loops(),
                      [&](int64_t image, int64_t oh, int64_t rows, const Axis& weights, const float* t0,
                          const float* t1, const RowLoops& loops) {
                        const int64_t offset = (image * height + oh) * width;  // the group's first row
                        int64_t c = 0;
                        if (first == 0) {  // the first class starts the argmax: written, best and index not read
                          for (int64_t r = 0; r < rows; ++r) {
                            loops.combine(t0, t1, weights.l0[oh + r], weights.l1[oh + r],
                                          best_data + offset + r * width, width);
                          }
                          std::fill(index_data + offset, index_data + offset + rows * width, int64_t{0});
                          c = 1;
                        }
                        for (; c < k; ++c) {
                          for (int64_t r = 0; r < rows; ++r) {
                            loops.combine_max(t0 + c * width, t1 + c * width, weights.l0[oh + r],
                                              weights.l1[oh + r], best_data + offset + r * width,
                                              index_data + offset + r * width, first + c, width);
                          }
                        }
                      });
}

}  // namespace

TORCH_LIBRARY(denseclip_fast_engine, m) {
  m.def("resize_bilinear(Tensor scores, int[] sizes, bool fused_source) -> Tensor");
  m.def(
      "resize_argmax_(Tensor scores, int[] sizes, bool fused_source, Tensor(a!) best, Tensor(b!) index, int first) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(denseclip_fast_engine, CPU, m) {
  m.impl("resize_bilinear", &resize_bilinear_cpu);
  m.impl("resize_argmax_", &resize_argmax_cpu);
}

TORCH_LIBRARY_FRAGMENT(denseclip_fast_testing, m) {
  m.def("resize_bilinear_isa(Tensor scores, int[] sizes, bool fused_source, str isa) -> Tensor", &resize_bilinear_isa);
}

}  // namespace denseclip_fast
