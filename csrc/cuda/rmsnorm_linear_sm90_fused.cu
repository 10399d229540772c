// Forward of RMSNorm + Linear on sm_90a as ONE GEMM kernel (v3, bf16): no pre-pass.
//
// The CUTLASS TMA + wgmma cooperative mainloop is extended: after each A tile (x rows) lands in
// shared memory, the consumer warps read it once (16-byte vectors, conflict-free under the 128B
// swizzle), accumulate sum(x^2) per row in fp32, multiply the tile by g in place (so the GEMM sees
// x diag(g) and W stays untouched: no wg workspace), fence the writes into the async proxy and only
// then issue the wgmma. After the last k tile, rstd = 1/sqrt(sum/k + eps) per row goes to shared
// memory and scales the accumulators; a small epilogue visitor node writes rstd to global memory
// (the consumer only learns the tile coordinate in the epilogue) and the epilogue adds the bias.
// Each row's sum is recomputed by every N tile of that row: redundant ALU work, no extra DRAM.
//
// v5 (kMode = kSplit, LLMTRAIN_RMSLIN_FWD=v5): the read-only variant's row sums, split over the N tiles
// of each row block instead of repeated by every one of them. With nsplit = min(N tiles, k tiles),
// N tile n < nsplit reads only the k tiles kt with kt % nsplit == n (1/nsplit of the shared-memory
// reads and barriers that made ro 19 us slower than the plain GEMM), writes its 128 partial sums to
// a workspace and counts itself in once per row block; every N tile then waits for the nsplit
// counts and adds the partials in slice order, so every tile (and every run) gets the same rstd.
// The mainloop learns its tile coordinate from the producer warp (a small shared-memory ring written
// before the tile's first stage is armed; mbarrier arrive/wait order it). Cross-CTA waiting is
// deadlock-free because (1) the grid is no larger than the co-resident clusters
// (cudaOccupancyMaxActiveClusters; rounded down to whole row blocks, sm90_fwd_v5_clusters), (2) the persistent scheduler rasters along N with no swizzle, so
// a row block's N tiles are consecutive in every CTA's tile order, and (3) a CTA only waits after its
// own mainloop: a tile's wait depends on sibling mainloops at most nN - 1 tiles ahead of it, which
// depend only on epilogues at least a whole wave earlier. A bounded spin turns any violation into a
// trap instead of a hang.
#include <algorithm>
#include <atomic>
#include <stdexcept>

#include "rmsnorm_linear_sm90.cuh"
#include "rmsnorm_linear_common.cuh"

#if defined(LLMTRAIN_WITH_CUTE)
#include "cutlass/arch/barrier.h"
#include "rmsnorm_linear_sm90_gemm.cuh"
#include "rmsnorm_linear_sm90_rstd.cuh"
#endif

