// Forward of RMSNorm + Linear on sm_90a as ONE GEMM kernel with the A operand in registers (v6, bf16).
//
// y = rstd[row] * ((x diag(g)) . W^T) + bias, rstd = 1 / sqrt(mean(x^2) + eps), no pre-pass.
//
// Why registers: v3 (rmsnorm_linear_sm90_fused.cu) and its read-only variant read each x tile from
// shared memory a second time in the consumer warps and then met at a named barrier before every
// wgmma, which cost 90 us (v3, with in-place writes) and 19 us (read-only) on the H100. Here the x
// tile goes from shared memory into registers with ldmatrix -- the read the wgmma would do anyway in
// its smem-smem form -- and the wgmma takes A from those registers (the "RS" form, as CUTLASS's
// mixed-input GEMMs do). Each thread then has its own x values in hand: it adds x^2 to per-row fp32
// sums and multiplies x by g (one packed bf16 multiply per pair; the product of two bf16 rounded
// once, as the fp32 product rounded to bf16 would be) before issuing the wgmma. No extra
// shared-memory traffic, no barrier, and W is used as it is (no W diag(g) workspace).
//
// Every N tile of a row block recomputes that block's sums from its own x tiles: redundant ALU work,
// no cross-CTA traffic. After the last k tile the quad of lanes holding a row adds its four partial
// sums in a fixed order (bitwise repeatable), rstd goes to shared memory, scales the accumulators,
// and the epilogue node of rmsnorm_linear_sm90_rstd.cuh writes rstd[row] once per row block.
//
// kScaleA = false: the same kernel without the g multiply, for a W diag(g) folded by the caller
// (A/B timing of the multiply).
//
// Measured (H100, docs/perf.md session 16): 194 us at 16384 x 2048 -> 2048 against the default's
// GEMM 181 + pre-pass 34; slower than the default at 5632 / 8192 outputs, so it stays opt-in
// (LLMTRAIN_RMSLIN_FWD=v6 / v6ro).
#include <stdexcept>

#include "rmsnorm_linear_sm90.cuh"
#include "rmsnorm_linear_common.cuh"

#if defined(LLMTRAIN_WITH_CUTE)
#include "rmsnorm_linear_sm90_gemm.cuh"
#include "rmsnorm_linear_sm90_rstd.cuh"
#endif

