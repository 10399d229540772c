// Backward data GEMM on sm_90a: d[n, k] = dy[n, m] . W[m, k] (W read N-major through TMA).
// (Its own translation unit so the CUTLASS instantiations compile in parallel with the others.)
#include <stdexcept>

#include "rmsnorm_linear_sm90.cuh"
#include "rmsnorm_linear_common.cuh"

#if defined(LLMTRAIN_WITH_CUTE)
#include "rmsnorm_linear_sm90_gemm.cuh"
#endif

namespace llmtrain {
namespace rmslin {

void sm90_gemm_dgrad(DType dtype, const void* dy, const void* w, void* d, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s, bool pdl) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  using Layout = cutlass::layout::RowMajor;
  if (dtype == DType::BF16)
    return sm90::plain_gemm<cutlass::bfloat16_t, Layout>(dy, m, w, k, d, n, k, m, s, "backward data GEMM", pdl);
  if (dtype == DType::F16) return sm90::plain_gemm<cutlass::half_t, Layout>(dy, m, w, k, d, n, k, m, s, "backward data GEMM", pdl);
#endif
  throw std::runtime_error("rmsnorm_linear (CUDA): sm_90a GEMM not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
