// CUDA half of build_info(): which toolkit and which GPU architectures this library was compiled for, so a user
// whose GPU is not in the list is told so instead of meeting "no kernel image is available" deep inside a kernel.
#include <cuda_runtime_api.h>

#include <string>

#define DCF_STR2(x) #x
#define DCF_STR(x) DCF_STR2(x)

namespace denseclip_fast {

std::string cuda_build_info() {
  std::string info = "{\"runtime\": " + std::to_string(CUDART_VERSION);
#ifdef __CUDA_ARCH_LIST__
  info += ", \"archs\": [" DCF_STR(__CUDA_ARCH_LIST__) "]";
#else
  info += ", \"archs\": []";
#endif
  return info + "}";
}

}  // namespace denseclip_fast
