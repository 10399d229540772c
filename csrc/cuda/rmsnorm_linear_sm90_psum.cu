// Forward of RMSNorm + Linear on sm_90a with the row sums taken by the TMA producer warp ("ps").
//
// y = rstd[row] * (x . (W diag g)^T) + bias, wg = W diag(g) from a small pre-pass (m x k, not the
// n x k activations). The v3 / "ro" kernels (rmsnorm_linear_sm90_fused.cu) summed x^2 on the consumer
// warps, between a stage's arrival and its wgmma, which slowed the GEMM by ~8% (201 us against 186 at
// 16384 x 2048 -> 2048). Here the warp that issues the TMA loads does it: in the cooperative
// warp-specialized kernel its 31 other lanes idle, and it otherwise only waits for free stages. It
// reads each A stage (128 rows x 64 columns) once after the TMA lands, Stages - 1 loads behind the
// one it just issued, so a stage is always summed before the same warp refills it and the wgmma
// never waits for the sums. After a tile's last stage it hands the 128 row sums to the consumers
// through shared memory and two named barriers (full / empty, producer warp + 256 consumer threads);
// the consumers turn them into rstd, scale the accumulators and the epilogue stores rstd and adds
// the bias, as in the fused kernel.
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

// The producer's 128 row sums of the current tile (written by the producer warp, read by consumers).
CUTLASS_DEVICE float* tile_sums_smem() {
  __shared__ float s[128];
  return s;
}

// Adds the squares of the 8 16-bit values in v to acc (fp32): even elements into acc[0], odd ones
// into acc[1] (two independent FMA chains).
template <class Element> CUTLASS_DEVICE void add_squares(uint4 v, float (&acc)[2]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lo, hi;
    if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) {
      lo = __uint_as_float(w[i] << 16);  // a bf16 is the top half of its fp32
      hi = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      lo = f.x;
      hi = f.y;
    }
    acc[0] = fmaf(lo, lo, acc[0]);
    acc[1] = fmaf(hi, hi, acc[1]);
  }
}

