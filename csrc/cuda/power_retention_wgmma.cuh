// v17: the one-chunk forward on Hopper's warpgroup MMA (wgmma; sm_90a builds, d = 64).
//
// Why: the v10-v16 flash kernels run mma.sync with 16-row warps, so every warp reads every key
// tile's B fragments from shared memory through ldmatrix: per 16 x 64 x 64 score tile a warp issues
// 16 HMMA and 20 ldmatrix, and shared-memory bandwidth, not the tensor cores, bounds the kernels
// (~195 TFLOP/s in each of them at t = 2048; docs/perf.md, v16). A wgmma reads its shared-memory
// operands once per warpgroup of 4 warps (64 rows) and needs no register staging, so a key tile's
// B operand costs a quarter of the shared-memory traffic and one instruction per k-step.
//
// What stays: the block (128 query rows, 8 warps, 2 blocks per SM), the 3-slot {K, V, column
// factor} ring with one block barrier per tile (v16), and every per-element operation. The wgmma
// m64nNk16 accumulator gives each warp its 16 rows in exactly the mma.sync m16n8 C layout (row g,
// g + 8; columns 8 j + 2 tq, + 1), and its register A operand is the mma.sync A layout, so the
// element-wise passes (weigh_below_diagonal / weigh_diagonal), the bf16 packing of P and the
// normaliser (an mma.sync of P against ones) are v16's, unchanged.
//
// Shared-memory tiles are [rows][64] bf16 with the 128-byte swizzle wgmma expects (16-byte chunk c
// of row r stored at chunk c ^ (r & 7)), each tile 1024-byte aligned:
//   S = Q K^T:  A = Q (K-major), B = the K tile (K-major): 4 k-steps over d, +32 bytes each;
//   Y += P V:   A = P from registers, B = the V tile, [key][d] = "MN-major" (transposed B):
//               4 k-steps over the 64 keys, +2048 bytes (16 rows) each.
#pragma once

#include "power_retention_flash.cuh"
#include "power_retention_wgmma_ops.cuh"

namespace llmtrain {
namespace pr {

constexpr int kWgD = 64;             // the head dim of the wgmma kernels (one 128-byte swizzle atom per row)
constexpr int kWgTile = kWgD * kWgD;  // elements of a [64][64] tile

// Shared memory of flash_fwd_wgmma_kernel: Q [128][64], 3 x {K, V} [64][64], 3 x 64 column
// factors, the gates, and 1 KiB to align the swizzled tiles.
constexpr size_t flash_fwd_wgmma_smem(int tpad) {
  return 1024 + (size_t)kFR * kWgD * 2 + (size_t)3 * 2 * kWgTile * 2 + 3 * kFT * 4 + (size_t)tpad * 4;
}

// Rows [r0, r0 + n) of a [b, t, heads, 64] tensor into a swizzled bf16 [n][64] tile: cp.async for
// bf16 (the caller commits), through registers otherwise (the same bf16 values flash_tile stores).
// Zeros past cnt.
template <typename T>
__device__ __forceinline__ void swizzled_tile(bf16* dst, const T* src, int64_t tok0, int64_t heads, int64_t head,
                                              int r0, int n, int cnt) {
  for (int idx = threadIdx.x; idx < n * 8; idx += blockDim.x) {
    const int i = idx >> 3, c = idx & 7, li = r0 + i;
    bf16* dp = dst + i * kWgD + ((c ^ (i & 7)) << 3);
    const T* sp = src + ((tok0 + li) * heads + head) * kWgD + c * 8;
    if constexpr (std::is_same<T, bf16>::value) {
      if (li < cnt) cp_async16(dp, sp);
      else *reinterpret_cast<uint4*>(dp) = make_uint4(0, 0, 0, 0);
    } else {
      float x[8];
      if (li < cnt) IO<T>::load8(sp, x);
      else
#pragma unroll
        for (int u = 0; u < 8; ++u) x[u] = 0.f;
      st8_bf16(dp, x);
    }
  }
}

// The ring tiles ([64][64], 64 rows of one head) with the block's 256 threads: thread tid copies the
// 16-byte chunk tid % 8 of rows tid / 8 and tid / 8 + 32 (same swizzle: (row + 32) & 7 = row & 7).
// Its offsets are computed once per kernel, so a tile costs two copies and an add per thread
// (swizzled_tile's general loop spent ~25% of the wgmma forward's issue slots on index math; ncu).
static_assert(kThreads == 256, "Tile64: 8 threads per row, 32 rows per pass");
struct Tile64 {
  int row, dst;    // the thread's first row, and its chunk's element offset in the tile
  int64_t src;     // element offset of (row, chunk) of token 0 of head 0: (tok0 + row) * heads * 64 + chunk * 8
  int64_t stride;  // elements per token: heads * 64
};
__device__ __forceinline__ Tile64 tile64(int64_t tok0, int64_t heads) {
  const int row = threadIdx.x >> 3, c = threadIdx.x & 7;
  return {row, row * kWgD + ((c ^ (row & 7)) << 3), (tok0 + row) * heads * kWgD + c * 8, heads * kWgD};
}
// Rows [r0, r0 + 64) of head `head` into a swizzled [64][64] tile (cp.async for bf16; the caller
// commits), zeros past cnt.
template <typename T>
__device__ __forceinline__ void load_tile64(bf16* dst, const T* src, const Tile64& m, int64_t head, int r0, int cnt) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    bf16* dp = dst + m.dst + hf * 32 * kWgD;
    const T* sp = src + m.src + (int64_t)(r0 + hf * 32) * m.stride + head * kWgD;
    const bool valid = r0 + m.row + hf * 32 < cnt;
    if constexpr (std::is_same<T, bf16>::value) {
      if (valid) cp_async16(dp, sp);
      else *reinterpret_cast<uint4*>(dp) = make_uint4(0, 0, 0, 0);
    } else {
      float x[8];
      if (valid) IO<T>::load8(sp, x);
      else
#pragma unroll
        for (int u = 0; u < 8; ++u) x[u] = 0.f;
      st8_bf16(dp, x);
    }
  }
}

