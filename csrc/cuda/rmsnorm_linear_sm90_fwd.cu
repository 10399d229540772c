// Forward GEMM on sm_90a: y = rstd[row] * (x . (W diag g)^T) + bias[col], the row scale and the bias
// applied in the epilogue (CUTLASS epilogue visitor tree), on raw x. Also sm90_usable().
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "../ops.h"
#include "rmsnorm_linear_sm90.cuh"
#include "rmsnorm_linear_common.cuh"

#if defined(LLMTRAIN_WITH_CUTE)
#include "rmsnorm_linear_sm90_gemm.cuh"
#endif

namespace llmtrain {
namespace rmslin {

bool sm90_usable(DType dtype, int64_t k, int64_t m) {
#if !defined(LLMTRAIN_WITH_CUTE)
  return false;
#endif
  if (!cuda_built_for_sm90a()) return false;
  if (dtype != DType::BF16 && dtype != DType::F16) return false;
  if (k % 8 != 0 || m % 8 != 0 || k > 0x7fffffff || m > 0x7fffffff) return false;
  if (const char* e = std::getenv("LLMTRAIN_RMSLIN_PORTABLE"))
    if (e[0] && e[0] != '0') return false;
  return cuda_current_device_is_sm90();
}

#if defined(LLMTRAIN_WITH_CUTE)
namespace sm90 {

template <class Element, class TileShape, class ClusterShape>
void fwd(const void* x, const void* wg, const float* rstd, const void* bias, void* y, int64_t n, int64_t k, int64_t m,
         cudaStream_t s, bool pdl) {
  constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
  using namespace cutlass::epilogue::fusion;
  // D = rstd[m-index] * acc + bias[n-index]
  using Fusion = Sm90EVT<Sm90Compute<cutlass::homogeneous_multiply_add, Element, float, Round>,
                         Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>, 4>,
                         Sm90AccFetch,
                         Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>, 16 / sizeof(Element)>>;
  using Cfg = GemmCfg<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, TileShape, ClusterShape,
                      Fusion>;
  using Gemm = typename Cfg::Gemm;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {(int)n, (int)m, (int)k, 1},
      {static_cast<const Element*>(x), ld_stride<typename Cfg::StrideA>(k), static_cast<const Element*>(wg),
       ld_stride<typename Cfg::StrideB>(k)},
      {{}, nullptr, ld_stride<typename Cfg::StrideC>(m), static_cast<Element*>(y),
       ld_stride<typename Cfg::StrideD>(m)},
      hw_info()};
  // Wide outputs: swizzle the persistent tile order by 8 (CUTLASS's max_swizzle_size) where the N tiles
  // divide into groups of 8. Measured on the H100 at 16384 x 2048 -> 8192 (session 18, docs/perf.md):
  // forward 0.877 against 0.922 ms (calls 1 and 5 agree); no change at 2048 / 4096 (16 N tiles), worse at
  // 5632 (22 N tiles), so only from 32 N tiles. LLMTRAIN_RMSLIN_SWIZZLE overrides it (run_gemm).
  const int64_t n_tiles = (m + size<1>(TileShape{}) - 1) / size<1>(TileShape{});
  if (n_tiles >= 32 && n_tiles % 8 == 0) args.scheduler.max_swizzle_size = 8;
  args.epilogue.thread = {
      {rstd, 0.f, {}},                                   // rstd per row (column broadcast)
      {},                                                // acc
      {static_cast<const Element*>(bias), Element(0), {}},  // bias per column (row broadcast), null -> 0
      {}};
  run_gemm<Gemm>(args, s, "forward GEMM", pdl);
}

}  // namespace sm90
#endif

void sm90_gemm_fwd(DType dtype, const void* x, const void* wg, const float* rstd, const void* bias, void* y,
                   int64_t n, int64_t k, int64_t m, cudaStream_t s, bool pdl) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  using namespace cute;
  // Tile 128x256 (cluster 2x1) by default; LLMTRAIN_RMSLIN_FWD_CFG=1 picks 256x128 (cluster 1x2).
  static const bool alt = [] {
    const char* e = std::getenv("LLMTRAIN_RMSLIN_FWD_CFG");
    return e && e[0] == '1';
  }();
  if (dtype == DType::BF16) {
    if (alt) return sm90::fwd<cutlass::bfloat16_t, Shape<_256, _128, _64>, Shape<_1, _2, _1>>(x, wg, rstd, bias, y, n, k, m, s, pdl);
    return sm90::fwd<cutlass::bfloat16_t, Shape<_128, _256, _64>, Shape<_2, _1, _1>>(x, wg, rstd, bias, y, n, k, m, s, pdl);
  }
  if (dtype == DType::F16) return sm90::fwd<cutlass::half_t, Shape<_128, _256, _64>, Shape<_2, _1, _1>>(x, wg, rstd, bias, y, n, k, m, s, pdl);
#endif
  throw std::runtime_error("rmsnorm_linear (CUDA): sm_90a GEMM not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