namespace llmtrain {
namespace rmslin {

#if defined(LLMTRAIN_WITH_CUTE)
namespace sm90 {

CUTLASS_DEVICE uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
CUTLASS_DEVICE void sts128(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// x chunk (8 bf16 in u32 pairs) -> adds x^2 to ss, returns x * g rounded to bf16.
CUTLASS_DEVICE uint32_t scale_pair(uint32_t xv, uint32_t gv, float& ss) {
  const __nv_bfloat162 x2 = *reinterpret_cast<const __nv_bfloat162*>(&xv);
  const __nv_bfloat162 g2 = *reinterpret_cast<const __nv_bfloat162*>(&gv);
  const float2 xf = __bfloat1622float2(x2);
  const float2 gf = __bfloat1622float2(g2);
  ss = fmaf(xf.x, xf.x, ss);
  ss = fmaf(xf.y, xf.y, ss);
  const __nv_bfloat162 o = __floats2bfloat162_rn(xf.x * gf.x, xf.y * gf.y);
  return *reinterpret_cast<const uint32_t*>(&o);
}

// nanoseconds since an arbitrary epoch (wall clock, unaffected by SM clock changes)
CUTLASS_DEVICE uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spin until *count >= target (acquire, GPU scope); trap (a launch failure) after 10 s rather than hang.
CUTLASS_DEVICE void wait_for_count(const unsigned* count, unsigned target) {
  const uint64_t t0 = global_ns();
  for (;;) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
    if (v >= target) return;
    __nanosleep(64);
    // (no printf: a call in the consumer makes ptxas serialize every wgmma of the kernel)
    if (global_ns() - t0 > 10000000000ull) __trap();
  }
}

enum : int { kScaleInPlace = 0, kReadOnly = 1, kSplit = 2 };

// The builder's mainloop with the row reduction and the g scaling added to the consumer side.
// kScaleInPlace: x diag(g) written over the A tiles (v3). kReadOnly: the row sums only (B is already
// W diag(g)); a read-only variant for A/B timing. kSplit: v5, the read-only sums split over the N
// tiles of a row block (top of the file).
template <class Base, int kMode> struct RmsNormMainloop : Base {
  static constexpr bool kScaleA = kMode == kScaleInPlace;
  static constexpr bool kSplitSums = kMode == kSplit;
  // tile coordinates handed from the producer warp to the consumers (see load())
  // (512 bytes, so that the kernel's static shared memory stays 1 KiB, a multiple of 128: the dynamic
  // shared memory that holds the TMA stages starts after it, and a 560-byte total misaligned them:
  // "misaligned address" on the H100)
  static constexpr int kRing = Base::DispatchPolicy::Stages + 2;
  static_assert(kRing <= 64, "ring slots");
  static CUTLASS_DEVICE int2* tile_coord_ring() {
    __shared__ __align__(128) int2 ring[64];
    return ring;
  }
  int tiles_seen_ = 0;  // per role: the producer's and the consumers' copies count their own tiles

  using typename Base::ElementA;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using typename Base::TiledMma;

  static_assert(cute::is_same_v<ElementA, cutlass::bfloat16_t>, "fused forward is bf16 only");
  static_assert(size<0>(TileShape{}) == 128 && size<2>(TileShape{}) == 64, "row mapping assumes 128x?x64 tiles");
  static_assert(size(TiledMma{}) == 256, "two consumer warpgroups");
  static_assert(Base::K_PIPE_MMAS == 1, "release schedule below mirrors K_PIPE_MMAS == 1");

  struct Arguments : Base::Arguments {
    const cutlass::bfloat16_t* g = nullptr;  // norm weight [K]
    int k = 0;
    float eps = 0.f;
    // kSplit: partial sums [nsplit][rows] and one zeroed counter per 128-row block (cluster-padded)
    float* partials = nullptr;
    unsigned* counts = nullptr;
    int rows = 0;
    int nsplit = 1;
  };
  struct Params : Base::Params {
    const cutlass::bfloat16_t* g;
    int k;
    float eps;
    float* partials;
    unsigned* counts;
    int rows;
    int nsplit;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& ps, Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(ps, args, workspace);
    p.g = args.g;
    p.k = args.k;
    p.eps = args.eps;
    p.partials = args.partials;
    p.counts = args.counts;
    p.rows = args.rows;
    p.nsplit = args.nsplit;
    return p;
  }

  // Producer: record this tile's (m, n) for the consumers, then the base's TMA loads. Every lane
  // writes the same value; the elected lane's write precedes its arrive on the tile's first full
  // barrier (release), which the consumers' wait acquires. The ring is Stages + 2 deep: the producer
  // cannot get that many tiles ahead without a consumer release of the slot's tile.
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    if constexpr (kSplitSums) {
      tile_coord_ring()[tiles_seen_ % kRing] = make_int2(int(get<0>(blk_coord)), int(get<1>(blk_coord)));
      ++tiles_seen_;
      __syncwarp();
    }
    Base::load(params, pipeline, smem_pipe_write, load_inputs, blk_coord, k_tile_iter, k_tile_count, thread_idx,
               block_rank_in_cluster, shared_tensors);
  }

  // Consumer: 256 threads (two warpgroups). Thread t handles tile row t/2, columns 32*(t%2)..+31 of
  // every A tile (four 16-byte chunks).
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr int MmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCsA = thread_mma.partition_A(sA);
    Tensor tCsB = thread_mma.partition_B(sB);
    Tensor tCrA = thread_mma.make_fragment_A(tCsA);
    Tensor tCrB = thread_mma.make_fragment_B(tCsB);

