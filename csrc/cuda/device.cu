// CUDA runtime queries for `llmtrain info`. They never throw: with no driver or no GPU the
// runtime reports an error and we report zero devices.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "../ops.h"

namespace llmtrain {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls are not confused by it
    return 0;
  }
  return n;
}

const char* cuda_device_name(int i) {
  static std::vector<std::string> names;
  if (names.empty()) {
    const int n = cuda_device_count();
    for (int d = 0; d < n; ++d) {
      cudaDeviceProp prop;
      if (cudaGetDeviceProperties(&prop, d) == cudaSuccess)
        names.push_back(std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
                        std::to_string(prop.minor) + ")");
      else
        names.push_back("unknown CUDA device");
    }
  }
  return (i >= 0 && i < (int)names.size()) ? names[i].c_str() : "";
}

}  // namespace llmtrain