template <class Base> struct ProducerSumMainloop : Base {
  using typename Base::DispatchPolicy;
  using typename Base::ElementA;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using typename Base::TiledMma;

  static constexpr int kRows = size<0>(TileShape{});
  static constexpr int kConsumers = size(TiledMma{});
  static constexpr int kStages = DispatchPolicy::Stages;
  // How far the sums trail the loads: at most Stages - 1, so stage s is summed before this warp's
  // next producer_acquire of s (the only way it gets overwritten).
  static constexpr int kLag = kStages - 1;
  static_assert(kRows == 128 && size<2>(TileShape{}) == 64, "row mapping assumes 128 x ? x 64 tiles");
  static_assert(sizeof(ElementA) == 2 && kConsumers == 256, "16-bit A, two consumer warpgroups");
  // User named barriers (CUTLASS offsets them past its reserved ids). 0: consumers only.
  static constexpr uint32_t kBarRstd = 0, kBarSumsFull = 1, kBarSumsEmpty = 2;
  static constexpr uint32_t kHandoffThreads = kConsumers + cutlass::NumThreadsPerWarp;

  struct Arguments : Base::Arguments {
    int k = 0;
    float eps = 0.f;
  };
  struct Params : Base::Params {
    int k;
    float eps;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& ps, Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(ps, args, workspace);
    p.k = args.k;
    p.eps = args.eps;
    return p;
  }

  int tiles_summed_ = 0;  // producer warp only: tiles whose sums it has handed over

  // Producer: the base load (TMA issue by one lane) with the whole warp summing landed A stages.
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int lane, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    const bool leader = cute::elect_one_sync();
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    constexpr uint32_t cluster_shape_x = get<0>(typename DispatchPolicy::ClusterShape());
    uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};
    Tensor gA_mkl = get<0>(load_inputs);
    Tensor gB_nkl = get<1>(load_inputs);
    auto block_tma_a = params.tma_load_a.get_slice(cluster_local_block_id.y);
    auto block_tma_b = params.tma_load_b.get_slice(cluster_local_block_id.x);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = block_tma_a.partition_S(gA_mkl(_, _, m_coord, _, l_coord));
    Tensor tAsA = block_tma_a.partition_D(sA);
    Tensor tBgB = block_tma_b.partition_S(gB_nkl(_, _, n_coord, _, l_coord));
    Tensor tBsB = block_tma_b.partition_D(sB);
    uint16_t mcast_mask_a = 0, mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int n = 0; n < size<1>(block_layout); ++n)
        mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<typename DispatchPolicy::ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m)
        mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
    }

    // Lane l sums rows l, l + 32, l + 64, l + 96. A K-major 128B-swizzled row of 64 16-bit values is
    // 128 contiguous bytes (the swizzle permutes its 16-byte chunks in place), so a row's sum needs
    // no swizzle arithmetic: read its 8 chunks in any order, here starting at chunk l % 8 so the 8
    // lanes of each shared-memory phase hit 8 different bank groups.
    const uint32_t stage0 = static_cast<uint32_t>(__cvta_generic_to_shared(&sA(0, 0, 0)));
    const uint32_t stage_bytes = static_cast<uint32_t>(__cvta_generic_to_shared(&sA(0, 0, 1))) - stage0;
    uint32_t row_base[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      row_base[q] = (static_cast<uint32_t>(__cvta_generic_to_shared(&sA(lane + 32 * q, 0, 0))) & ~127u) - stage0;
    float acc[4][2] = {};
    // The consumer-side state of the stage being summed: same slot, opposite phase parity.
    PipelineState sum_state(smem_pipe_write.index(), smem_pipe_write.phase() ^ 1, smem_pipe_write.count());

    CUTLASS_PRAGMA_NO_UNROLL
    for (int kt = 0; kt < k_tile_count + kLag; ++kt) {
      if (kt < k_tile_count) {
        if (leader) {
          pipeline.producer_acquire(smem_pipe_write);
          using BarrierType = typename MainloopPipeline::ProducerBarrierType;
          BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
          const int write_stage = smem_pipe_write.index();
          copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, write_stage));
          copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB(_, _, _, *k_tile_iter), tBsB(_, _, _, write_stage));
        }
        ++k_tile_iter;
        ++smem_pipe_write;
      }
      __syncwarp();
      if (kt >= kLag) {
        pipeline.consumer_wait(sum_state);
        const uint32_t base = stage0 + static_cast<uint32_t>(sum_state.index()) * stage_bytes;
        // Chunk by chunk across the four rows: 8 independent FMA chains per lane (a row at a time
        // was one 64-long chain per row and ran the GEMM at 1.8x its time, session 11).
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint4 v[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint32_t a = base + row_base[q] + (((j + lane) & 7) << 4);
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(v[q].x), "=r"(v[q].y), "=r"(v[q].z), "=r"(v[q].w)
                         : "r"(a));
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) add_squares<ElementA>(v[q], acc[q]);
        }
        ++sum_state;
      }
    }

    // Hand the sums over once the consumers have taken the previous tile's.
    float* sums = tile_sums_smem();
    if (tiles_summed_ > 0) cutlass::arch::NamedBarrier::sync(kHandoffThreads, kBarSumsEmpty);