// The key-tile ring of the query-row kernels (forward, dq): 3 slots of {K, V} swizzled [64][64]
// tiles and their column factors, loaded two tiles ahead, one block barrier per tile (v16's ring).
template <typename T> struct WgKeyRing {
  const QueryBlock<kWgD, T>& blk;
  bf16* kv;         // 3 x {K, V}
  float* cbs;       // 3 x [64] column factors
  const float* Gs;  // the staged gate cumsums
  Tile64 m;
  __device__ WgKeyRing(const QueryBlock<kWgD, T>& b, bf16* kv_, float* cbs_, const float* gs)
      : blk(b), kv(kv_), cbs(cbs_), Gs(gs), m(tile64(b.tok0, b.p.hk)) {}
  __device__ const bf16* k(int it) const { return kv + (it % 3) * 2 * kWgTile; }
  __device__ const bf16* v(int it) const { return k(it) + kWgTile; }
  __device__ const float* cb(int it) const { return cbs + (it % 3) * kFT; }
  __device__ void load(int it) const {
    bf16* dst = kv + (it % 3) * 2 * kWgTile;
    load_tile64<T>(dst, static_cast<const T*>(blk.p.k), m, blk.h, it * kFT, blk.cnt);
    load_tile64<T>(dst + kWgTile, static_cast<const T*>(blk.p.v), m, blk.h, it * kFT, blk.cnt);
  }
  // After the gates were staged and the caller's rows issued: group 0 = {the rows, tile 0}, group 1
  // = tile 1; the barrier publishes the gates, then the first two tiles' column factors.
  __device__ void start() const {
    load(0);
    cp_commit();
    if (1 < blk.ntiles) load(1);
    cp_commit();
    __syncthreads();
    column_factors(cbs, Gs, 0, blk.cnt);
    if (1 < blk.ntiles) column_factors(cbs + kFT, Gs, kFT, blk.cnt);
  }
  // Top of tile it: this thread's copies of tile it have landed; the barrier publishes every
  // thread's (and the column factors) and tells that tile it - 1's slot is free for tile it + 2.
  __device__ void top(int it) const;
};

#if defined(LLMTRAIN_PR_WGMMA)
template <typename T> __device__ void WgKeyRing<T>::top(int it) const {
  cp_wait<1>();
  fence_async_smem();
  __syncthreads();
  if (it + 2 < blk.ntiles) {
    load(it + 2);
    column_factors(cbs + ((it + 2) % 3) * kFT, Gs, (it + 2) * kFT, blk.cnt);
  }
  cp_commit();
}
#endif  // LLMTRAIN_PR_WGMMA