namespace llmtrain {
namespace rmslin {

#if defined(LLMTRAIN_WITH_CUTE)
namespace sm90 {

CUTLASS_DEVICE uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// The norm weight for the register-A multiply, staged in shared memory once per output tile (k up to
// kMaxStagedK; larger k takes the W diag(g) variant). Registers were tried first: holding the next
// tile's g in registers cost 40% (ptxas reused their registers for ldmatrix, which then waited on
// the global loads every tile).
constexpr int kMaxStagedK = static_cast<int>(kRegAMaxStagedK);
CUTLASS_DEVICE uint32_t* staged_g_smem() {
  __shared__ uint4 s[kMaxStagedK / 8];
  return reinterpret_cast<uint32_t*>(s);
}

// The builder's smem-smem mainloop (same stages, same TMA producer) with a register-A consumer.
template <class Base, bool kScaleA> struct RmsNormRegAMainloop : NormArgsMainloop<Base> {
  using typename NormArgsMainloop<Base>::Params;
  using typename Base::ElementA;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  static_assert(cute::is_same_v<ElementA, cutlass::bfloat16_t>, "register-A forward is bf16 only");
  static_assert(size<0>(TileShape{}) == 128 && size<2>(TileShape{}) == 64, "two 64-row warpgroups, 64-wide k tiles");
  static_assert(size(typename Base::TiledMma{}) == 256, "two consumer warpgroups");
  static_assert(Base::K_PIPE_MMAS == 1, "the base mma_tail releases exactly one stage");

  // Same warpgroup layout as the base's smem-smem MMA (two warpgroups along M), A from registers:
  // the accumulator fragment is identical, so the kernel's accumulators fit this MMA.
  using RegAMma = decltype(make_tiled_mma(
      GMMA::rs_op_selector<ElementA, ElementA, float, TileShape, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    using namespace cute;
    static_assert(cosize(SmemLayoutA{}) == 128 * 64 * size<2>(SmemLayoutA{}), "stages of 128 x 64, back to back");
    const uint32_t smem_a = static_cast<uint32_t>(__cvta_generic_to_shared(shared_tensors.smem_A.data()));
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M, BLK_K, PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr int kWarpGroups = size(RegAMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);

    RegAMma tiled_mma;
    auto thread_mma = tiled_mma.get_thread_slice(thread_idx);
    auto group_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    // The wgmma's A registers, one slot per 16-wide k block. Slot b is only written (by ldmatrix,
    // then the x * g multiply) once the wgmma that last read it has retired: a non-wgmma
    // definition of a register an in-flight wgmma may still read makes ptxas serialize every wgmma
    // of the kernel (C7513), and it would be a race.
    Tensor tCrA = thread_mma.partition_fragment_A(sA(_, _, Int<0>{}));  // (MMA, MMA_M, MMA_K) registers
    Tensor tCrA_odd = make_fragment_like(tCrA);  // odd k tiles: two register sets, one batch in flight
    Tensor tCsB = group_mma.partition_B(sB);                            // (MMA, MMA_N, MMA_K, PIPE)
    Tensor tCrB = group_mma.make_fragment_B(tCsB);                      // descriptors
    // This thread's A values (the wgmma register layout, per warp that of mma.m16n8k16): rows
    // row0 and row0 + 8 of the warp's 16, k columns 2q, 2q + 1 and 2q + 8, 2q + 9 of each 16-wide
    // block; word p of a block holds (row0 + 8 (p & 1), 2q + 8 (p >> 1)).
    const int lane = thread_idx & 31;
    const int row0 = (thread_idx / 32) * 16 + lane / 4;  // warps 0-3: rows 0-63, warps 4-7: rows 64-127
    const int col0 = 2 * (lane & 3);
    // ldmatrix.x4 source: lane l points at row (l & 7) + 8 ((l >> 3) & 1) of the warp's 16 and the
    // 8-wide k chunk 2 kb + (l >> 4). TMA's 128B swizzle XORs the chunk index with address bits 7-9,
    // not with the row: the stages start only 512 bytes past a 1 KiB boundary here (the static
    // shared memory before them), and the row mod 8 read every k block 32 columns off.
    const int ld_row = (thread_idx / 32) * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
    const int ld_chunk = lane >> 4;
    constexpr int kBlocks = size<2>(decltype(tCrA){});
    static_assert(size<1>(decltype(tCrA){}) == 1, "one 64-row MMA per warpgroup");
    constexpr int kPairs = size<0>(decltype(tCrA){}) / 2;  // bf16 pairs per thread per k block
    static_assert(kPairs == 4, "four words per thread per 64 x 16 block");

    float ss[kPairs];  // x^2 sums per value pair (each pair lies in one row)
    CUTLASS_PRAGMA_UNROLL
    for (int p = 0; p < kPairs; ++p) ss[p] = 0.f;
    // g, staged once per output tile: the previous tile's readers are past the barrier that ended
    // its mainloop (below), so the copy may overwrite; the second barrier publishes it.
    const uint32_t* g_words = staged_g_smem();
    if constexpr (kScaleA) {
      cutlass::arch::NamedBarrier::sync(256, 0);
      const uint4* g4 = reinterpret_cast<const uint4*>(params.g);
      uint4* dst = reinterpret_cast<uint4*>(staged_g_smem());
      for (int i = thread_idx; i < params.k / 8; i += 256) dst[i] = __ldg(g4 + i);
      cutlass::arch::NamedBarrier::sync(256, 0);
    }
    // Fills slot kb from stage `stage`: ldmatrix, x^2 into the row sums, then x * g (or x itself).
    auto load_block = [&](auto& frag, int stage, int kt, int kb) {
      // k is a multiple of 8 and the pairs are even, so a pair is wholly in or past k (x is zero there).
      uint32_t g_pair[2] = {0u, 0u};
      if constexpr (kScaleA) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int col = kt * size<2>(TileShape{}) + kb * 16 + col0 + 8 * h;
          if (col < params.k) g_pair[h] = g_words[col / 2];
        }
      }
      const uint32_t row_addr = smem_a + static_cast<uint32_t>((stage * 128 + ld_row) * 128);
      const uint32_t addr = row_addr + ((static_cast<uint32_t>(2 * kb + ld_chunk) ^ ((row_addr >> 7) & 7)) << 4);
      uint32_t raw[kPairs];
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(raw[0]), "=r"(raw[1]), "=r"(raw[2]), "=r"(raw[3])
                   : "r"(addr));
      Tensor op = recast<uint32_t>(frag(_, 0, kb));
      CUTLASS_PRAGMA_UNROLL
      for (int p = 0; p < kPairs; ++p) {
        add_squares(raw[p], ss[p]);
        op(p) = kScaleA ? mul_bf16x2(raw[p], g_pair[p >> 1]) : raw[p];
      }
    };