    const int row = thread_idx >> 1, half = thread_idx & 1;
    // Shared-memory byte address of chunk q (0..3) of this thread's row in stage s: the swizzle
    // permutes 16-byte chunks only, so 8 consecutive elements stay contiguous.
    auto chunk_addr = [&](int q, int s) {
      return static_cast<uint32_t>(__cvta_generic_to_shared(&sA(row, half * 32 + q * 8, s)));
    };
    const uint4* g4 = reinterpret_cast<const uint4*>(params.g);
    const int k8 = params.k / 8;
    float ss = 0.f;
    const uint32_t bar = 0;  // user named barrier 0 (offset past CUTLASS's reserved ids)

    // v5: which k tiles this tile sums (those with kt % nsplit == n; none when n >= nsplit), known
    // after the first wait (tile_coord_ring). Other modes sum every k tile.
    int2 coord = make_int2(0, 0);
    int slice = 0, nsplit = 1;
    bool first = true;

    // Wait for k tile kt (stage of smem_pipe_read), apply the row sums and g in place, publish to wgmma.
    auto wait_and_transform = [&](int kt) {
      // g for this tile's columns (issued before the wait so the latency overlaps it).
      uint4 gv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int c8 = kt * 8 + half * 4 + q;
        gv[q] = (kScaleA && c8 < k8) ? __ldg(g4 + c8) : make_uint4(0, 0, 0, 0);
      }
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      const int stage = smem_pipe_read.index();
      if constexpr (kSplitSums) {
        if (first) {
          coord = tile_coord_ring()[tiles_seen_ % kRing];
          ++tiles_seen_;
          nsplit = params.nsplit;
          slice = coord.y;
          first = false;
        }
        if (slice >= nsplit || kt % nsplit != slice) return stage;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t a = chunk_addr(q, stage);
        uint4 v = lds128(a);
        v.x = scale_pair(v.x, gv[q].x, ss);
        v.y = scale_pair(v.y, gv[q].y, ss);
        v.z = scale_pair(v.z, gv[q].z, ss);
        v.w = scale_pair(v.w, gv[q].w, ss);
        if constexpr (kScaleA) sts128(a, v);
      }
      // Generic-proxy writes -> visible to wgmma (async proxy), then all 256 consumers agree the
      // whole tile is rewritten before any wgmma on it is issued (read-only modes: every consumer's
      // reads of the stage are done before any of them can release it).
      if constexpr (kScaleA) cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(256, bar);
      return stage;
    };

    // Same schedule as the base mainloop (K_PIPE_MMAS = 1): the first tile peeled (accumulators
    // zeroed), then one wgmma batch in flight, releasing the previous stage once it completes.
    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    {
      const int read_stage = wait_and_transform(0);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, read_stage), tCrB(_, _, k_block, read_stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
    }
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int kt = 1; kt < k_tile_count; ++kt) {
      const int read_stage = wait_and_transform(kt);
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      cute::gemm(tiled_mma, tCrA(_, _, _, read_stage), tCrB(_, _, _, read_stage), accum);
      warpgroup_commit_batch();
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_read;
      ++smem_pipe_release;
    }
    warpgroup_fence_operand(accum);
    // mma_tail() releases the last stage after its own warpgroup_wait<0>().
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);

    ss += __shfl_xor_sync(0xFFFFFFFF, ss, 1);
    float* srstd = tile_rstd_smem();
    if constexpr (kSplitSums) {
      // Publish this slice's partial sums, count in, wait for the row block's nsplit slices.
      const int grow = coord.x * 128 + row;
      if (slice < nsplit) {
        if (half == 0 && grow < params.rows) params.partials[(int64_t)slice * params.rows + grow] = ss;
        __threadfence();
        cutlass::arch::NamedBarrier::sync(256, bar);
        if (thread_idx == 0) atomicAdd(params.counts + coord.x, 1u);
      }
      if (thread_idx == 0) wait_for_count(params.counts + coord.x, (unsigned)nsplit);
      cutlass::arch::NamedBarrier::sync(256, bar);  // the counts are in; previous tile's epilogue readers done
      if (half == 0) {
        float tot = 0.f;
        if (grow < params.rows)
          for (int sl = 0; sl < nsplit; ++sl) tot += __ldcg(params.partials + (int64_t)sl * params.rows + grow);
        srstd[row] = 1.f / sqrtf(tot / (float)params.k + params.eps);
      }
    } else {
      cutlass::arch::NamedBarrier::sync(256, bar);  // previous tile's readers (epilogue) are done
      if (half == 0) srstd[row] = 1.f / sqrtf(ss / (float)params.k + params.eps);
    }
    cutlass::arch::NamedBarrier::sync(256, bar);
    Tensor cC = make_identity_tensor(take<0, 2>(TileShape{}));
    Tensor tCcC = tiled_mma.get_slice(thread_idx).partition_C(cC);
    CUTE_STATIC_ASSERT_V(size(tCcC) == size(accum));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accum); ++i) accum(i) *= srstd[get<0>(tCcC(i))];
    warpgroup_fence_operand(accum);
  }
};

