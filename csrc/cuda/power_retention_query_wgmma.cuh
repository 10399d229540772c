// v21: the forward's state query, phi(e^{g/2} s q) . S_n, on Hopper's warpgroup MMA (wgmma; sm_90a
// builds, d = 64), for chunk_out_kernel<UCV = 3>.
//
// Why: at 64K, chunk_out took 0.87 ms of a 6.7 ms forward+backward, ~180 TFLOP/s. Its v12 form
// (phi_pair_tiles) runs mma.sync m16n8k16: per 16 rows and 16 features a warp builds one A fragment,
// loads nine B fragments of the state with ldmatrix and issues nine MMAs, ~65 other instructions per
// nine HMMA (ncu, v11/v12). A wgmma m64n64k16 + m64n8k16 does the same work for the warpgroup's 64
// rows with the state read straight from shared memory: a warp still builds its A fragment in
// registers (phi_a_frag, unchanged: the same bf16 products, so the same bits reach the MMAs), but
// issues no B loads and two MMA instructions instead of nine.
//
// Layout. Features are visited as in v12: triangle rows (a, a + 1), a even, times 8-wide b-blocks
// B >= a / 8 (the k-step's k 0-7 are features (a, 8B + k), k 8-15 are (a + 1, 8B + k - 8); left of
// the diagonal the A elements are zero). Per k-step the ring holds the 16 state rows in the order
// of k: their 64 values as an MN-major, 128-byte-swizzled [16][64] tile (the B operand of
// m64n64k16 with the transposed-B flag, as v17's value tiles) and their normaliser column as a
// [16][8] tile without swizzle (rows 16 B apart: 8-row core matrices 128 B apart, the only stride
// an N = 8 operand has, so both descriptor offsets are 128). A row left of the diagonal (b < a)
// repeats the diagonal's state row: finite, and its A element is exactly zero. One slot holds one
// pair of triangle rows (8 - a / 8 k-steps); 3 slots, the two pairs after the current one loading
// ahead by cp.async (SLOTS = 4, three ahead, measured no faster: docs/perf.md, session 17).
//
// Each warpgroup builds a pair's A fragments, issues its 2 (8 - a / 8) MMAs and waits for them
// before the next pair (its A registers are reused); the other warpgroups of the SM (two blocks of
// two) fill the tensor cores meanwhile. The accumulators are chunk_out's acc[9][4]: columns 0-63
// from the m64n64 products, the normaliser (column 64) in acc[8] from the m64n8 ones, the layout
// the intra-chunk mma.sync part and the epilogue then continue with.
#pragma once

#include "power_retention_kernels.cuh"
#include "power_retention_wgmma_ops.cuh"

