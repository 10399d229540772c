// CUDA runtime queries for `llmtrain info`. They never throw: with no driver or no GPU the
// runtime reports an error and we report zero devices.
#include <cuda_runtime.h>

#include <cstring>
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

bool cuda_built_for_sm90a() {
#if defined(LLMTRAIN_CUDA_ARCHS)
  // a "90a" entry in the comma-separated architecture list the extension was built for
  const char* a = LLMTRAIN_CUDA_ARCHS;
  for (const char* p = std::strstr(a, "90a"); p; p = std::strstr(p + 1, "90a"))
    if ((p == a || p[-1] == ',') && (p[3] == '\0' || p[3] == ',' || p[3] == '-')) return true;
#endif
  return false;
}

bool cuda_current_device_is_sm90() {
  static int cc[64] = {};  // per device: 10 * major + minor, 0 until asked
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return false;
  }
  if (!cc[dev]) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    cc[dev] = major * 10 + minor;
  }
  return cc[dev] == 90;
}

}  // namespace llmtrain
