// Segments an image with an AOTInductor package written by denseclip_fast.export.to_aoti, without Python.
//
//   denseclip_fast_segment PACKAGE.pt2 IMAGE.ppm LABELS.pgm [--mode slide|stretch] [--logits LOGITS.f32]
//                          [--device-index N]
//
// The image is a binary PPM (P6, 8-bit RGB; `convert photo.jpg photo.ppm` or PIL writes one).
// --mode slide (the default; the official test pipeline, as the Python Segmenter in slide mode): the image is resized
//   keeping its aspect ratio to fit the test scale stored in the package (mmcv's rescale_size; (2048, 512) for the
//   ADE20K models; OpenCV's uint8 bilinear resize, bit for bit, as mmcv's imrescale), normalised with the package's mean/std, and the
//   package, whose input size is the window, slides over it with the stored stride (mmseg's slide_inference: the
//   last window of each row and column ends at the border; the windows go through the package in batches of at
//   most its max_batch; overlapping logits are averaged).
// --mode stretch: the image is resized (the same bilinear, stretched) to the package's input size and run once.
// Either way the logits are resized back to the image's size (bilinear) and the per-pixel argmax is written as a PGM
// (8-bit up to 256 classes, else 16-bit). --logits also writes those logits (1, K, H, W) at the image's size as
// little-endian float32. A JSON summary (size, mode, classes, the most frequent labels) goes to stdout.
//
// A float32 CUDA package runs with TF32 off (cuDNN and cuBLAS), as from Python (load_aoti) and the Segmenter.
//
// The package calls denseclip_fast's C++ operators through PyTorch's dispatcher: this program links
// libdenseclip_fast_ops (built by CMakeLists.txt), whose load registers them.
#include <ATen/Context.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct Image {
  int64_t height = 0, width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3
};

// Skips whitespace and '#' comments in a PNM header, then reads one unsigned integer.
int64_t read_header_int(std::istream& in, const std::string& path) {
  int c = in.get();
  while (c != EOF && (std::isspace(c) || c == '#')) {
    if (c == '#') {
      while (c != EOF && c != '\n') c = in.get();
    }
    c = in.get();
  }
  if (c == EOF || !std::isdigit(c)) throw std::runtime_error(path + ": malformed PPM header");
  int64_t value = 0;
  while (c != EOF && std::isdigit(c)) {
    value = value * 10 + (c - '0');
    c = in.get();
  }
  return value;  // the single whitespace after the number has been consumed
}

Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open image " + path);
  char magic[2] = {0, 0};
  in.read(magic, 2);
  if (magic[0] != 'P' || magic[1] != '6') throw std::runtime_error(path + " is not a binary PPM (P6) image");
  Image img;
  img.width = read_header_int(in, path);
  img.height = read_header_int(in, path);
  const int64_t maxval = read_header_int(in, path);
  if (img.width < 1 || img.height < 1 || maxval != 255) {
    throw std::runtime_error(path + ": need an 8-bit PPM (maxval 255) of positive size");
  }
  img.rgb.resize(static_cast<size_t>(img.width * img.height * 3));
  in.read(reinterpret_cast<char*>(img.rgb.data()), static_cast<std::streamsize>(img.rgb.size()));
  if (in.gcount() != static_cast<std::streamsize>(img.rgb.size())) throw std::runtime_error(path + ": truncated");
  return img;
}

// The numbers of a flat JSON array such as "[512, 512]" or "[122.77, 116.74, 104.09]".
std::vector<double> json_numbers(const std::string& text) {
  std::vector<double> out;
  std::string cleaned = text;
  for (char& c : cleaned) {
    if (c == '[' || c == ']' || c == ',') c = ' ';
  }
  std::istringstream in(cleaned);
  double v;
  while (in >> v) out.push_back(v);
  return out;
}

// Appends a Unicode code point as UTF-8.
void append_utf8(std::string& out, unsigned code) {
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else if (code < 0x800) {
    out += static_cast<char>(0xC0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (code >> 12));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  }
}