// The forward (v12's math; see the top of this file). One block per (128 query rows, q head,
// batch), the longest rows first; warpgroup wg owns rows row0 + 64 wg ... + 63 and runs the key
// tiles up to its own diagonal tile (warpgroup 0 skips the block's last tile).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) flash_fwd_wgmma_kernel(const FlashArgs p) {
#if defined(LLMTRAIN_PR_WGMMA)
  constexpr int d = kWgD, ND = d / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // the swizzle is a function of the address bits: align the tiles to 1 KiB by hand
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  bf16* qs = reinterpret_cast<bf16*>(base);                       // [128][64], swizzled
  bf16* kv = qs + kFR * d;                                         // 3 x {K [64][64], V [64][64]}, swizzled
  float* cbs = reinterpret_cast<float*>(kv + 3 * 2 * kWgTile);     // 3 x [64] column factors
  float* Gs = cbs + 3 * kFT;                                       // [tpad] gate cumsums
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const QueryBlock<d, T> blk(p);
  const int row0 = blk.row0, cnt = blk.cnt, ntiles = blk.ntiles;
  const int64_t hqi = blk.hqi, bi = blk.bi, tok0 = blk.tok0, h = blk.h;
  const WgKeyRing<T> ring(blk, kv, cbs, Gs);
  stage_gates(Gs, p.gcum + (bi * p.hk + h) * p.t, 0, blk.nk, cnt);
  swizzled_tile<T>(qs, static_cast<const T*>(p.q), tok0, p.hq, hqi, row0, kFR, cnt);
  ring.start();

  const int wg = warp >> 2, wgfirst = row0 + wg * 64;
  const bool wg_live = wgfirst < cnt;
  const int wfirst = row0 + warp * 16, i0 = wfirst + g, i1 = i0 + 8;
  const float gi0 = Gs[min(i0, cnt - 1)], gi1 = Gs[min(i1, cnt - 1)];
  const float sc2 = p.scale * p.scale;
  const uint64_t dq0 = sw128_desc(qs + wg * 64 * d);
  float acc[ND][4];
  zero(acc);
  float den[4] = {0.f, 0.f, 0.f, 0.f};
  constexpr uint32_t kOnes = 0x3f803f80u;  // bf16 (1, 1)

  for (int it = 0; it < ntiles; ++it) {
    ring.top(it);
    const int kb0 = it * kFT;
    if (!wg_live || kb0 > wgfirst + 63) continue;  // (uniform over the warpgroup)
    const bf16* Ks = ring.k(it);
    const float* cb = ring.cb(it);
    float s[8][4];
    const uint64_t dk0 = sw128_desc(Ks);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < d / 16; ++ks) wgmma_ss(s, dq0 + 2 * ks, dk0 + 2 * ks, ks);
    wg_commit();
    wg_wait<0>();
    fence_regs(s);
    const int kl = tile_last_key(kb0, cnt);
    const float gkl = Gs[kl];
    const float ra0 = __expf(gi0 - gkl) * sc2, ra1 = __expf(gi1 - gkl) * sc2;
    if (wfirst > kl) weigh_below_diagonal(s, cb, ra0, ra1, tq);
    else weigh_diagonal(s, cb, Gs, kb0, kl, cnt, i0, i1, gi0, gi1, ra0, ra1, sc2, tq);
    uint32_t pa[4][4];  // P as bf16 A fragments, 16 keys each
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      mma(den, pa[kk], kOnes, kOnes);  // the normaliser: row sums of the same bf16 weights
    }
    const uint64_t dv0 = sw128_desc(ring.v(it));
    fence_regs(acc);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_tb(acc, pa[kk], dv0 + kk * (2048 >> 4));
    wg_commit();
    wg_wait<0>();  // (before the next barrier frees this tile's slot, and before pa is rewritten)
    fence_regs(acc);
  }
  cp_wait<0>();

  store_forward_rows<d, T>(p, acc, den, i0, i1, cnt, tok0, bi, hqi, tq);
#else
  __trap();  // launched only on sm_90 devices of an sm_90a build (power_retention.cu: wgmma_available)
#endif
}

