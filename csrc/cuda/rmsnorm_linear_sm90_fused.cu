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

// The builder's mainloop with the row reduction and the g scaling added to the consumer side.
// kScaleA = false: the row sums only (B is already W diag(g)); a read-only variant for A/B timing. It reads
// each stage after issuing that stage's wgmma, so the reads overlap the MMA (session 18: GEMM 197.6 us
// against 199.8 with the reads before the issue; the plain GEMM 182: the extra 16 KB of shared-memory
// reads per stage, not their latency, is what the sums cost).
template <class Base, bool kScaleA> struct RmsNormMainloop : NormArgsMainloop<Base> {
  using typename NormArgsMainloop<Base>::Params;
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
    float ss = 0.f, ss2 = 0.f;
    const uint32_t bar = 0;  // user named barrier 0 (offset past CUTLASS's reserved ids)

    // The read-only variant's row sums of one stage: issued after that stage's wgmma, so the reads
    // and FFMAs overlap the MMA instead of delaying its issue (the stage stays valid until it is
    // released, after the next stage's wgmma has been waited for). Two partial sums per thread
    // halve the FFMA chain.
    auto sum_stage = [&](int stage) {
      uint4 v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = lds128(chunk_addr(q, stage));
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        add_squares(v[q].x, ss);
        add_squares(v[q].y, ss2);
        add_squares(v[q].z, ss);
        add_squares(v[q].w, ss2);
      }
    };

    // Wait for k tile kt (stage of smem_pipe_read); v3 then applies the row sums and g in place and
    // publishes the tile to wgmma. The read-only variant only waits (sum_stage runs after the issue).
    auto wait_and_transform = [&](int kt) {
      if constexpr (!kScaleA) {
        (void)kt;
        auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
        pipeline.consumer_wait(smem_pipe_read, barrier_token);
        return smem_pipe_read.index();
      } else {
        // g for this tile's columns (issued before the wait so the latency overlaps it).
        uint4 gv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int c8 = kt * 8 + half * 4 + q;
          gv[q] = c8 < k8 ? __ldg(g4 + c8) : make_uint4(0, 0, 0, 0);
        }
        auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
        pipeline.consumer_wait(smem_pipe_read, barrier_token);
        const int stage = smem_pipe_read.index();
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint32_t a = chunk_addr(q, stage);
          uint4 v = lds128(a);
          v.x = scale_pair(v.x, gv[q].x, ss);
          v.y = scale_pair(v.y, gv[q].y, ss);
          v.z = scale_pair(v.z, gv[q].z, ss);
          v.w = scale_pair(v.w, gv[q].w, ss);
          sts128(a, v);
        }
        // Generic-proxy writes -> visible to wgmma (async proxy), then all 256 consumers agree the
        // whole tile is rewritten before any wgmma on it is issued.
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::sync(256, bar);
        return stage;
      }
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
      if constexpr (!kScaleA) sum_stage(read_stage);
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
      if constexpr (!kScaleA) sum_stage(read_stage);
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

    ss += ss2;
    ss += __shfl_xor_sync(0xFFFFFFFF, ss, 1);
    float* srstd = tile_rstd_smem();
    cutlass::arch::NamedBarrier::sync(256, bar);  // previous tile's readers (epilogue) are done
    if (half == 0) srstd[row] = 1.f / sqrtf(ss / (float)params.k + params.eps);
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

template <bool kScaleA>
void fwd_fused_bf16(const void* x, const void* g, const void* w, float* rstd, const void* bias, void* y, int64_t n,
                    int64_t k, int64_t m, float eps, cudaStream_t s) {
  using Mainloop = RmsNormMainloop<FusedFwdTypes::BaseMainloop, kScaleA>;
  run_rstd_fwd<FusedFwdTypes, Mainloop>(x, g, w, rstd, bias, y, n, k, m, eps, s, "fused forward GEMM");
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
    if (g) return sm90::fwd_fused_bf16<true>(x, g, w, rstd, bias, y, n, k, m, eps, s);
    return sm90::fwd_fused_bf16<false>(x, g, w, rstd, bias, y, n, k, m, eps, s);
  }
#endif
  (void)dtype; (void)x; (void)g; (void)w; (void)rstd; (void)bias; (void)y; (void)n; (void)k; (void)m; (void)eps; (void)s;
  throw std::runtime_error("rmsnorm_linear (CUDA): fused sm_90a forward not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