namespace llmtrain {
namespace pr {

#if defined(LLMTRAIN_PR_WGMMA)
// Descriptor of a tile without swizzle whose 8-row core matrices (8 rows of 16 bytes) lie 128 bytes
// apart; layout type 0 (bits 62-63).
__device__ __forceinline__ uint64_t plain_desc(const void* tile) {
  return (uint64_t)((smem_u32(tile) >> 4) & 0x3FFF) | ((uint64_t)(128 >> 4) << 16) | ((uint64_t)(128 >> 4) << 32);
}

// acc[8] (column 64, the normaliser, and 7 zero columns) += A[64 x 16] B[16 x 8], B MN-major.
__device__ __forceinline__ void wgmma_query_norm(float (&d)[9][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 1;\n}\n"
      : "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// The ring of k-step tiles (see the top of the file) over one chunk's state S ([D][E] bf16, E = 72),
// SLOTS slots of one pair of triangle rows each.
template <int SLOTS> struct QueryRing {
  unsigned char* base;
  const bf16* S;
  __device__ QueryRing(unsigned char* mem, const bf16* S_) : S(S_) {
    base = mem + ((1024 - (smem_u32(mem) & 1023)) & 1023);
  }
  __device__ unsigned char* values(int slot, int s) const {
    return base + slot * kQuerySlotBytes + s * kQueryValueBytes;
  }
  __device__ unsigned char* norms(int slot, int s) const {
    return base + slot * kQuerySlotBytes + 8 * kQueryValueBytes + s * kQueryNormBytes;
  }
  // Triangle-row pair p (a = 2p) into slot p % SLOTS: 16-byte cp.async copies, 9 per state row (8 of
  // values, 1 of [z, 0 x 7]); the caller commits. Half the block takes the even k-steps, half the odd
  // ones; in each half thread u copies value chunk u % 8 of row u / 8, and threads u < 16 also the
  // normaliser chunk of row u (per-thread offsets fixed: a copy costs a few integer instructions).
  __device__ void load(int p) const {
    constexpr int E = Cfg<64>::E;
    const int a = 2 * p, bd = a >> 3, slot = p % SLOTS, nk = 8 - bd;
    const int u = threadIdx.x & 127, half = threadIdx.x >> 7;
    const int kr = u >> 3, c = u & 7;
    const int ar = a + (kr >> 3), rs = row_start(ar, 64) - ar;
    const int vdst = (kr >> 3) * 1024 + (kr & 7) * 128 + ((c ^ (kr & 7)) << 4);
    const int nr = a + (u >> 3 & 1), nrs = row_start(nr, 64) - nr;  // rows of the normaliser copies (u < 16)
    for (int st = half; st < nk; st += 2) {
      const int b0 = 8 * (bd + st);
      cp_async16(values(slot, st) + vdst, S + (int64_t)(rs + max(b0 + (kr & 7), ar)) * E + c * 8);
      if (u < 16) cp_async16(norms(slot, st) + u * 16, S + (int64_t)(nrs + max(b0 + (u & 7), nr)) * E + 64);
    }
  }
};

// One pair of triangle rows (a, a + 1), a / 8 = BD, from slot `slot`: build the 8 - BD A fragments,
// issue their MMAs, wait for them.
template <int BD, int SLOTS>
__device__ __forceinline__ void query_pair(float (&acc)[9][4], const bf16* xs, const QueryRing<SLOTS>& ring, int slot,
                                           int a, int wr0, int tq) {
  constexpr int NK = 8 - BD, LD = Cfg<64>::LD;
  const float xa0 = bf2f(xs[wr0 * LD + a]) * kSqrt2, xa1 = bf2f(xs[(wr0 + 8) * LD + a]) * kSqrt2;
  const float xn0 = bf2f(xs[wr0 * LD + a + 1]) * kSqrt2, xn1 = bf2f(xs[(wr0 + 8) * LD + a + 1]) * kSqrt2;
  uint32_t A[NK][4];
  phi_a_frag<64, true>(A[0], xs, BD, a, wr0, tq, xa0, xa1, xn0, xn1);
#pragma unroll
  for (int s = 1; s < NK; ++s) phi_a_frag<64, false>(A[s], xs, BD + s, a, wr0, tq, xa0, xa1, xn0, xn1);
  float(&values)[8][4] = *reinterpret_cast<float(*)[8][4]>(&acc[0]);  // columns 0-63 (acc[8]: the normaliser)
  wg_fence();
#pragma unroll
  for (int s = 0; s < NK; ++s) {
    wgmma_rs<64, 1>(values, A[s], sw128_desc(ring.values(slot, s)), 1);
    wgmma_query_norm(acc, A[s], plain_desc(ring.norms(slot, s)));
  }
  wg_commit();
  wg_wait<0>();
  fence_regs(acc);
}
#endif  // LLMTRAIN_PR_WGMMA

// chunk_out_kernel's state query (UCV = SLOTS = 3 or 4; declared in power_retention_kernels.cuh): acc +=
// phi(xs rows) . S. xs: the block's [128][LD] rows of e^{g/2} s q (published by the caller's barrier).
// The ring loads SLOTS - 1 pairs ahead. Every thread takes part in the staging; the last barrier frees
// the ring's memory for the caller.
template <int d, int SLOTS>
__device__ __forceinline__ void state_query_wgmma(float (&acc)[Cfg<d>::NT][4], const bf16* xs, const bf16* S,
                                                  unsigned char* ring_mem, int warp, int lane) {
#if defined(LLMTRAIN_PR_WGMMA)
  static_assert(d == 64, "the wgmma state query is written for d = 64");
  static_assert(SLOTS == 3 || SLOTS == 4, "ring of 3 or 4 slots");
  static_assert(kThreads == 256, "QueryRing::load splits the copies over two halves of 128 threads");
  constexpr int kPairs = d / 2, kAhead = SLOTS - 1;
  const QueryRing<SLOTS> ring(ring_mem, S);
  const int wr0 = warp * 16 + (lane >> 2), tq = lane & 3;
#pragma unroll
  for (int p = 0; p < kAhead; ++p) {
    ring.load(p);
    cp_commit();
  }
  for (int p = 0; p < kPairs; ++p) {
    cp_wait<kAhead - 1>();  // this thread's copies of pair p have landed (later ones may be in flight)
    fence_async_smem();
    __syncthreads();  // everyone's copies; and every warpgroup is done with pair p - 1's slot
    if (p + kAhead < kPairs) ring.load(p + kAhead);
    cp_commit();  // (empty groups at the end keep the wait count uniform)
    const int slot = p % SLOTS, a = 2 * p;
    switch (p >> 2) {
      case 0: query_pair<0>(acc, xs, ring, slot, a, wr0, tq); break;
      case 1: query_pair<1>(acc, xs, ring, slot, a, wr0, tq); break;
      case 2: query_pair<2>(acc, xs, ring, slot, a, wr0, tq); break;
      case 3: query_pair<3>(acc, xs, ring, slot, a, wr0, tq); break;
      case 4: query_pair<4>(acc, xs, ring, slot, a, wr0, tq); break;
      case 5: query_pair<5>(acc, xs, ring, slot, a, wr0, tq); break;
      case 6: query_pair<6>(acc, xs, ring, slot, a, wr0, tq); break;
      default: query_pair<7>(acc, xs, ring, slot, a, wr0, tq); break;
    }
  }
  cp_wait<0>();
  __syncthreads();  // the ring's memory holds the intra-chunk tiles next
#else
  __trap();  // launched only on sm_90 devices of an sm_90a build (power_retention.cu: state_wgmma_usable)
#endif
}

}  // namespace pr
}  // namespace llmtrain