// Shared memory of flash_dq_wgmma_kernel: q, dy [128][64], 3 x {K, V} [64][64], 3 x 64 column
// factors, the gates, and 1 KiB to align the tiles.
constexpr size_t flash_dq_wgmma_smem(int tpad) {
  return 1024 + (size_t)2 * kFR * kWgD * 2 + (size_t)3 * 2 * kWgTile * 2 + 3 * kFT * 4 + (size_t)tpad * 4;
}

// dq (v12's flash_dq_kernel math, on wgmma): one block per (128 query rows, q head, batch), the
// longest rows first, K / V tiles of 64 keys in the forward's 3-slot ring. Warpgroup wg owns rows
// row0 + 64 wg ... + 63 and works on each key tile in two 32-key halves:
//   S = q K^T and dy V^T:  A = the warpgroup's q / dy rows, B = the K / V half (K-major), m64n32k16;
//   dq_pass (v12's element-wise pass, per warp: 16 rows x 32 keys);
//   dq += dS K:  A = dS from registers, B = the K half ([key][d]: MN-major), m64n64k16, 2 k-steps.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) flash_dq_wgmma_kernel(const FlashArgs p) {
#if defined(LLMTRAIN_PR_WGMMA)
  constexpr int d = kWgD, ND = d / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  bf16* qs = reinterpret_cast<bf16*>(base);                    // [128][64], swizzled
  bf16* dys = qs + kFR * d;                                     // [128][64], swizzled
  bf16* kv = dys + kFR * d;                                     // 3 x {K [64][64], V [64][64]}, swizzled
  float* cbs = reinterpret_cast<float*>(kv + 3 * 2 * kWgTile);  // 3 x [64] column factors
  float* Gs = cbs + 3 * kFT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const QueryBlock<d, T> blk(p);
  const int row0 = blk.row0, cnt = blk.cnt, ntiles = blk.ntiles;
  const int64_t hqi = blk.hqi, bi = blk.bi, tok0 = blk.tok0, h = blk.h;
  const WgKeyRing<T> ring(blk, kv, cbs, Gs);
  stage_gates(Gs, p.gcum + (bi * p.hk + h) * p.t, 0, blk.nk, cnt);
  swizzled_tile<T>(qs, static_cast<const T*>(p.q), tok0, p.hq, hqi, row0, kFR, cnt);
  swizzled_tile<T>(dys, static_cast<const T*>(p.dy), tok0, p.hq, hqi, row0, kFR, cnt);
  ring.start();

  const int wg = warp >> 2, wgfirst = row0 + wg * 64;
  const bool wg_live = wgfirst < cnt;
  const int wfirst = row0 + warp * 16, i0 = wfirst + g, i1 = i0 + 8;
  const float gi0 = Gs[min(i0, cnt - 1)], gi1 = Gs[min(i1, cnt - 1)];
  const float2* rst = p.rowstat + (bi * p.hq + hqi) * p.tpad;
  const float2 st0 = rst[i0], st1 = rst[i1];  // i < tpad
  const float c0 = 2.f * st0.x * p.scale, c1 = 2.f * st1.x * p.scale;
  const uint64_t dq_a = sw128_desc(qs + wg * 64 * d), ddy_a = sw128_desc(dys + wg * 64 * d);
  float acc[ND][4];
  zero(acc);
  float dot0 = 0.f, dot1 = 0.f;
  for (int it = 0; it < ntiles; ++it) {
    ring.top(it);
    const int kb0 = it * kFT;
    if (!wg_live || kb0 > wgfirst + 63) continue;  // (uniform over the warpgroup)
    const bf16* Ks = ring.k(it);
    const float* cb = ring.cb(it);
    const int kl = tile_last_key(kb0, cnt);
    const float gkl = Gs[kl];
    const float ra0 = __expf(gi0 - gkl), ra1 = __expf(gi1 - gkl);
    const bool below = wfirst > kl;
    const DqPassArgs args{i0, i1, kb0, kl, cnt, tq, gi0, gi1, ra0, ra1, p.scale, st0.y, st1.y, c0, c1};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (kb0 + hf * 32 > wgfirst + 63) continue;  // every key of the half after every row (uniform)
      const uint64_t dk_b = sw128_desc(Ks + hf * 32 * d), dv_b = sw128_desc(Ks + kWgTile + hf * 32 * d);
      float s[4][4], da[4][4];
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < d / 16; ++kk) {
        wgmma_ss_n32(s, dq_a + 2 * kk, dk_b + 2 * kk, kk);
        wgmma_ss_n32(da, ddy_a + 2 * kk, dv_b + 2 * kk, kk);
      }
      wg_commit();
      wg_wait<0>();
      fence_regs(s);
      fence_regs(da);
      if (below) dq_pass<4, true>(s, da, hf * 32, true, args, cb, Gs, dot0, dot1);
      else dq_pass<4, false>(s, da, hf * 32, false, args, cb, Gs, dot0, dot1);
      uint32_t as[2][4];  // the score gradients as bf16 A fragments (gemm_pb's packing)
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        as[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        as[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        as[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        as[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      fence_regs(acc);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) wgmma_rs_tb(acc, as[kk], dk_b + kk * (2048 >> 4));
      wg_commit();
      wg_wait<0>();
      fence_regs(acc);
    }
  }
  cp_wait<0>();

  store_dq_rows<d, T>(p, acc, dot0, dot1, i0, i1, cnt, tok0, hqi, tq);
#else
  __trap();  // launched only on sm_90 devices of an sm_90a build (power_retention.cu: wgmma_usable)
#endif
}