    // Schedule: one wgmma batch per k tile, as the smem-smem mainloop issues them, with the A
    // registers in two sets by tile parity: tile kt's set is filled while tile kt - 1's batch runs
    // (its own last reader, tile kt - 2's batch, is retired by the wait). Tile kt - 2's stage is
    // released then; after the loop the second-to-last, and the last by the base's mma_tail.
    // The accumulators are zeroed here rather than by a first wgmma with ScaleOut::Zero: a scale flag
    // that changes inside the loop is a non-wgmma definition of a wgmma input (C7513).
    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    clear(accum);
    warpgroup_fence_operand(accum);
    auto step = [&](auto& frag, int kt) {
      pipeline.consumer_wait(smem_pipe_read);
      const int stage = smem_pipe_read.index();
      ++smem_pipe_read;
      warpgroup_wait<1>();
      if (kt >= 2) {
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < kBlocks; ++kb) load_block(frag, stage, kt, kb);
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < kBlocks; ++kb) cute::gemm(tiled_mma, frag(_, _, kb), tCrB(_, _, kb, stage), accum);
      warpgroup_commit_batch();
      warpgroup_fence_operand(accum);
    };
    int kt = 0;
    CUTLASS_PRAGMA_NO_UNROLL
    for (; kt + 1 < k_tile_count; kt += 2) {
      step(tCrA, kt);
      step(tCrA_odd, kt + 1);
    }
    if (kt < k_tile_count) step(tCrA, kt);
    warpgroup_wait<0>();
    if (k_tile_count >= 2) {
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    }
    // The last stage is released by the base's mma_tail (after its own wait).
    warpgroup_fence_operand(accum);

    // Per-row sums: this thread's pairs fall in two rows; the four lanes of a quad share them.
    const int row_a = row0, row_b = row0 + 8;
    float sum_a = 0.f, sum_b = 0.f;
    CUTLASS_PRAGMA_UNROLL
    for (int p = 0; p < kPairs; ++p) (p & 1 ? sum_b : sum_a) += ss[p];
    sum_a += __shfl_xor_sync(0xFFFFFFFF, sum_a, 1);
    sum_a += __shfl_xor_sync(0xFFFFFFFF, sum_a, 2);
    sum_b += __shfl_xor_sync(0xFFFFFFFF, sum_b, 1);
    sum_b += __shfl_xor_sync(0xFFFFFFFF, sum_b, 2);
    float* srstd = tile_rstd_smem();
    const uint32_t bar = 0;  // user named barrier 0 (offset past CUTLASS's reserved ids)
    cutlass::arch::NamedBarrier::sync(256, bar);  // the previous tile's readers (epilogue) are done
    if ((thread_idx & 3) == 0) {
      const float inv_k = 1.f / (float)params.k;
      srstd[row_a] = 1.f / sqrtf(sum_a * inv_k + params.eps);
      srstd[row_b] = 1.f / sqrtf(sum_b * inv_k + params.eps);
    }
    cutlass::arch::NamedBarrier::sync(256, bar);
    Tensor cC = make_identity_tensor(take<0, 2>(TileShape{}));
    Tensor tCcC = thread_mma.partition_C(cC);
    CUTE_STATIC_ASSERT_V(size(tCcC) == size(accum));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accum); ++i) accum(i) *= srstd[get<0>(tCcC(i))];
    warpgroup_fence_operand(accum);
  }
};

// Carved out of the stages: tile_rstd_smem() (padded to 1 KiB) and staged_g_smem().
using RegAFwdTypes = RstdFwdTypes<cutlass::bfloat16_t, 1024 + kMaxStagedK * 2>;

template <bool kScaleA>
void fwd_reg_a_bf16(const void* x, const void* g, const void* w, float* rstd, const void* bias, void* y, int64_t n,
                    int64_t k, int64_t m, float eps, cudaStream_t s) {
  using Mainloop = RmsNormRegAMainloop<RegAFwdTypes::BaseMainloop, kScaleA>;
  run_rstd_fwd<RegAFwdTypes, Mainloop>(x, g, w, rstd, bias, y, n, k, m, eps, s, "register-A forward GEMM");
}

}  // namespace sm90
#endif

void sm90_gemm_fwd_reg_a(DType dtype, const void* x, const void* g, const void* w, float* rstd, const void* bias,
                         void* y, int64_t n, int64_t k, int64_t m, float eps, cudaStream_t s) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if (dtype == DType::BF16) {
    if (g) {
      if (k > sm90::kMaxStagedK) throw std::runtime_error("rmsnorm_linear (CUDA): register-A forward stages g for k <= 8192 only");
      return sm90::fwd_reg_a_bf16<true>(x, g, w, rstd, bias, y, n, k, m, eps, s);
    }
    return sm90::fwd_reg_a_bf16<false>(x, g, w, rstd, bias, y, n, k, m, eps, s);
  }
#endif
  (void)dtype; (void)x; (void)g; (void)w; (void)rstd; (void)bias; (void)y; (void)n; (void)k; (void)m; (void)eps; (void)s;
  throw std::runtime_error("rmsnorm_linear (CUDA): register-A sm_90a forward not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
