// Backward weight GEMM on sm_90a: dw[m, k] = dy[n, m]^T . xn[n, k] (both operands MN-major), reduction over rows.
#include <stdexcept>

#include "rmsnorm_linear_sm90.cuh"
#include "rmsnorm_linear_common.cuh"

#if defined(LLMTRAIN_WITH_CUTE)
#include "rmsnorm_linear_sm90_gemm.cuh"
#endif

namespace llmtrain {
namespace rmslin {

#if defined(LLMTRAIN_WITH_CUTE)
namespace sm90 {

template <class Element> void wgrad(const void* dy, const void* xn, void* dw, int64_t n, int64_t k, int64_t m,
                                    cudaStream_t s) {
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using Fusion = cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>;
  using Cfg = GemmCfg<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, TileShape, ClusterShape, Fusion>;
  using Gemm = typename Cfg::Gemm;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {(int)m, (int)k, (int)n, 1},
      {static_cast<const Element*>(dy), ld_stride<typename Cfg::StrideA>(m), static_cast<const Element*>(xn),
       ld_stride<typename Cfg::StrideB>(k)},
      {{}, nullptr, ld_stride<typename Cfg::StrideC>(k), static_cast<Element*>(dw),
       ld_stride<typename Cfg::StrideD>(k)},
      hw_info()};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  run_gemm<Gemm>(args, s, "backward weight GEMM");
}

}  // namespace sm90
#endif

void sm90_gemm_wgrad(DType dtype, const void* dy, const void* xn, void* dw, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if (dtype == DType::BF16) return sm90::wgrad<cutlass::bfloat16_t>(dy, xn, dw, n, k, m, s);
  if (dtype == DType::F16) return sm90::wgrad<cutlass::half_t>(dy, xn, dw, n, k, m, s);
#endif
  throw std::runtime_error("rmsnorm_linear (CUDA): sm_90a GEMM not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
