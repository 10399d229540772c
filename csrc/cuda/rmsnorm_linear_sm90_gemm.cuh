// CUTLASS 3.x GEMM plumbing shared by the rmsnorm_linear_sm90_*.cu files (only included when the
// build has the CuTe/CUTLASS headers).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

// Programmatic dependent launch: with this defined (before any CUTLASS header) the sm_90a kernels
// execute griddepcontrol.wait before their first global load (a no-op unless launched with the PDL
// attribute) and signal launch_dependents at their last tile. Only these GEMMs' translation units see it.
#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
#endif

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"

#include "rmsnorm_linear_common.cuh"

namespace llmtrain {
namespace rmslin {
namespace sm90 {

using namespace cute;

// Per-device SM count, cached (cudaDeviceGetAttribute is cheap but not free).
inline int sm_count(int dev) {
  static int cache[64] = {};
  if (dev < 0 || dev >= 64) dev = 0;
  if (!cache[dev]) {
    int c = 0;
    check(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    cache[dev] = c;
  }
  return cache[dev];
}

// Set the one dynamic (leading-dimension) entry among the first two of a packed cute stride.
template <class Stride> Stride ld_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_same_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>, int64_t>)
    cute::get<0>(s) = ld;
  else
    cute::get<1>(s) = ld;
  return s;
}

// Run an instantiated GemmUniversalAdapter on the stream; workspace (usually none) is stream-ordered.
// initialize() sets the kernel's shared-memory attribute (cudaFuncSetAttribute) on every call; it is
// only needed once per device, so later calls take update(), which just rebuilds the parameters
// (TMA descriptors). pdl: launch with programmatic dependent launch (see CUTLASS_ENABLE_GDC_FOR_SM90).
// Tile order of the persistent scheduler (A/B switches, read on every call): LLMTRAIN_RMSLIN_SWIZZLE=1|2|4|8
// (CUTLASS's max_swizzle_size, default 1) and LLMTRAIN_RMSLIN_RASTER=m|n (default: CUTLASS's heuristic).
template <class SchedulerArgs> void set_tile_order(SchedulerArgs& sched) {
  using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
  if (const char* e = std::getenv("LLMTRAIN_RMSLIN_SWIZZLE"); e && e[0]) {
    const std::string v = e;
    if (v != "1" && v != "2" && v != "4" && v != "8")
      throw std::runtime_error("rmsnorm_linear (CUDA): LLMTRAIN_RMSLIN_SWIZZLE=" + v + " is not 1, 2, 4 or 8");
    sched.max_swizzle_size = std::atoi(e);
  }
  if (const char* e = std::getenv("LLMTRAIN_RMSLIN_RASTER"); e && e[0]) {
    const std::string v = e;
    if (v != "m" && v != "n") throw std::runtime_error("rmsnorm_linear (CUDA): LLMTRAIN_RMSLIN_RASTER=" + v + " is not m or n");
    sched.raster_order = v == "m" ? Raster::AlongM : Raster::AlongN;
  }
}

template <class Gemm> void run_gemm(typename Gemm::Arguments& args, cudaStream_t s, const char* what, bool pdl = false) {
  static std::atomic<bool> attr_set[64] = {};
  set_tile_order(args.scheduler);
  Gemm op;
  if (op.can_implement(args) != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): CUTLASS cannot run ") + what + " on this problem");
  const size_t ws = Gemm::get_workspace_size(args);
  DeviceBuffer<uint8_t> workspace(ws, s);
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  const bool once = dev >= 0 && dev < 64 && ws == 0 && attr_set[dev].load(std::memory_order_acquire);
  const cutlass::Status st = once ? op.update(args, workspace.get()) : op.initialize(args, workspace.get(), s);
  if (st != cutlass::Status::kSuccess) {
    check_launch(what);
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): CUTLASS initialize failed for ") + what);
  }
  if (!once && dev >= 0 && dev < 64) attr_set[dev].store(true, std::memory_order_release);
  if (op.run(s, nullptr, pdl) != cutlass::Status::kSuccess) {
    check_launch(what);
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): CUTLASS launch failed for ") + what);
  }
  check_launch(what);
  workspace.release(s);
}

// A TMA warp-specialized cooperative GEMM, fp32 accumulation, D row-major, with fusion Fusion.
template <class Element, class LayoutA, class LayoutB, class TileShape, class ClusterShape, class Fusion,
          class KernelSched = cutlass::gemm::KernelTmaWarpSpecializedCooperative,
          class EpiSched = cutlass::epilogue::TmaWarpSpecializedCooperative>
struct GemmCfg {
  static constexpr int Align = 16 / sizeof(Element);
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, Align,
      Element, cutlass::layout::RowMajor, Align, EpiSched, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, Align, Element, LayoutB, Align, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

inline cutlass::KernelHardwareInfo hw_info() {
  cutlass::KernelHardwareInfo hw;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  hw.device_id = dev;
  hw.sm_count = sm_count(dev);
  return hw;
}

// D[M, N] = A · B with fp32 accumulation and no epilogue fusion (the backward's dgrad and wgrad):
// A is [M, K] in LayoutA with leading dimension lda, B is [K, N] row-major with leading dimension ldb,
// D row-major with leading dimension N. 128x256x64 tiles, cluster 2x1.
template <class Element, class LayoutA>
void plain_gemm(const void* a, int64_t lda, const void* b, int64_t ldb, void* d, int64_t M, int64_t N, int64_t K,
                cudaStream_t s, const char* what, bool pdl = false) {
  using Fusion = cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>;
  using Cfg = GemmCfg<Element, LayoutA, cutlass::layout::RowMajor, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Fusion>;
  using Gemm = typename Cfg::Gemm;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {(int)M, (int)N, (int)K, 1},
      {static_cast<const Element*>(a), ld_stride<typename Cfg::StrideA>(lda), static_cast<const Element*>(b),
       ld_stride<typename Cfg::StrideB>(ldb)},
      {{}, nullptr, ld_stride<typename Cfg::StrideC>(N), static_cast<Element*>(d),
       ld_stride<typename Cfg::StrideD>(N)},
      hw_info()};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  run_gemm<Gemm>(args, s, what, pdl);
}

}  // namespace sm90
}  // namespace rmslin
}  // namespace llmtrain