// The strings of a flat JSON array of strings (JSON escapes decoded; \uXXXX to UTF-8, surrogate pairs excepted).
std::vector<std::string> json_strings(const std::string& text) {
  std::vector<std::string> out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '"') continue;
    std::string s;
    for (++i; i < text.size() && text[i] != '"'; ++i) {
      if (text[i] != '\\' || i + 1 >= text.size()) {
        s += text[i];
        continue;
      }
      const char e = text[++i];
      if (e == 'n') s += '\n';
      else if (e == 't') s += '\t';
      else if (e == 'r') s += '\r';
      else if (e == 'b') s += '\b';
      else if (e == 'f') s += '\f';
      else if (e == 'u' && i + 4 < text.size()) {
        append_utf8(s, static_cast<unsigned>(std::stoi(text.substr(i + 1, 4), nullptr, 16)));
        i += 4;
      } else s += e;  // \" \\ \/
    }
    out.push_back(s);
  }
  return out;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {  // control characters (a tab, a newline) as \u00XX
      static const char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[(c >> 4) & 0xf];
      out += hex[c & 0xf];
    } else {
      out += c;
    }
  }
  return out;
}

// A file written through ``out``, closed and checked: a full disk (or a failed write) is an error naming it, not a
// truncated file and exit 0.
void finish_file(std::ofstream& out, const std::string& path) {
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path + " (a full disk?)");
}

int parse_int(const std::string& text, const std::string& option) {
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) throw std::runtime_error(option + " must be an integer, got '" + text + "'");
  return value;
}

// mmcv's rescale_size with keep_ratio: the largest size with the image's aspect ratio whose long side fits
// max(scale) and short side fits min(scale), rounded half up; (height, width).
std::vector<int64_t> keep_ratio_size(int64_t height, int64_t width, const std::vector<double>& scale) {
  const double long_edge = std::max(scale[0], scale[1]), short_edge = std::min(scale[0], scale[1]);
  const double factor = std::min(long_edge / static_cast<double>(std::max(height, width)),
                                 short_edge / static_cast<double>(std::min(height, width)));
  return {static_cast<int64_t>(static_cast<double>(height) * factor + 0.5),
          static_cast<int64_t>(static_cast<double>(width) * factor + 0.5)};
}

// One axis of OpenCV's uint8 INTER_LINEAR resize: per output pixel, two source indices and their 11-bit weights.
// The source position is computed in float from the double scale 1 / (dst / src), weights are rounded half to
// even (cvRound). The horizontal pass zeroes the fraction outside the image; the vertical one only clamps rows.
struct Taps {
  std::vector<int64_t> first, second;
  std::vector<int32_t> w0, w1;
};

Taps linear_taps(int64_t src, int64_t dst, bool zero_outside) {
  Taps t;
  const double scale = 1.0 / (static_cast<double>(dst) / static_cast<double>(src));
  for (int64_t d = 0; d < dst; ++d) {
    const float pos = static_cast<float>((static_cast<double>(d) + 0.5) * scale - 0.5);
    int64_t first = static_cast<int64_t>(std::floor(pos));
    float frac = pos - static_cast<float>(first);
    if (zero_outside && (first < 0 || first >= src - 1)) frac = 0.f;  // the second tap then weighs 0
    t.first.push_back(std::clamp<int64_t>(first, 0, src - 1));
    t.second.push_back(std::clamp<int64_t>(first + 1, 0, src - 1));
    t.w0.push_back(static_cast<int32_t>(std::nearbyint((1.f - frac) * 2048.f)));
    t.w1.push_back(static_cast<int32_t>(std::nearbyint(frac * 2048.f)));
  }
  return t;
}