// bf16 only (the in-place g scaling converts bf16); 1 KiB carved out for tile_rstd_smem().
using FusedFwdTypes = RstdFwdTypes<cutlass::bfloat16_t, 1024>;

// Clusters of this kernel that can be resident at once (cached per device). v5's cross-CTA wait
// needs every CTA of the persistent grid resident, so the grid is sized from this, not from the
// SM count (2-CTA clusters cannot use every SM of a GPC with an odd count).
template <class Kernel> int co_resident_clusters() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= 0 && dev < 64 && cache[dev].load()) return cache[dev].load();
  const void* fn = reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>);
  const int smem = (int)Kernel::SharedStorageSize;
  check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = size<0>(typename Kernel::ClusterShape{});
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(attr.val.clusterDim.x, 1, 1);
  cfg.blockDim = dim3(Kernel::MaxThreadsPerBlock, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  check(cudaOccupancyMaxActiveClusters(&clusters, fn, &cfg), "cudaOccupancyMaxActiveClusters");
  if (clusters <= 0) throw std::runtime_error("rmsnorm_linear (CUDA): the v5 forward GEMM cannot be resident");
  if (dev >= 0 && dev < 64) cache[dev].store(clusters);
  return clusters;
}

struct SplitSums {
  float* partials = nullptr;
  unsigned* counts = nullptr;
  int nsplit = 1;
  int clusters = 0;
};

template <int kMode> struct FusedKernel {
  using Element = FusedFwdTypes::Element;
  using Mainloop = RmsNormMainloop<FusedFwdTypes::BaseMainloop, kMode>;
  using Epilogue = FusedFwdTypes::Epilogue;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// split.clusters (kSplit): the persistent grid in clusters, a multiple of the N tiles per row block
// (sm90_fwd_v5_clusters).
template <int kMode>
void fwd_fused_bf16(const void* x, const void* g, const void* w, float* rstd, const void* bias, void* y, int64_t n,
                    int64_t k, int64_t m, float eps, cudaStream_t s, SplitSums split = {}) {
  using Element = typename FusedKernel<kMode>::Element;
  using Mainloop = typename FusedKernel<kMode>::Mainloop;
  using Kernel = typename FusedKernel<kMode>::Kernel;
  using Gemm = typename FusedKernel<kMode>::Gemm;

  typename Mainloop::Arguments ml;
  ml.ptr_A = static_cast<const Element*>(x);
  ml.dA = ld_stride<typename Kernel::StrideA>(k);
  ml.ptr_B = static_cast<const Element*>(w);
  ml.dB = ld_stride<typename Kernel::StrideB>(k);
  ml.g = static_cast<const Element*>(g);
  ml.k = (int)k;
  ml.eps = eps;
  ml.partials = split.partials;
  ml.counts = split.counts;
  ml.rows = (int)n;
  ml.nsplit = split.nsplit;
  cutlass::KernelHardwareInfo hw = hw_info();
  if constexpr (kMode == kSplit) hw.max_active_clusters = split.clusters;
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {(int)n, (int)m, (int)k, 1},
                                ml,
                                {{}, nullptr, ld_stride<typename Kernel::StrideC>(m), static_cast<Element*>(y),
                                 ld_stride<typename Kernel::StrideD>(m)},
                                hw};
  args.epilogue.thread = {
      {rstd},                                               // rstd store (acc pass-through)
      {static_cast<const Element*>(bias), Element(0), {}},  // bias per column (row broadcast), null -> 0
      {}};
  if constexpr (kMode == kSplit) {  // a row block's N tiles consecutive in every CTA's order (top of file)
    args.scheduler.raster_order = Kernel::TileScheduler::RasterOrderOptions::AlongN;
    args.scheduler.max_swizzle_size = 1;
  }
  run_gemm<Gemm>(args, s, "fused forward GEMM");
}

}  // namespace sm90
#endif