#pragma unroll
    for (int q = 0; q < 4; ++q) sums[lane + 32 * q] = acc[q][0] + acc[q][1];
    cutlass::arch::NamedBarrier::arrive(kHandoffThreads, kBarSumsFull);
    ++tiles_summed_;
  }

  // The consumers' arrival on the empty barrier after the last tile is matched here, so no named
  // barrier is left half-arrived when the block exits.
  CUTLASS_DEVICE void load_tail(MainloopPipeline pipeline, PipelineState smem_pipe_write) {
    Base::load_tail(pipeline, smem_pipe_write);
    if (tiles_summed_ > 0) cutlass::arch::NamedBarrier::sync(kHandoffThreads, kBarSumsEmpty);
  }

  // Consumers: the base mainloop, then rstd from the producer's sums scales the accumulators.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    using namespace cute;
    Base::mma(pipeline, smem_pipe_read, accum, k_tile_count, thread_idx, shared_tensors, params);
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    // Needs all 256 consumers: so every consumer has also finished the previous tile's epilogue (the
    // last reader of tile_rstd_smem) before it is rewritten below.
    cutlass::arch::NamedBarrier::sync(kHandoffThreads, kBarSumsFull);
    float* srstd = tile_rstd_smem();
    if (thread_idx < kRows) srstd[thread_idx] = 1.f / sqrtf(tile_sums_smem()[thread_idx] / (float)params.k + params.eps);
    cutlass::arch::NamedBarrier::sync(kConsumers, kBarRstd);
    cutlass::arch::NamedBarrier::arrive(kHandoffThreads, kBarSumsEmpty);
    TiledMma tiled_mma;
    Tensor cC = make_identity_tensor(take<0, 2>(TileShape{}));
    Tensor tCcC = tiled_mma.get_slice(thread_idx).partition_C(cC);
    CUTE_STATIC_ASSERT_V(size(tCcC) == size(accum));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accum); ++i) accum(i) *= srstd[get<0>(tCcC(i))];
    warpgroup_fence_operand(accum);
  }
};

// 1 KiB of static shared memory: tile_rstd_smem() and tile_sums_smem().
template <class Element> void fwd_psum(const void* x, const void* wg, float* rstd, const void* bias, void* y, int64_t n,
                                       int64_t k, int64_t m, float eps, cudaStream_t s) {
  using Types = RstdFwdTypes<Element, 1024>;
  using Mainloop = ProducerSumMainloop<typename Types::BaseMainloop>;
  using Epilogue = typename Types::Epilogue;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  typename Mainloop::Arguments ml;
  ml.ptr_A = static_cast<const Element*>(x);
  ml.dA = ld_stride<typename Kernel::StrideA>(k);
  ml.ptr_B = static_cast<const Element*>(wg);
  ml.dB = ld_stride<typename Kernel::StrideB>(k);
  ml.k = (int)k;
  ml.eps = eps;
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {(int)n, (int)m, (int)k, 1},
                                ml,
                                {{}, nullptr, ld_stride<typename Kernel::StrideC>(m), static_cast<Element*>(y),
                                 ld_stride<typename Kernel::StrideD>(m)},
                                hw_info()};
  args.epilogue.thread = {
      {rstd},                                               // rstd store (acc pass-through)
      {static_cast<const Element*>(bias), Element(0), {}},  // bias per column (row broadcast), null -> 0
      {}};
  run_gemm<Gemm>(args, s, "producer-sum forward GEMM");
}

}  // namespace sm90
#endif

void sm90_gemm_fwd_psum(DType dtype, const void* x, const void* wg, float* rstd, const void* bias, void* y, int64_t n,
                        int64_t k, int64_t m, float eps, cudaStream_t s) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if (k <= 0) throw std::runtime_error("rmsnorm_linear (CUDA): the producer-sum forward needs k > 0");
  if (dtype == DType::BF16) return sm90::fwd_psum<cutlass::bfloat16_t>(x, wg, rstd, bias, y, n, k, m, eps, s);
  if (dtype == DType::F16) return sm90::fwd_psum<cutlass::half_t>(x, wg, rstd, bias, y, n, k, m, eps, s);
#endif
  (void)dtype; (void)x; (void)wg; (void)rstd; (void)bias; (void)y; (void)n; (void)k; (void)m; (void)eps; (void)s;
  throw std::runtime_error("rmsnorm_linear (CUDA): producer-sum sm_90a forward not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