// cv2.resize(INTER_LINEAR) of the RGB image to (height, width), bit-exact (as denseclip_fast.preprocess.
// resize_bilinear_uint8): (1, 3, height, width) float32 holding the uint8 result.
at::Tensor resize_like_opencv(const Image& img, int64_t height, int64_t width) {
  const Taps cols = linear_taps(img.width, width, true), rows = linear_taps(img.height, height, false);
  std::vector<int32_t> horizontal(static_cast<size_t>(img.height * width * 3));  // (H, width, 3), <= 255 * 2048
  for (int64_t y = 0; y < img.height; ++y) {
    const uint8_t* line = img.rgb.data() + y * img.width * 3;
    for (int64_t x = 0; x < width; ++x) {
      for (int64_t c = 0; c < 3; ++c) {
        horizontal[static_cast<size_t>((y * width + x) * 3 + c)] =
            line[cols.first[x] * 3 + c] * cols.w0[x] + line[cols.second[x] * 3 + c] * cols.w1[x];
      }
    }
  }
  at::Tensor out = torch::empty({1, 3, height, width}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t y = 0; y < height; ++y) {
    const int32_t* top = horizontal.data() + rows.first[y] * width * 3;
    const int32_t* bottom = horizontal.data() + rows.second[y] * width * 3;
    for (int64_t x = 0; x < width; ++x) {
      for (int64_t c = 0; c < 3; ++c) {
        const int32_t v = (((rows.w0[y] * (top[x * 3 + c] >> 4)) >> 16) +
                           ((rows.w1[y] * (bottom[x * 3 + c] >> 4)) >> 16) + 2) >> 2;
        o[(c * height + y) * width + x] = static_cast<float>(std::clamp(v, 0, 255));
      }
    }
  }
  return out;
}

struct Window {
  int64_t y1, y2, x1, x2;
};

// mmseg's slide_inference windows, rows then columns (denseclip_fast/model/slide.py).
std::vector<Window> slide_windows(int64_t height, int64_t width, int64_t crop_h, int64_t crop_w, int64_t stride_h,
                                  int64_t stride_w) {
  const int64_t h_grids = std::max<int64_t>(height - crop_h + stride_h - 1, 0) / stride_h + 1;
  const int64_t w_grids = std::max<int64_t>(width - crop_w + stride_w - 1, 0) / stride_w + 1;
  std::vector<Window> windows;
  for (int64_t hi = 0; hi < h_grids; ++hi) {
    for (int64_t wi = 0; wi < w_grids; ++wi) {
      const int64_t y2 = std::min(hi * stride_h + crop_h, height), x2 = std::min(wi * stride_w + crop_w, width);
      windows.push_back({std::max<int64_t>(y2 - crop_h, 0), y2, std::max<int64_t>(x2 - crop_w, 0), x2});
    }
  }
  return windows;
}

const std::string& meta(const std::unordered_map<std::string, std::string>& m, const std::string& key) {
  auto it = m.find("denseclip_fast." + key);
  if (it == m.end()) throw std::runtime_error("the package has no denseclip_fast." + key + " (not from to_aoti?)");
  return it->second;
}

void write_pgm(const std::string& path, const at::Tensor& labels, int64_t num_classes) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  const bool wide = num_classes > 256;
  out << "P5\n" << labels.size(1) << " " << labels.size(0) << "\n" << (wide ? 65535 : 255) << "\n";
  const at::Tensor flat = labels.contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    if (wide) {  // 16-bit PGM samples are big-endian
      const uint16_t v = static_cast<uint16_t>(data[i]);
      out.put(static_cast<char>(v >> 8)).put(static_cast<char>(v & 0xff));
    } else {
      out.put(static_cast<char>(static_cast<uint8_t>(data[i])));
    }
  }
  finish_file(out, path);
}

namespace F = torch::nn::functional;

at::Tensor bilinear(const at::Tensor& x, std::vector<int64_t> size) {
  return F::interpolate(x, F::InterpolateFuncOptions().size(size).mode(torch::kBilinear).align_corners(false));
}

struct Package {
  torch::inductor::AOTIModelPackageLoader& loader;
  at::Device device;
  at::ScalarType dtype;
  bool cuda;
  int64_t max_batch;

  // (N, 3, h, w) normalised float32 on the CPU -> (N, K, h, w) float32 logits on the CPU, max_batch at a time.
  at::Tensor run(const at::Tensor& x) {
    std::vector<at::Tensor> outs;
    for (int64_t start = 0; start < x.size(0); start += max_batch) {
      const at::Tensor part = x.slice(0, start, std::min(start + max_batch, x.size(0)))
                                  .to(device, dtype)
                                  .contiguous(cuda ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      outs.push_back(loader.run({part})[0].to(at::kCPU, at::kFloat));
    }
    return at::cat(outs, 0);
  }
};

// A folder of this process's own in the temp folder, made TMPDIR while the program runs and removed with all it holds
// when it ends: libtorch's loader extracts the package there (torch 2.14 honours TMPDIR) and leaves that copy behind
// when a load fails (a damaged library, another machine's package), a full copy of its weights each time. torch
// 2.11's loader extracts into /tmp whatever TMPDIR says: its failed loads still leave theirs.
class PrivateTempDir {
 public:
  PrivateTempDir() {
    const char* parent = std::getenv("TMPDIR");
    std::string pattern = std::string(parent && *parent ? parent : "/tmp") + "/denseclip_fast_segment.XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) return;  // no private folder: the loader uses TMPDIR as it is
    path_ = pattern;
    setenv("TMPDIR", path_.c_str(), 1);  // left so: the program ends with this object
  }
  ~PrivateTempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  PrivateTempDir(const PrivateTempDir&) = delete;
  PrivateTempDir& operator=(const PrivateTempDir&) = delete;