bool sm90_fwd_fused_available(DType dtype) {
#if defined(LLMTRAIN_WITH_CUTE)
  return dtype == DType::BF16;
#else
  (void)dtype;
  return false;
#endif
}

void sm90_gemm_fwd_fused(DType dtype, const void* x, const void* g, const void* w, float* rstd, const void* bias,
                         void* y, int64_t n, int64_t k, int64_t m, float eps, cudaStream_t s) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if (dtype == DType::BF16) {
    if (g) return sm90::fwd_fused_bf16<sm90::kScaleInPlace>(x, g, w, rstd, bias, y, n, k, m, eps, s);
    return sm90::fwd_fused_bf16<sm90::kReadOnly>(x, g, w, rstd, bias, y, n, k, m, eps, s);
  }
#endif
  (void)dtype; (void)x; (void)g; (void)w; (void)rstd; (void)bias; (void)y; (void)n; (void)k; (void)m; (void)eps; (void)s;
  throw std::runtime_error("rmsnorm_linear (CUDA): fused sm_90a forward not built for this dtype");
}

// v5 geometry: 128 x 256 x 64 tiles, 2-CTA clusters along the rows.
int sm90_fwd_v5_nsplit(int64_t k, int64_t m) {
  return (int)std::max<int64_t>(1, std::min<int64_t>((m + 255) / 256, (k + 63) / 64));
}
int64_t sm90_fwd_v5_counts(int64_t n) { return (n + 255) / 256 * 2; }

// The grid, in 2-CTA clusters: the most co-resident clusters that are a whole number of row blocks'
// N tiles (nN), so that no row block's tiles straddle two waves of the persistent grid. (Straddling
// makes the tiles of one wave wait a whole tile for their siblings of the next, and the delay
// cascades: 230 us against 181 at 16384 x 2048 -> 2048 on an H100 with 66 clusters and nN = 8.)
// Those shapes lose nothing: 512 cluster tiles take 8 waves of 64 clusters as of 66. 0: more N
// tiles than resident clusters, v5 does not apply.
int sm90_fwd_v5_clusters(int64_t m) {
#if defined(LLMTRAIN_WITH_CUTE)
  const int resident = sm90::co_resident_clusters<sm90::FusedKernel<sm90::kSplit>::Kernel>();
  const int64_t nN = (m + 255) / 256;
  return nN > resident ? 0 : (int)(resident / nN * nN);
#else
  (void)m;
  return 0;
#endif
}

void sm90_gemm_fwd_v5(DType dtype, const void* x, const void* wg, float* rstd, const void* bias, void* y, int64_t n,
                      int64_t k, int64_t m, float eps, float* partials, unsigned* counts, int clusters,
                      cudaStream_t s) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (clusters <= 0 || clusters % ((m + 255) / 256) != 0)
    throw std::runtime_error("rmsnorm_linear (CUDA): v5 grid must be a whole number of row blocks' N tiles");
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if (dtype == DType::BF16) {
    sm90::SplitSums split;
    split.partials = partials;
    split.counts = counts;
    split.nsplit = sm90_fwd_v5_nsplit(k, m);
    split.clusters = clusters;
    return sm90::fwd_fused_bf16<sm90::kSplit>(x, nullptr, wg, rstd, bias, y, n, k, m, eps, s, split);
  }
#endif
  (void)dtype; (void)x; (void)wg; (void)rstd; (void)bias; (void)y; (void)n; (void)k; (void)m; (void)eps;
  (void)partials; (void)counts; (void)clusters; (void)s;
  throw std::runtime_error("rmsnorm_linear (CUDA): v5 sm_90a forward not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