// Shared memory of flash_dkv_wgmma_kernel: K, V [128][64], 3 x {q, dy} [64][64], 3 x 64 row
// statistics (float2) and 3 x 2 x 64 query factors, the gates, and 1 KiB to align the tiles.
constexpr size_t flash_dkv_wgmma_smem(int tpad) {
  return 1024 + (size_t)2 * kFR * kWgD * 2 + (size_t)3 * 2 * kWgTile * 2 + 3 * kFT * 8 + 3 * 2 * kFT * 4 +
         (size_t)tpad * 4;
}

// dk, dv (v16's flash_dkv_kernel with kRing, on wgmma): one block per (128 keys, KV head, batch),
// the longest first; for each q head of the GQA group, q / dy / row-statistic tiles of 64 queries
// from the block's first key on, in a 3-slot ring with one barrier per tile. Warpgroup wg owns keys
// kb + 64 wg ... + 63 and works on each tile in two 32-query halves:
//   S^T = K q^T and (dy V^T)^T = V dy^T:  A = the warpgroup's K / V rows, B = the q / dy half (both
//     K-major), m64n32k16, 4 k-steps over d;
//   dkv_pass (v16's element-wise pass, per warp: 16 keys x 32 queries);
//   dv += W dy and dk += dS q:  A = W / dS from registers, B = the dy / q half ([query][d]: MN-major),
//     m64n64k16, 2 k-steps over the 32 queries.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) flash_dkv_wgmma_kernel(const FlashArgs p) {
#if defined(LLMTRAIN_PR_WGMMA)
  constexpr int d = kWgD, ND = d / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  bf16* ks = reinterpret_cast<bf16*>(base);  // [128][64], swizzled
  bf16* vs = ks + kFR * d;                    // [128][64], swizzled
  bf16* qb = vs + kFR * d;                    // 3 x {q [64][64], dy [64][64]}, swizzled
  float2* rsb = reinterpret_cast<float2*>(qb + 3 * 2 * kWgTile);  // 3 x [64] (1 / den, dy . y)
  float* ras = reinterpret_cast<float*>(rsb + 3 * kFT);            // 3 x [2][64] e^{G_i - G_kl}
  float* Gs = ras + 3 * 2 * kFT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int kb = blockIdx.x * kFR;
  const int64_t h = blockIdx.y, bi = blockIdx.z;
  const int r = (int)(p.hq / p.hk);
  const int cnt = (int)p.t;
  const int64_t tok0 = bi * p.t;
  const T* Q = static_cast<const T*>(p.q);
  const T* DY = static_cast<const T*>(p.dy);
  const int nq = (cnt - kb + kFT - 1) / kFT;  // query tiles per head
  const int total = r * nq;
  const Tile64 qm = tile64(tok0, p.hq);
  auto load_q = [&](int it) {
    const int64_t hq_i = h * r + it / nq;
    const int qb0 = kb + (it % nq) * kFT, buf = it % 3;
    bf16* dst = qb + buf * 2 * kWgTile;
    load_tile64<T>(dst, Q, qm, hq_i, qb0, cnt);
    load_tile64<T>(dst + kWgTile, DY, qm, hq_i, qb0, cnt);
    stage_query_rows(p, rsb, ras, Gs, bi, hq_i, qb0, kb, cnt, buf);
  };

  stage_gates(Gs, p.gcum + (bi * p.hk + h) * p.t, kb, p.tpad, cnt);
  swizzled_tile<T>(ks, static_cast<const T*>(p.k), tok0, p.hk, h, kb, kFR, cnt);
  swizzled_tile<T>(vs, static_cast<const T*>(p.v), tok0, p.hk, h, kb, kFR, cnt);
  __syncthreads();  // Gs (load_q reads it)
  load_q(0);
  cp_commit();  // group 0: K, V, tile 0
  if (1 < total) load_q(1);
  cp_commit();  // group 1: tile 1
  const int wg = warp >> 2, wgfirst = kb + wg * 64;
  const int wfirst = kb + warp * 16, j0 = wfirst + g, j1 = j0 + 8;
  const int kl = tile_last_key(wfirst, cnt);  // (the same for the warpgroup's four warps)
  const float gkl = Gs[kl];
  const float cb0 = j0 < cnt ? __expf(gkl - Gs[j0]) : 0.f, cb1 = j1 < cnt ? __expf(gkl - Gs[j1]) : 0.f;
  const bool wg_live = wgfirst < cnt;
  const uint64_t dk_a = sw128_desc(ks + wg * 64 * d), dv_a = sw128_desc(vs + wg * 64 * d);
  float dk[ND][4], dv[ND][4];
  zero(dk);
  zero(dv);
  float dot0 = 0.f, dot1 = 0.f;
  for (int it = 0; it < total; ++it) {
    const int qb0 = kb + (it % nq) * kFT;
    cp_wait<1>();
    fence_async_smem();
    __syncthreads();
    if (it + 2 < total) load_q(it + 2);
    cp_commit();
    if (!wg_live) continue;
    const int sl = it % 3;
    const bf16* Qs = qb + sl * 2 * kWgTile;
    const bf16* DYs = Qs + kWgTile;
    const float2* rs = rsb + sl * kFT;
    const float* ra = ras + (sl * 2 + wg) * kFT;
#pragma unroll
    for (int qh = 0; qh < 2; ++qh) {
      const int qh0 = qb0 + qh * 32;
      if (qh0 + 31 < wgfirst) continue;  // every query before every key of this warpgroup (uniform)
      const uint64_t dq_b = sw128_desc(Qs + qh * 32 * d), ddy_b = sw128_desc(DYs + qh * 32 * d);
      float s[4][4], da[4][4];
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < d / 16; ++kk) {
        wgmma_ss_n32(s, dk_a + 2 * kk, dq_b + 2 * kk, kk);
        wgmma_ss_n32(da, dv_a + 2 * kk, ddy_b + 2 * kk, kk);
      }
      wg_commit();
      wg_wait<0>();
      fence_regs(s);
      fence_regs(da);
      uint32_t aw[2][4];  // p_ij / den_i as bf16 A fragments
      const DkvPassArgs args{qb0, j0, j1, kl, cnt, tq, cb0, cb1, p.scale};
      if (qh0 > kl) dkv_pass<true>(s, da, aw, qh, rs, ra, Gs, args, dot0, dot1);
      else dkv_pass<false>(s, da, aw, qh, rs, ra, Gs, args, dot0, dot1);
      uint32_t as[2][4];  // the score gradients as bf16 A fragments (gemm_pb's packing)
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        as[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        as[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        as[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        as[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      fence_regs(dk);
      fence_regs(dv);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        wgmma_rs_tb(dv, aw[kk], ddy_b + kk * (2048 >> 4));
        wgmma_rs_tb(dk, as[kk], dq_b + kk * (2048 >> 4));
      }
      wg_commit();
      wg_wait<0>();
      fence_regs(dk);
      fence_regs(dv);
    }
  }
  cp_wait<0>();

  store_dkv_rows<d, T>(p, dk, dv, dot0, dot1, j0, j1, cnt, tok0, h, tq);
#else
  __trap();  // launched only on sm_90 devices of an sm_90a build (power_retention.cu: wgmma_usable)
#endif
}

}  // namespace pr
}  // namespace llmtrain