 private:
  std::string path_;
};

int run(int argc, char** argv) {
  const PrivateTempDir temp;  // first: destroyed last, after the loader
  std::vector<std::string> positional;
  std::string logits_path, mode = "slide";
  int device_index = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--logits" && i + 1 < argc) logits_path = argv[++i];
    else if (arg == "--device-index" && i + 1 < argc) device_index = parse_int(argv[++i], "--device-index");
    else if (arg == "--mode" && i + 1 < argc) mode = argv[++i];
    else positional.push_back(arg);
  }
  if (positional.size() != 3 || (mode != "slide" && mode != "stretch")) {
    std::cerr << "usage: " << argv[0]
              << " PACKAGE.pt2 IMAGE.ppm LABELS.pgm [--mode slide|stretch] [--logits LOGITS.f32] [--device-index N]\n";
    return 2;
  }
  torch::NoGradGuard no_grad;
  // Loaded on its default device first, to read the metadata: a CPU package given a device index made libtorch's
  // loader throw from its constructor, which then left its extracted copy of the package in the temp folder.
  // A CUDA package with --device-index is loaded again onto that GPU.
  auto load = [&](int index) {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(positional[0], "model", false, 1, index);
  };
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> made = load(-1);
  const auto metadata = made->get_metadata();
  const bool cuda = meta(metadata, "device") == "cuda";
  if (device_index >= 0) {
    if (!cuda) {  // as load_aoti: a CPU package has no device to choose
      throw std::runtime_error("--device-index applies to a CUDA package; " + positional[0] + " is for the CPU");
    }
    made.reset();
    made = load(device_index);
  }
  torch::inductor::AOTIModelPackageLoader& loader = *made;
  const std::vector<double> size = json_numbers(meta(metadata, "image_size"));
  const std::vector<double> mean = json_numbers(meta(metadata, "mean"));
  const std::vector<double> stddev = json_numbers(meta(metadata, "std"));
  const std::vector<std::string> names = json_strings(meta(metadata, "class_names"));
  const std::string& dtype_name = meta(metadata, "dtype");
  if (size.size() != 2 || mean.size() != 3 || stddev.size() != 3) throw std::runtime_error("bad package metadata");
  const at::ScalarType dtype = dtype_name == "float16"    ? at::kHalf
                               : dtype_name == "bfloat16" ? at::kBFloat16
                                                          : at::kFloat;
  const at::Device device = cuda ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(device_index, 0)))
                                 : at::Device(at::kCPU);
  if (cuda && dtype == at::kFloat) {
    // A float32 package computes in IEEE float32, as the Segmenter and load_aoti (Python's no_tf32) do: libtorch's
    // default lets cuDNN convolutions use TF32 (about 1e-3 off). These setters exist in every libtorch the project
    // supports; in those with the fp32_precision settings (2.9 on) they set those too (not TF32 for cuDNN, ieee for
    // cuBLAS matmuls), so readings through either API agree.
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }

  Package package{loader, device, dtype, cuda, std::stoll(meta(metadata, "max_batch"))};

  Image img = read_ppm(positional[1]);
  const std::vector<int64_t> net_size = {static_cast<int64_t>(size[0]), static_cast<int64_t>(size[1])};
  const auto normalise = [&](const at::Tensor& t) {
    return (t - torch::tensor(mean).to(at::kFloat).view({1, 3, 1, 1})) /
           torch::tensor(stddev).to(at::kFloat).view({1, 3, 1, 1});
  };
  at::Tensor logits;  // (1, K, h, w) float32 on the CPU
  std::vector<int64_t> scaled = net_size;
  if (mode == "stretch") {
    logits = package.run(normalise(resize_like_opencv(img, net_size[0], net_size[1])));
  } else {
    if (metadata.count("denseclip_fast.test_scale") == 0) {
      throw std::runtime_error("the package has no test scale (written by an older to_aoti): use --mode stretch");
    }
    const std::vector<double> scale = json_numbers(meta(metadata, "test_scale"));
    const std::vector<double> stride = json_numbers(meta(metadata, "slide_stride"));
    if (scale.size() != 2 || stride.size() != 2) throw std::runtime_error("bad package metadata (test_scale, slide_stride)");
    scaled = keep_ratio_size(img.height, img.width, scale);
    if (scaled[0] < net_size[0] || scaled[1] < net_size[1]) {
      throw std::runtime_error("the image resized to the test scale is " + std::to_string(scaled[0]) + "x" +
                               std::to_string(scaled[1]) + ", smaller than the package's window " +
                               std::to_string(net_size[0]) + "x" + std::to_string(net_size[1]) +
                               " (its aspect ratio is too far from the test scale's): use --mode stretch");
    }
    const at::Tensor x = normalise(resize_like_opencv(img, scaled[0], scaled[1]));
    const auto windows = slide_windows(scaled[0], scaled[1], net_size[0], net_size[1],
                                       static_cast<int64_t>(stride[0]), static_cast<int64_t>(stride[1]));
    std::vector<at::Tensor> crops;
    for (const Window& w : windows) crops.push_back(x.slice(2, w.y1, w.y2).slice(3, w.x1, w.x2));
    const at::Tensor window_logits = package.run(at::cat(crops, 0));  // (windows, K, crop_h, crop_w)
    at::Tensor total = torch::zeros({1, window_logits.size(1), scaled[0], scaled[1]}, at::kFloat);
    at::Tensor count = torch::zeros({1, 1, scaled[0], scaled[1]}, at::kFloat);
    for (size_t i = 0; i < windows.size(); ++i) {
      const Window& w = windows[i];
      total.slice(2, w.y1, w.y2).slice(3, w.x1, w.x2).add_(window_logits[static_cast<int64_t>(i)]);
      count.slice(2, w.y1, w.y2).slice(3, w.x1, w.x2).add_(1);
    }
    logits = total / count;
  }
  const at::Tensor full = bilinear(logits, {img.height, img.width}).contiguous();  // (1, K, H, W)
  const int64_t num_classes = full.size(1);
  if (!logits_path.empty()) {
    std::ofstream out(logits_path, std::ios::binary);
    if (!out) throw std::runtime_error("cannot write " + logits_path);
    out.write(reinterpret_cast<const char*>(full.data_ptr<float>()), static_cast<std::streamsize>(full.numel() * 4));
    finish_file(out, logits_path);
  }
  const at::Tensor labels = full.argmax(1)[0];  // (H, W) int64
  write_pgm(positional[2], labels, num_classes);

  const at::Tensor counts = torch::bincount(labels.flatten(), {}, num_classes);
  const at::Tensor order = counts.argsort(0, true);
  std::cout << "{\"image\": [" << img.height << ", " << img.width << "], \"mode\": \"" << mode
            << "\", \"classes\": " << num_classes << ", \"package_size\": [" << net_size[0] << ", " << net_size[1]
            << "], \"resized\": [" << scaled[0] << ", " << scaled[1] << "], \"top\": [";
  for (int64_t i = 0; i < std::min<int64_t>(5, num_classes); ++i) {
    const int64_t c = order[i].item<int64_t>();
    const double share = counts[c].item<double>() / static_cast<double>(labels.numel());
    if (share == 0) break;
    std::cout << (i ? ", " : "") << "[\"" << json_escape(c < static_cast<int64_t>(names.size()) ? names[c] : "?")
              << "\", " << share << "]";
  }
  std::cout << "]}" << std::endl;
  if (!std::cout) throw std::runtime_error("cannot write the summary to stdout");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {  // PyTorch's errors: the message, not the C++ backtrace what() appends
    std::cerr << "denseclip_fast_segment: error: " << e.what_without_backtrace() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "denseclip_fast_segment: error: " << e.what() << std::endl;
    return 1;
  }
}
