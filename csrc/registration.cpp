// Registers the denseclip_fast operator library with PyTorch's dispatcher.
//
// This file is shared by the Python extension (setup.py -> denseclip_fast._C) and the plain C++ library built by
// CMakeLists.txt, so it must not include Python headers. Operators are reached through the dispatcher:
// torch.ops.denseclip_fast.<name> in Python, c10::Dispatcher in C++.
#include <torch/library.h>

#include <string>

#ifndef DENSECLIP_FAST_VERSION
#define DENSECLIP_FAST_VERSION "unknown"
#endif

namespace denseclip_fast {

#ifdef DENSECLIP_FAST_WITH_CUDA
std::string cuda_build_info();  // csrc/cuda/build_info.cu
#endif

// A JSON object describing how this library was built; the Python side parses it (denseclip_fast.ops.build_info).
std::string build_info() {
  std::string info = "{\"version\": \"" DENSECLIP_FAST_VERSION "\", ";
#ifdef _OPENMP
  info += "\"openmp\": true, ";
#else
  info += "\"openmp\": false, ";
#endif
#ifdef DENSECLIP_FAST_WITH_CUDA
  info += "\"cuda\": " + cuda_build_info();
#else
  info += "\"cuda\": null";
#endif
  return info + "}";
}

TORCH_LIBRARY(denseclip_fast, m) {
  m.def("build_info() -> str", &build_info);
}

}  // namespace denseclip_fast
