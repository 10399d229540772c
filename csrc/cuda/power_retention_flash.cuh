// v10: one chunk and no states (the quadratic form) as FlashAttention-2-style kernels.
//
//   y_i = sum_{j<=i} p_ij v_j / sum_{j<=i} p_ij,  p_ij = (s q_i.k_j)^2 e^{G_i - G_j}
//
// The general chunk kernels (power_retention_kernels.cuh) spend most of their issue slots on the
// element-wise part: a bounds check, a gate load from shared memory and an exp per score. Here a
// warp's 16 x 64 score tile that lies wholly below the diagonal (every key before every row: all
// but one tile in ~t/64) factors the gate through the tile's last key kl:
//   e^{G_i - G_j} = e^{G_i - G_kl} e^{G_kl - G_j},   both factors in (0, 1] because j <= kl < i,
// so a score costs two exps per row and one per column instead of one per element, and no masks.
// Diagonal tiles keep the per-element form. The normaliser is the row sum of the same bf16 weights
// the value GEMM multiplies (one MMA against a constant ones fragment per 16 keys: no smem column).
//
// The forward keeps fp32 y and 1/den as v9 does; the backward takes (1/den, dy.y) per row from
// rowstat_kernel. dq and dk/dv are two kernels (no atomics: bit-identical reruns). Both compute each
// score's gradient a_ij and the dlog_g dots a_ij x_ij with the same float operations on the same
// gate values (the tile rule depends on (i, j) alone), so the row and column sums of dlog_g
// telescope as in v7.
//
// v14 (template argument kPipe; LLMTRAIN_RETENTION_FLASH=v14, power_retention.cu): software
// pipelining inside each warp. v10-v12 run, per warp and key tile, the S GEMM (q.k^T), the
// element-wise pass (square, gate, mask, bf16) and the P.V GEMM strictly one after another, and
// 16 warps per SM did not hide that chain (session 10: 32-row warps, half the warps, were slower).
// v14 issues the S GEMM of the next key tile before the element-wise pass of the current one, so
// the tensor cores work on tile j + 1 while the ALU / MUFU pass of tile j runs; two score tiles
// live in registers, still 16 rows per warp.
//  - forward: whole 64-key tiles. K is staged one tile ahead of V in v12's two {K, V} slots (no more
//    shared memory); q's A fragments are read from shared memory per k-step (gemm_abt_sa) instead
//    of held in registers, which pays for the second score tile within 128 registers.
//  - dq: 32-key half tiles ("units"), each issuing the (q.K^T, dy.V^T) GEMMs of the next unit:
//    two whole (s, dy.v) tile pairs would need 64 registers more than 128 allow. A tile's body
//    then reads tiles j and j + 1, so K / V (and the column factors) use a 3-slot ring: 6 kFT x LD
//    of shared memory instead of 4 (flash_dq_smem<d, true>; v12's dq runs where that does not fit).
//  - dk / dv: not pipelined (v12's kernel already spills at 128 registers).
// Only warps below the diagonal pipeline: such a warp always needs the next tile (its first row is
// past the tile's last key), and the diagonal tile is a warp's last (rows are 16-aligned), so the
// diagonal tile runs as in v12 and "is there a next tile" needs no runtime test in the hot path.
// Warps whose rows all lie past t skip every tile (v12 computes them and stores nothing).
// Results are bitwise v12's: per element the same float operations in the same order, the same
// MMAs accumulating in the same order (the factored / per-element gate forms unchanged).
#pragma once

#include <type_traits>

#include "power_retention_kernels.cuh"

namespace llmtrain {
namespace pr {

struct FlashArgs {
  const void *q, *k, *v, *dy;
  const float* gcum;       // [b * hk, t] inclusive cumsum of log_g (zeros ungated)
  void* y;                 // forward: [b, t, hq, d]
  float* y32;              //   fp32 y (or null)
  float* inv_den;          //   [b, hq, t] (or null)
  const float2* rowstat;   // backward: [b, hq, tpad] (1 / den, dy . y), zeros past t
  void *dq, *dk, *dv;
  float* dGq;              // [b, t, hq]: q . dq (null: ungated)
  float* dGk;              // [b, t, hk]: k . dk summed over the GQA group (null: ungated)
  int64_t b, t, hq, hk;
  int tpad;
  float scale;
};

constexpr int kFR = 128;  // rows (queries or keys) per block: 8 warps x 16
constexpr int kFT = 64;   // keys (or queries) per inner tile

// (v16, kRing: 3 key-tile slots instead of 2, one block barrier per tile instead of two)
template <int d, bool kRing = false> constexpr size_t flash_fwd_smem(int tpad) {
  constexpr int LD = Cfg<d>::LD, NS = kRing ? 3 : 2;
  return (size_t)kFR * LD * 2 + (size_t)NS * 2 * kFT * LD * 2 + NS * kFT * 4 + (size_t)tpad * 4;
}
// (v14's dq keeps 3 K / V tiles and column factors in a ring instead of 2)
template <int d, bool kPipe = false> constexpr size_t flash_dq_smem(int tpad) {
  constexpr int LD = Cfg<d>::LD, NS = kPipe ? 3 : 2;
  return (size_t)2 * kFR * LD * 2 + (size_t)NS * 2 * kFT * LD * 2 + NS * kFT * 4 + (size_t)tpad * 4;
}
// (v16, kRing: 3 query-tile slots instead of 2, one block barrier per tile instead of two)
template <int d, bool kRing = false> constexpr size_t flash_dkv_smem(int tpad) {
  constexpr int LD = Cfg<d>::LD, NS = kRing ? 3 : 2;
  return (size_t)2 * kFR * LD * 2 + (size_t)NS * 2 * kFT * LD * 2 + NS * kFT * 8 + NS * 2 * kFT * 4 + (size_t)tpad * 4;
}

// Gs[i] = G_i for i in [i0, i1) (zeros from cnt on).
__device__ __forceinline__ void stage_gates(float* Gs, const float* g, int i0, int i1, int cnt) {
  for (int i = i0 + (int)threadIdx.x; i < i1; i += blockDim.x) Gs[i] = i < cnt ? g[i] : 0.f;
}

// Rows [r0, r0 + n) of a [b, t, heads, d] tensor into a bf16 [n][LD] tile: cp.async for bf16 (the
// caller commits), through registers otherwise. Zeros past cnt.
template <int d, typename T>
__device__ __forceinline__ void flash_tile(bf16* dst, const T* src, int64_t tok0, int64_t heads, int64_t head, int r0,
                                           int n, int cnt) {
  if constexpr (std::is_same<T, bf16>::value)
    load_tile_async<d, false>(dst, Cfg<d>::LD, src, tok0, heads, head, r0, n, cnt);
  else
    load_tile<d>(dst, src, tok0, heads, head, r0, n, cnt, [](int) { return 1.f; });
}

// The last key of the 64-key tile that holds key j: the reference of the factored gate.
__device__ __forceinline__ int tile_last_key(int j, int cnt) { return min(j | (kFT - 1), cnt - 1); }

// The dkv kernels' per-query-tile staging into slot buf: the row statistics (1 / den, dy . y) of
// queries qb0 .. qb0 + 63 of q head hq_i (threads 0 .. 31, 16 bytes each with cp.async: the caller
// commits; qb0 + 64 <= tpad, rows past t hold zeros) and their factors e^{G_i - G_kl} against the
// last key of each 64-key half of the block from key kb (threads 0 .. 127).
__device__ __forceinline__ void stage_query_rows(const FlashArgs& p, float2* rsb, float* ras, const float* Gs,
                                                 int64_t bi, int64_t hq_i, int qb0, int kb, int cnt, int buf) {
  const int tid = threadIdx.x;
  if (tid < kFT / 2) cp_async16(rsb + buf * kFT + 2 * tid, p.rowstat + (bi * p.hq + hq_i) * p.tpad + qb0 + 2 * tid);
  if (tid < 2 * kFT) {
    const int half = tid / kFT, i = qb0 + tid % kFT;
    const float gkl = Gs[tile_last_key(kb + half * kFT, cnt)];
    ras[(buf * 2 + half) * kFT + tid % kFT] = i < cnt ? __expf(Gs[i] - gkl) : 0.f;
  }
}

// e^{G_kl - G_j} for the keys of the tile at kb0 (zeros past cnt), by the block's first 64 threads.
__device__ __forceinline__ void column_factors(float* cb, const float* Gs, int kb0, int cnt) {
  if (threadIdx.x < kFT) {
    const int j = kb0 + threadIdx.x;
    cb[threadIdx.x] = j < cnt ? __expf(Gs[tile_last_key(kb0, cnt)] - Gs[j]) : 0.f;
  }
}

// A fragments of a warp's 16 rows x (16 * KS) columns of a [rows][LD] bf16 tile.
template <int KS, int LD>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[KS][4], const bf16* tile, int row0, int lane) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    ldsm4(a[ks], tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
}

// s[16 x 64] += A[16 x d] . B^T, B a [64][LD] tile (rows = the n index).
template <int KS, int LD>
__device__ __forceinline__ void gemm_abt(float (&s)[8][4], const uint32_t (&a)[KS][4], const bf16* b_tile, int lane) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm4(b, b_tile + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
      mma(s[2 * np], a[ks], b[0], b[1]);
      mma(s[2 * np + 1], a[ks], b[2], b[3]);
    }
}

// The same with the A fragments read from shared memory per k-step (4 live registers instead of
// 4 KS): the same MMAs in the same order, so the same sums.
// NP: 16-key column pairs of B (4: a 64-key tile; 2: half of one, b_tile at its first key).
template <int KS, int LD, int NP = 4>
__device__ __forceinline__ void gemm_abt_sa(float (&s)[2 * NP][4], const bf16* a_tile, int row0, const bf16* b_tile,
                                            int lane) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[1][4];
    ldsm4(a[0], a_tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t b[4];
      ldsm4(b, b_tile + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
      mma(s[2 * np], a[0], b[0], b[1]);
      mma(s[2 * np + 1], a[0], b[2], b[3]);
    }
  }
}

// acc[16 x d] += P[16 x 16 KK] . B, P in accumulator layout (rounded to bf16), B a [16 KK][LD] tile.
// With den: also den[0] / den[2] += the row sums of the rounded P (an MMA against ones), so that the
// normaliser sums exactly the weights the numerator used (at t = 1, y = v exactly; dq / dk = 0).
template <int KK, int ND, int LD>
__device__ __forceinline__ void gemm_pb(float (&acc)[ND][4], const float (&p)[2 * KK][4], const bf16* b_tile,
                                        int lane, float* den = nullptr) {
  constexpr uint32_t kOnes = 0x3f803f80u;  // bf16 (1, 1)
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    uint32_t A[4];
    A[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
    A[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
    A[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    A[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
    const bf16* bp = b_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
    for (int np = 0; np < ND / 2; ++np) {
      uint32_t b[4];
      ldsm4t(b, bp + np * 16);
      mma(acc[2 * np], A, b[0], b[1]);
      mma(acc[2 * np + 1], A, b[2], b[3]);
    }
    if (den) mma(*reinterpret_cast<float(*)[4]>(den), A, kOnes, kOnes);
  }
}

// The same with P already packed into A fragments (pack_a_frag).
template <int KK, int ND, int LD>
__device__ __forceinline__ void gemm_ab(float (&acc)[ND][4], const uint32_t (&A)[KK][4], const bf16* b_tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const bf16* bp = b_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
    for (int np = 0; np < ND / 2; ++np) {
      uint32_t b[4];
      ldsm4t(b, bp + np * 16);
      mma(acc[2 * np], A[kk], b[0], b[1]);
      mma(acc[2 * np + 1], A[kk], b[2], b[3]);
    }
  }
}

template <int ND> __device__ __forceinline__ void zero(float (&a)[ND][4]) {
#pragma unroll
  for (int i = 0; i < ND; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[i][e] = 0.f;
}

// Sum over the 4 lanes of a quad (the lanes that hold one accumulator row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The kernels' epilogues, shared by the mma.sync and wgmma kernels (a warp's rows i0 / j0 and
// i1 = i0 + 8 in the accumulator layout: columns nt * 8 + 2 tq, + 1). Rows at or past cnt are skipped.
// forward: y = acc / den (and the fp32 y and 1 / den the backward reads, when kept)
template <int d, typename T>
__device__ __forceinline__ void store_forward_rows(const FlashArgs& p, const float (&acc)[d / 8][4], const float (&den)[4],
                                                   int i0, int i1, int cnt, int64_t tok0, int64_t bi, int64_t hqi,
                                                   int tq) {
  constexpr int ND = d / 8;
  const float inv0 = 1.f / den[0], inv1 = 1.f / den[2];  // (every column of den holds the row sum)
  T* Y = static_cast<T*>(p.y);
  const bool v0 = i0 < cnt, v1 = i1 < cnt;
#pragma unroll
  for (int nt = 0; nt < ND; ++nt) {
    const int col = nt * 8 + 2 * tq;
    const int64_t o0 = ((tok0 + i0) * p.hq + hqi) * d + col, o1 = ((tok0 + i1) * p.hq + hqi) * d + col;
    if (v0) IO<T>::store2(Y + o0, acc[nt][0] * inv0, acc[nt][1] * inv0);
    if (v1) IO<T>::store2(Y + o1, acc[nt][2] * inv1, acc[nt][3] * inv1);
    if (p.y32) {
      if (v0) *reinterpret_cast<float2*>(p.y32 + o0) = make_float2(acc[nt][0] * inv0, acc[nt][1] * inv0);
      if (v1) *reinterpret_cast<float2*>(p.y32 + o1) = make_float2(acc[nt][2] * inv1, acc[nt][3] * inv1);
    }
  }
  if (p.inv_den && tq == 0) {
    if (v0) p.inv_den[(bi * p.hq + hqi) * p.t + i0] = inv0;
    if (v1) p.inv_den[(bi * p.hq + hqi) * p.t + i1] = inv1;
  }
}
// dq, and q . dq per row (the dlog_g row term; dot0 / dot1: this thread's partial sums)
template <int d, typename T>
__device__ __forceinline__ void store_dq_rows(const FlashArgs& p, const float (&acc)[d / 8][4], float dot0, float dot1,
                                              int i0, int i1, int cnt, int64_t tok0, int64_t hqi, int tq) {
  constexpr int ND = d / 8;
  T* DQ = static_cast<T*>(p.dq);
  const bool v0 = i0 < cnt, v1 = i1 < cnt;
#pragma unroll
  for (int nt = 0; nt < ND; ++nt) {
    const int col = nt * 8 + 2 * tq;
    if (v0) IO<T>::store2(DQ + ((tok0 + i0) * p.hq + hqi) * d + col, acc[nt][0], acc[nt][1]);
    if (v1) IO<T>::store2(DQ + ((tok0 + i1) * p.hq + hqi) * d + col, acc[nt][2], acc[nt][3]);
  }
  dot0 = quad_sum(dot0);
  dot1 = quad_sum(dot1);
  if (p.dGq && tq == 0) {
    if (v0) p.dGq[(tok0 + i0) * p.hq + hqi] = dot0 / p.scale;
    if (v1) p.dGq[(tok0 + i1) * p.hq + hqi] = dot1 / p.scale;
  }
}
// dk, dv, and k . dk per key row (summed over the GQA group)
template <int d, typename T>
__device__ __forceinline__ void store_dkv_rows(const FlashArgs& p, const float (&dk)[d / 8][4],
                                               const float (&dv)[d / 8][4], float dot0, float dot1, int j0, int j1,
                                               int cnt, int64_t tok0, int64_t h, int tq) {
  constexpr int ND = d / 8;
  T* DK = static_cast<T*>(p.dk);
  T* DV = static_cast<T*>(p.dv);
  const bool v0 = j0 < cnt, v1 = j1 < cnt;
#pragma unroll
  for (int nt = 0; nt < ND; ++nt) {
    const int col = nt * 8 + 2 * tq;
    const int64_t o0 = ((tok0 + j0) * p.hk + h) * d + col, o1 = ((tok0 + j1) * p.hk + h) * d + col;
    if (v0) {
      IO<T>::store2(DK + o0, dk[nt][0], dk[nt][1]);
      IO<T>::store2(DV + o0, dv[nt][0], dv[nt][1]);
    }
    if (v1) {
      IO<T>::store2(DK + o1, dk[nt][2], dk[nt][3]);
      IO<T>::store2(DV + o1, dv[nt][2], dv[nt][3]);
    }
  }
  dot0 = quad_sum(dot0);
  dot1 = quad_sum(dot1);
  if (p.dGk && tq == 0) {
    if (v0) p.dGk[(tok0 + j0) * p.hk + h] = dot0 / p.scale;
    if (v1) p.dGk[(tok0 + j1) * p.hk + h] = dot1 / p.scale;
  }
}

// The query-row blocks of the forward and of dq: one block per (128 rows, q head, batch), the
// longest rows first; keys [0, nk) in 64-key K / V tiles, double-buffered (cp.async for bf16) with
// their column factors.
template <int d, typename T> struct QueryBlock {
  static constexpr int LD = Cfg<d>::LD;
  const FlashArgs& p;
  int row0, cnt, nk, ntiles;
  int64_t hqi, bi, h, tok0;

  __device__ explicit QueryBlock(const FlashArgs& a) : p(a) {
    row0 = (gridDim.x - 1 - blockIdx.x) * kFR;
    hqi = blockIdx.y;
    bi = blockIdx.z;
    h = hqi / (p.hq / p.hk);
    cnt = (int)p.t;
    nk = min(cnt, row0 + kFR);
    ntiles = (nk + kFT - 1) / kFT;
    tok0 = bi * p.t;
  }
  __device__ void load_rows(bf16* dst, const void* src) const {
    load_tile<d>(dst, static_cast<const T*>(src), tok0, p.hq, hqi, row0, kFR, cnt, [](int) { return 1.f; });
  }
  __device__ void load_kv(int kb0, bf16* dst) const {
    flash_tile<d>(dst, static_cast<const T*>(p.k), tok0, p.hk, h, kb0, kFT, cnt);
    flash_tile<d>(dst + kFT * LD, static_cast<const T*>(p.v), tok0, p.hk, h, kb0, kFT, cnt);
  }
  // Before the rows are loaded: the gates and the first K / V tile (in flight).
  __device__ void start(float* Gs, bf16* kv) const {
    stage_gates(Gs, p.gcum + (bi * p.hk + h) * p.t, 0, nk, cnt);
    load_kv(0, kv);
  }
  // Top of key tile it: every warp is done with tile it - 1's buffers, tile it + 1 starts loading,
  // tile it (K, V, column factors) is visible to all.
  __device__ void next_tile(int it, bf16* kv, float* cbs, const float* Gs) const {
    __syncthreads();
    if (it + 1 < ntiles) {
      load_kv((it + 1) * kFT, kv + ((it + 1) & 1) * 2 * kFT * LD);
      column_factors(cbs + ((it + 1) & 1) * kFT, Gs, (it + 1) * kFT, cnt);
    }
    cp_commit();
    cp_wait<1>();
    __syncthreads();
  }
  // v14 (kPipe): K runs one tile ahead of V in the same two {K, V} slots. Group n + 2, committed at
  // the top of tile n, holds K(n + 2) (into K slot n & 1: K(n) fed the S GEMM of tile n, issued
  // during tile n - 1) and V(n + 1) (into V slot (n + 1) & 1: V(n - 1) fed tile n - 1's P.V). After
  // the wait, group n + 1 = {K(n + 1), V(n)} has landed: tile n's body reads K(n + 1) (the next S
  // GEMM), V(n) and the column factors of tile n, while group n + 2 writes the other K and V slots.
  // Shared memory as v12 (4 kFT x LD). Prologue: group 0 = {K(0), V(0), the rows} (start), then
  // start_pipe: group 1 = {K(1)}, waits for group 0 (K(0) for the first S GEMM) and syncs.
  __device__ void start_pipe(bf16* kv) const {
    if (1 < ntiles) flash_tile<d>(kv + 2 * kFT * LD, static_cast<const T*>(p.k), tok0, p.hk, h, kFT, kFT, cnt);
    cp_commit();
    cp_wait<1>();
    __syncthreads();
  }
  // v14 dq (kPipe): a 3-slot ring, slot n % 3 = {K(n), V(n), column factors of tile n}; tile n's
  // body also issues the first S / dy.V GEMMs of tile n + 1, so tiles n and n + 1 are read while
  // tile n + 2 loads into the slot of tile n - 1 (free: every warp has passed the barrier after
  // tile n - 1's body). Group n (tile n) is committed at the top of tile n - 2; prologue: group 0
  // = {tile 0, the rows} (start), then start_ring3: group 1 = {tile 1}; waits for group 0, syncs.
  // 6 kFT x LD of shared memory instead of 4 (flash_dq_smem).
  __device__ void start_ring3(bf16* kv, float* cbs, const float* Gs) const {
    if (1 < ntiles) {
      load_kv(kFT, kv + 2 * kFT * LD);
      column_factors(cbs + kFT, Gs, kFT, cnt);
    }
    cp_commit();
    cp_wait<1>();
    __syncthreads();
  }
  __device__ void next_tile_ring3(int it, bf16* kv, float* cbs, const float* Gs) const {
    __syncthreads();
    if (it + 2 < ntiles) {
      const int sl = (it + 2) % 3;
      load_kv((it + 2) * kFT, kv + sl * 2 * kFT * LD);
      column_factors(cbs + sl * kFT, Gs, (it + 2) * kFT, cnt);
    }
    cp_commit();
    cp_wait<1>();
    __syncthreads();
  }
  // v16 forward (kRing): a 3-slot ring, slot n % 3 = {K(n), V(n), column factors of tile n}, and one
  // block barrier per tile instead of next_tile's two. At the top of tile n: wait for group n (this
  // thread's copies), then the barrier makes every thread's copies and column factors visible and
  // tells that every warp is done with tile n - 1, whose slot then takes tile n + 2. Prologue: group
  // 0 = {tile 0, the rows} (start), then start_ring: group 1 = {tile 1}. 6 kFT x LD of shared memory.
  __device__ void start_ring(bf16* kv, float* cbs, const float* Gs) const {
    if (1 < ntiles) {
      load_kv(kFT, kv + 2 * kFT * LD);
      column_factors(cbs + kFT, Gs, kFT, cnt);
    }
    cp_commit();
  }
  __device__ void next_tile_ring(int it, bf16* kv, float* cbs, const float* Gs) const {
    cp_wait<1>();
    __syncthreads();
    if (it + 2 < ntiles) {
      const int sl = (it + 2) % 3;
      load_kv((it + 2) * kFT, kv + sl * 2 * kFT * LD);
      column_factors(cbs + sl * kFT, Gs, (it + 2) * kFT, cnt);
    }
    cp_commit();
  }
  __device__ void next_tile_pipe(int it, bf16* kv, float* cbs, const float* Gs) const {
    __syncthreads();
    if (it + 2 < ntiles)
      flash_tile<d>(kv + (it & 1) * 2 * kFT * LD, static_cast<const T*>(p.k), tok0, p.hk, h, (it + 2) * kFT, kFT, cnt);
    if (it + 1 < ntiles) {
      flash_tile<d>(kv + ((it + 1) & 1) * 2 * kFT * LD + kFT * LD, static_cast<const T*>(p.v), tok0, p.hk, h,
                    (it + 1) * kFT, kFT, cnt);
      column_factors(cbs + ((it + 1) & 1) * kFT, Gs, (it + 1) * kFT, cnt);
    }
    cp_commit();
    cp_wait<1>();
    __syncthreads();
  }
};

// ------------------------------------------------------------------------------------------------
// Forward: one block per (128 query rows, q head, batch), the longest rows first; K / V tiles of 64
// keys double-buffered (cp.async for bf16).
// ------------------------------------------------------------------------------------------------
// The forward's element-wise pass over a warp's 16 x 64 score tile s (rows i0, i1 = i0 + 8 per
// thread, columns kb0 + nt * 8 + 2 tq + {0, 1}), shared by the v12 and the pipelined (v14) forward.
// Below the diagonal (every key before every row): p = s^2 scale^2 e^{G_i - G_kl} e^{G_kl - G_j},
// ra = e^{G_i - G_kl} scale^2 per row, cb[j - kb0] = e^{G_kl - G_j} per column.
__device__ __forceinline__ void weigh_below_diagonal(float (&s)[8][4], const float* cb, float ra0, float ra1, int tq) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const float2 c = *reinterpret_cast<const float2*>(cb + nt * 8 + 2 * tq);
    s[nt][0] = s[nt][0] * s[nt][0] * ra0 * c.x;
    s[nt][1] = s[nt][1] * s[nt][1] * ra0 * c.y;
    s[nt][2] = s[nt][2] * s[nt][2] * ra1 * c.x;
    s[nt][3] = s[nt][3] * s[nt][3] * ra1 * c.y;
  }
}
// The diagonal tile: rows past the tile's last key kl keep the factored gate; the others take
// e^{G_i - G_j} per element, zero for keys after the row or past cnt.
__device__ __forceinline__ void weigh_diagonal(float (&s)[8][4], const float* cb, const float* Gs, int kb0, int kl,
                                               int cnt, int i0, int i1, float gi0, float gi1, float ra0, float ra1,
                                               float sc2, int tq) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e < 2 ? i0 : i1, j = kb0 + nt * 8 + 2 * tq + (e & 1);
      float ex;
      if (i > kl) ex = (e < 2 ? ra0 : ra1) * cb[j - kb0];
      else ex = (j <= i && j < cnt) ? __expf((e < 2 ? gi0 : gi1) - Gs[j]) * sc2 : 0.f;
      s[nt][e] = s[nt][e] * s[nt][e] * ex;
    }
}

template <int d, typename T, int MINB, bool kPipe = false, bool kRing = false>
__global__ void __launch_bounds__(kThreads, MINB) flash_fwd_kernel(const FlashArgs p) {
  static_assert(!(kPipe && kRing), "v16's ring is for the v12 forward");
  constexpr int LD = Cfg<d>::LD, ND = d / 8, KS = d / 16, NS = kRing ? 3 : 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);  // [128][LD]
  bf16* kv = qs + kFR * LD;                      // NS x {K [64][LD], V [64][LD]}
  float* cbs = reinterpret_cast<float*>(kv + NS * 2 * kFT * LD);  // NS x [64] column factors
  float* Gs = cbs + NS * kFT;                                     // [tpad] gate cumsums
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const QueryBlock<d, T> blk(p);
  const int row0 = blk.row0, cnt = blk.cnt;
  const int64_t hqi = blk.hqi, bi = blk.bi, tok0 = blk.tok0;
  blk.start(Gs, kv);
  blk.load_rows(qs, p.q);
  cp_commit();
  __syncthreads();
  column_factors(cbs, Gs, 0, cnt);
  if constexpr (kPipe) blk.start_pipe(kv);
  if constexpr (kRing) blk.start_ring(kv, cbs, Gs);
  uint32_t aq[kPipe ? 1 : KS][4];  // (v14 reads q's fragments from shared memory per k-step)
  if constexpr (!kPipe) load_a_frags<KS, LD>(aq, qs, warp * 16, lane);
  const int wfirst = row0 + warp * 16, i0 = wfirst + g, i1 = i0 + 8;
  const float gi0 = Gs[min(i0, cnt - 1)], gi1 = Gs[min(i1, cnt - 1)];
  const float sc2 = p.scale * p.scale;
  float acc[ND][4];
  zero(acc);
  float den[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (kPipe) {
    // v14: the S GEMM of tile it + 1 is issued before tile it's element-wise pass and P.V, so the
    // tensor cores work on the next tile while the ALU / MUFU pass runs (two score tiles in
    // registers). A warp whose tile it lies below the diagonal needs tile it + 1 too (its first row
    // is past the tile's last key, so it + 1 < ntiles and the next tile starts at or before that
    // row); a warp on its diagonal tile has no further tile (wfirst is a multiple of 16, so the
    // next tile would start past its last row). So only the factored (below) branch issues the next
    // S GEMM, in the same basic block as the element-wise pass. Warps whose rows all lie past t
    // (v12 computes them and stores nothing) skip every tile, which keeps "below" => "a next tile".
    // Per element the same float operations in the same order as v12, the P.V MMAs in the same
    // order over tiles: y, y32 and 1 / den are bitwise v12's.
    const bool live = wfirst < cnt;
    float sa[8][4], sb[8][4];
    if (live) {
      zero(sa);
      gemm_abt_sa<KS, LD>(sa, qs, warp * 16, kv, lane);
    }
    auto step = [&](int it, float (&s)[8][4], float (&sn)[8][4]) {
      const int kb0 = it * kFT;
      blk.next_tile_pipe(it, kv, cbs, Gs);
      if (!live || kb0 > wfirst + 15) return;
      const bf16* Vs = kv + (it & 1) * 2 * kFT * LD + kFT * LD;
      const float* cb = cbs + (it & 1) * kFT;
      const int kl = tile_last_key(kb0, cnt);
      const float gkl = Gs[kl];
      const float ra0 = __expf(gi0 - gkl) * sc2, ra1 = __expf(gi1 - gkl) * sc2;
      if (wfirst > kl) {
        zero(sn);
        gemm_abt_sa<KS, LD>(sn, qs, warp * 16, kv + ((it + 1) & 1) * 2 * kFT * LD, lane);
        weigh_below_diagonal(s, cb, ra0, ra1, tq);
      } else {
        weigh_diagonal(s, cb, Gs, kb0, kl, cnt, i0, i1, gi0, gi1, ra0, ra1, sc2, tq);
        // (this warp's last tile: sn is never read. Defined here, after the pass, so that the
        // register allocator does not keep the other tile's values alive through it.)
        zero(sn);
      }
      gemm_pb<4, ND, LD>(acc, s, Vs, lane, den);
    };
    // unrolled by two so that the two score tiles swap roles without register copies
    for (int it = 0; it < blk.ntiles; it += 2) {
      step(it, sa, sb);
      if (it + 1 < blk.ntiles) step(it + 1, sb, sa);
    }
  } else
  for (int it = 0; it < blk.ntiles; ++it) {
    const int kb0 = it * kFT;
    if constexpr (kRing) blk.next_tile_ring(it, kv, cbs, Gs);
    else blk.next_tile(it, kv, cbs, Gs);
    if (kb0 > wfirst + 15) continue;  // every key after every row of this warp
    const int sl = kRing ? it % 3 : it & 1;
    const bf16* Ks = kv + sl * 2 * kFT * LD;
    const float* cb = cbs + sl * kFT;
    float s[8][4];
    zero(s);
    gemm_abt<KS, LD>(s, aq, Ks, lane);
    const int kl = tile_last_key(kb0, cnt);
    const float gkl = Gs[kl];
    const float ra0 = __expf(gi0 - gkl) * sc2, ra1 = __expf(gi1 - gkl) * sc2;
    if (wfirst > kl) {  // below the diagonal: p = s^2 scale^2 e^{G_i - G_kl} e^{G_kl - G_j}
      weigh_below_diagonal(s, cb, ra0, ra1, tq);
    } else {
      weigh_diagonal(s, cb, Gs, kb0, kl, cnt, i0, i1, gi0, gi1, ra0, ra1, sc2, tq);
    }
    gemm_pb<4, ND, LD>(acc, s, Ks + kFT * LD, lane, den);
  }
  cp_wait<0>();

  store_forward_rows<d, T>(p, acc, den, i0, i1, cnt, tok0, bi, hqi, tq);
}

// The gradient of one score and its dlog_g term, shared by flash_dq_kernel and flash_dkv_kernel so
// both round the same values: x = scale q.k, ex the gate factor, da = dy.v, (delta, c) = (dy.y,
// 2 scale / den) of the query row. Returns a = d loss / d(q.k) (dq = sum a k, dk = sum a q); adds
// a x to dot.
__device__ __forceinline__ float score_grad(float x, float ex, float da, float delta, float c, float& dot) {
  const float a = x * ex * (da - delta) * c;
  dot += a * x;
  return a;
}

// The per-row and per-tile values of dq's element-wise pass (a warp's rows i0 and i1 = i0 + 8).
struct DqPassArgs {
  int i0, i1, kb0, kl, cnt, tq;
  float gi0, gi1, ra0, ra1, scale, delta0, delta1, c0, c1;
};

// dq's element-wise pass over NT 8-key groups from column col0 of the key tile at kb0: s (q.k) becomes
// each score's gradient (score_grad) and its dlog_g term joins the row dots. Below the diagonal
// (kBelow, or below at run time) the gate is the factored ra * cb; on the diagonal tile it is per
// element. Shared by v12's whole tiles and v14's half-tile units, so both compute the same bits.
template <int NT, bool kBelow>
__device__ __forceinline__ void dq_pass(float (&s)[NT][4], const float (&da)[NT][4], int col0, bool below,
                                        const DqPassArgs& a, const float* cb, const float* Gs, float& dot0,
                                        float& dot1) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e < 2 ? a.i0 : a.i1, c = col0 + nt * 8 + 2 * a.tq + (e & 1), j = a.kb0 + c;
      float ex;
      if (kBelow || below || i > a.kl) ex = (e < 2 ? a.ra0 : a.ra1) * cb[c];
      else ex = (j <= i && j < a.cnt) ? __expf((e < 2 ? a.gi0 : a.gi1) - Gs[j]) : 0.f;
      const float x = s[nt][e] * a.scale;
      s[nt][e] = e < 2 ? score_grad(x, ex, da[nt][e], a.delta0, a.c0, dot0)
                       : score_grad(x, ex, da[nt][e], a.delta1, a.c1, dot1);
    }
}

// ------------------------------------------------------------------------------------------------
// dq: one block per (128 query rows, q head, batch), the longest rows first; K / V tiles of 64 keys.
// Writes dq and q.dq per row (the dlog_g row term, summed in fp32 from the a_ij x_ij).
// ------------------------------------------------------------------------------------------------
template <int d, typename T, int MINB, bool kPipe = false>
__global__ void __launch_bounds__(kThreads, MINB) flash_dq_kernel(const FlashArgs p) {
  constexpr int LD = Cfg<d>::LD, ND = d / 8, KS = d / 16, NS = kPipe ? 3 : 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);  // [128][LD]
  bf16* dys = qs + kFR * LD;                     // [128][LD]
  bf16* kv = dys + kFR * LD;                     // NS x {K, V}
  float* cbs = reinterpret_cast<float*>(kv + NS * 2 * kFT * LD);  // NS x [64]
  float* Gs = cbs + NS * kFT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const QueryBlock<d, T> blk(p);
  const int row0 = blk.row0, cnt = blk.cnt;
  const int64_t hqi = blk.hqi, bi = blk.bi, tok0 = blk.tok0;
  blk.start(Gs, kv);
  blk.load_rows(qs, p.q);
  blk.load_rows(dys, p.dy);
  cp_commit();
  __syncthreads();
  column_factors(cbs, Gs, 0, cnt);
  if constexpr (kPipe) blk.start_ring3(kv, cbs, Gs);
  const int wfirst = row0 + warp * 16, i0 = wfirst + g, i1 = i0 + 8;
  const float gi0 = Gs[min(i0, cnt - 1)], gi1 = Gs[min(i1, cnt - 1)];
  const float2* rst = p.rowstat + (bi * p.hq + hqi) * p.tpad;
  const float2 st0 = rst[i0], st1 = rst[i1];  // i < tpad
  const float c0 = 2.f * st0.x * p.scale, c1 = 2.f * st1.x * p.scale;
  float acc[ND][4];
  zero(acc);
  float dot0 = 0.f, dot1 = 0.f;
  if constexpr (kPipe) {
    // v14: the key tile in two 32-key halves ("units"), software-pipelined: each unit issues the
    // q.K^T and dy.V^T GEMMs of the next unit (the tile's second half, or the next tile's first)
    // before its own element-wise pass and its ds.K MMAs. Halves, not whole tiles: two whole
    // (s, dy.v) tile pairs would need 64 more registers than 128 allow. Tile n + 1's first half is
    // issued during tile n, hence the 3-slot K / V ring (QueryBlock::next_tile_ring3). As in the
    // forward: a warp below the diagonal in tile n also needs tile n + 1, a warp on its diagonal
    // tile needs no further one, and warps with every row past t skip every tile.
    // Per element the same float operations as v12; the da / dot sums over the same keys in the
    // same order (v12's nt = 0..7 is the halves' 0..3, 0..3) and the ds.K MMAs in the same k order
    // (kk = 0, 1 | 2, 3): dq and q.dq are bitwise v12's.
    const bool live = wfirst < cnt;
    float sa[4][4], ga[4][4], sb[4][4], gb[4][4];  // (s, dy.v) of the current and the next half
    // the GEMMs of half hf of the tile in ring slot sl
    auto gemms = [&](float (&s)[4][4], float (&da)[4][4], int sl, int hf) {
      const bf16* Ks = kv + sl * 2 * kFT * LD + hf * 32 * LD;
      zero(s);
      zero(da);
      gemm_abt_sa<KS, LD, 2>(s, qs, warp * 16, Ks, lane);
      gemm_abt_sa<KS, LD, 2>(da, dys, warp * 16, Ks + kFT * LD, lane);
    };
    if (live) gemms(sa, ga, 0, 0);
    for (int it = 0; it < blk.ntiles; ++it) {
      const int kb0 = it * kFT;
      blk.next_tile_ring3(it, kv, cbs, Gs);
      if (!live || kb0 > wfirst + 15) continue;
      const int sl = it % 3;
      const bf16* Ks = kv + sl * 2 * kFT * LD;
      const float* cb = cbs + sl * kFT;
      const int kl = tile_last_key(kb0, cnt);
      const float gkl = Gs[kl];
      const float ra0 = __expf(gi0 - gkl), ra1 = __expf(gi1 - gkl);
      const bool below = wfirst > kl;
      // the element-wise pass of half hf (v12's, with its below-the-diagonal case compiled apart:
      // there v12's per-element test picks ra * cb for every element, the same product)
      const DqPassArgs args{i0, i1, kb0, kl, cnt, tq, gi0, gi1, ra0, ra1, p.scale, st0.y, st1.y, c0, c1};
      auto pass = [&](float (&s)[4][4], const float (&da)[4][4], int hf) {
        if (below) dq_pass<4, true>(s, da, hf * 32, true, args, cb, Gs, dot0, dot1);
        else dq_pass<4, false>(s, da, hf * 32, false, args, cb, Gs, dot0, dot1);
      };
      if (below) {
        gemms(sb, gb, sl, 1);  // the second half's GEMMs (this tile)
        pass(sa, ga, 0);
        gemm_pb<2, ND, LD>(acc, sa, Ks, lane);
        gemms(sa, ga, (it + 1) % 3, 0);  // the next tile's first half (see above)
        pass(sb, gb, 1);
        gemm_pb<2, ND, LD>(acc, sb, Ks + 32 * LD, lane);
      } else {  // the diagonal tile, the warp's last: not pipelined (its masked pass needs the registers)
        pass(sa, ga, 0);
        gemm_pb<2, ND, LD>(acc, sa, Ks, lane);
        gemms(sb, gb, sl, 1);
        pass(sb, gb, 1);
        gemm_pb<2, ND, LD>(acc, sb, Ks + 32 * LD, lane);
        zero(sa);  // (never read; defined here so that they hold no live values through the tile)
        zero(ga);
      }
    }
  } else
  for (int it = 0; it < blk.ntiles; ++it) {
    const int kb0 = it * kFT;
    blk.next_tile(it, kv, cbs, Gs);
    if (kb0 > wfirst + 15) continue;
    const bf16* Ks = kv + (it & 1) * 2 * kFT * LD;
    const float* cb = cbs + (it & 1) * kFT;
    float s[8][4], da[8][4];
    zero(s);
    zero(da);
    {  // (q and dy fragments reloaded per tile: d = 64 stays within 128 registers, 2 blocks per SM)
      uint32_t a[KS][4];
      load_a_frags<KS, LD>(a, qs, warp * 16, lane);
      gemm_abt<KS, LD>(s, a, Ks, lane);
      load_a_frags<KS, LD>(a, dys, warp * 16, lane);
      gemm_abt<KS, LD>(da, a, Ks + kFT * LD, lane);
    }
    const int kl = tile_last_key(kb0, cnt);
    const float gkl = Gs[kl];
    const float ra0 = __expf(gi0 - gkl), ra1 = __expf(gi1 - gkl);
    const bool below = wfirst > kl;
    const DqPassArgs args{i0, i1, kb0, kl, cnt, tq, gi0, gi1, ra0, ra1, p.scale, st0.y, st1.y, c0, c1};
    dq_pass<8, false>(s, da, 0, below, args, cb, Gs, dot0, dot1);
    gemm_pb<4, ND, LD>(acc, s, Ks, lane);
  }
  cp_wait<0>();

  store_dq_rows<d, T>(p, acc, dot0, dot1, i0, i1, cnt, tok0, hqi, tq);
}

// The per-warp values of dkv's element-wise pass (the warp's key rows j0 and j1 = j0 + 8).
struct DkvPassArgs {
  int qb0, j0, j1, kl, cnt, tq;
  float cb0, cb1, scale;
};

// dkv's element-wise pass over a warp's 16 keys x 32 queries (half qh of the query tile at qb0;
// accumulator rows = keys, columns = queries): s (k.q) becomes each score's gradient (score_grad,
// for dk) and aw the bf16 A fragments of p_ij / den_i (for dv); the dlog_g terms join the key dots.
// rs / ra: the tile's row statistics (1 / den, dy . y) and query factors e^{G_i - G_kl}.
// kBelow: every query after the reference key kl, so the factored gate and no masks. A compile-time
// split, so that the hot (below) pass has no per-element branch: with `below || i > kl` at run time,
// ptxas wrapped each of the 16 elements in its own divergent region (BSSY / BSYNC). Shared by the
// mma.sync and the wgmma dkv kernels.
template <bool kBelow>
__device__ __forceinline__ void dkv_pass(float (&s)[4][4], const float (&da)[4][4], uint32_t (&aw)[2][4], int qh,
                                         const float2* rs, const float* ra, const float* Gs, const DkvPassArgs& a,
                                         float& dot0, float& dot1) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int li = qh * 32 + nt * 8 + 2 * a.tq;
    const float4 st = *reinterpret_cast<const float4*>(rs + li);  // rows li, li + 1
    const float2 rai = *reinterpret_cast<const float2*>(ra + li);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int j = hr ? a.j1 : a.j0;
      const float cbj = hr ? a.cb1 : a.cb0;
      float w2[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int e = 2 * hr + c, i = a.qb0 + li + c;
        const float r_i = c ? st.z : st.x, delta = c ? st.w : st.y;
        float ex;
        if (kBelow || i > a.kl) ex = (c ? rai.y : rai.x) * cbj;
        else ex = (j <= i && i < a.cnt && j < a.cnt) ? __expf(Gs[i] - Gs[j]) : 0.f;
        const float x = s[nt][e] * a.scale;
        w2[c] = x * ex * x * r_i;
        s[nt][e] = score_grad(x, ex, da[nt][e], delta, 2.f * r_i * a.scale, hr ? dot1 : dot0);
      }
      aw[nt >> 1][(nt & 1) * 2 + hr] = pack_bf16(w2[0], w2[1]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dk, dv: one block per (128 key rows, KV head, batch), the longest first; for each q head of the
// GQA group, q / dy / row-statistic tiles of 64 queries from the block's first key on. Each warp's
// 16 keys lie in one 64-key tile, so its gate reference kl is fixed; the query factors
// e^{G_i - G_kl} of the two 64-key halves of the block are computed once per query tile.
// KREG: the warp's k and v fragments stay in registers (off: reloaded per k-step from shared
// memory, which keeps d = 64 within 128 registers for 2 blocks per SM).
// ------------------------------------------------------------------------------------------------
// kRing (v16): the query tiles in a 3-slot ring, so that one block barrier per tile suffices: at the
// top of tile n, after the wait for tile n's copies, it makes them visible and tells that every warp
// is done with tile n - 1, whose slot then takes tile n + 2 (v12: two slots, a barrier before the
// next tile's copies are issued and one after the wait). The same arithmetic in the same order.
template <int d, typename T, int MINB, bool kRing = false>
__global__ void __launch_bounds__(kThreads, MINB) flash_dkv_kernel(const FlashArgs p) {
  constexpr int LD = Cfg<d>::LD, ND = d / 8, KS = d / 16, NS = kRing ? 3 : 2;
  constexpr bool KREG = false;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* ks = reinterpret_cast<bf16*>(smem_raw);  // [128][LD]
  bf16* vs = ks + kFR * LD;                      // [128][LD]
  bf16* qb = vs + kFR * LD;                      // NS x {q [64][LD], dy [64][LD]}
  float2* rsb = reinterpret_cast<float2*>(qb + NS * 2 * kFT * LD);  // NS x [64] (1 / den, dy . y)
  float* ras = reinterpret_cast<float*>(rsb + NS * kFT);             // NS x [2][64] e^{G_i - G_kl}
  float* Gs = ras + NS * 2 * kFT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int kb = blockIdx.x * kFR;
  const int64_t h = blockIdx.y, bi = blockIdx.z;
  const int r = (int)(p.hq / p.hk);
  const int cnt = (int)p.t;
  const int64_t tok0 = bi * p.t;
  const T* Q = static_cast<const T*>(p.q);
  const T* DY = static_cast<const T*>(p.dy);
  auto load_q = [&](int64_t hq_i, int qb0, int buf) {
    bf16* dst = qb + buf * 2 * kFT * LD;
    flash_tile<d>(dst, Q, tok0, p.hq, hq_i, qb0, kFT, cnt);
    flash_tile<d>(dst + kFT * LD, DY, tok0, p.hq, hq_i, qb0, kFT, cnt);
    stage_query_rows(p, rsb, ras, Gs, bi, hq_i, qb0, kb, cnt, buf);
  };

  stage_gates(Gs, p.gcum + (bi * p.hk + h) * p.t, kb, p.tpad, cnt);
  load_tile<d>(ks, static_cast<const T*>(p.k), tok0, p.hk, h, kb, kFR, cnt, [](int) { return 1.f; });
  load_tile<d>(vs, static_cast<const T*>(p.v), tok0, p.hk, h, kb, kFR, cnt, [](int) { return 1.f; });
  __syncthreads();  // Gs (load_q reads it)
  const int nq = (cnt - kb + kFT - 1) / kFT;  // query tiles per head
  const int total = r * nq;
  load_q(h * r, kb, 0);
  cp_commit();
  if constexpr (kRing) {
    if (1 < total) load_q(h * r + 1 / nq, kb + (1 % nq) * kFT, 1);
    cp_commit();
  }
  const int wfirst = kb + warp * 16, j0 = wfirst + g, j1 = j0 + 8;
  const int kl = tile_last_key(wfirst, cnt), half = warp / 4;
  const float gkl = Gs[kl];
  const float cb0 = j0 < cnt ? __expf(gkl - Gs[j0]) : 0.f, cb1 = j1 < cnt ? __expf(gkl - Gs[j1]) : 0.f;
  uint32_t ak[KREG ? KS : 1][4], av[KREG ? KS : 1][4];
  __syncthreads();  // ks, vs
  if constexpr (KREG) {
    load_a_frags<KS, LD>(ak, ks, warp * 16, lane);
    load_a_frags<KS, LD>(av, vs, warp * 16, lane);
  }
  float dk[ND][4], dv[ND][4];
  zero(dk);
  zero(dv);
  float dot0 = 0.f, dot1 = 0.f;
  for (int it = 0; it < total; ++it) {
    const int qb0 = kb + (it % nq) * kFT;
    int sl;
    if constexpr (kRing) {
      cp_wait<1>();
      __syncthreads();
      if (it + 2 < total) load_q(h * r + (it + 2) / nq, kb + ((it + 2) % nq) * kFT, (it + 2) % 3);
      cp_commit();
      sl = it % 3;
    } else {
      __syncthreads();
      if (it + 1 < total) load_q(h * r + (it + 1) / nq, kb + ((it + 1) % nq) * kFT, (it + 1) & 1);
      cp_commit();
      cp_wait<1>();
      __syncthreads();
      sl = it & 1;
    }
    const bf16* Qs = qb + sl * 2 * kFT * LD;
    const bf16* DYs = Qs + kFT * LD;
    const float2* rs = rsb + sl * kFT;
    const float* ra = ras + (sl * 2 + half) * kFT;
#pragma unroll
    for (int qh = 0; qh < 2; ++qh) {
      const int qh0 = qb0 + qh * 32;
      if (qh0 + 31 < wfirst) continue;  // every query before every key of this warp
      float s[4][4], da[4][4];
      zero(s);
      zero(da);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a_k[4], a_v[4];
        if constexpr (KREG) {
#pragma unroll
          for (int u = 0; u < 4; ++u) a_k[u] = ak[kk][u], a_v[u] = av[kk][u];
        } else {
          const int off = (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8;
          ldsm4(a_k, ks + off);
          ldsm4(a_v, vs + off);
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t b[4];
          const int off = (qh * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
          ldsm4(b, Qs + off);
          mma(s[2 * np], a_k, b[0], b[1]);
          mma(s[2 * np + 1], a_k, b[2], b[3]);
          ldsm4(b, DYs + off);
          mma(da[2 * np], a_v, b[0], b[1]);
          mma(da[2 * np + 1], a_v, b[2], b[3]);
        }
      }
      uint32_t aw[2][4];  // p_ij / den_i as bf16 A fragments (dv_j = sum_i p_ij dy_i / den_i)
      const DkvPassArgs args{qb0, j0, j1, kl, cnt, tq, cb0, cb1, p.scale};
      if (qh0 > kl) dkv_pass<true>(s, da, aw, qh, rs, ra, Gs, args, dot0, dot1);
      else dkv_pass<false>(s, da, aw, qh, rs, ra, Gs, args, dot0, dot1);
      gemm_ab<2, ND, LD>(dv, aw, DYs + qh * 32 * LD, lane);
      gemm_pb<2, ND, LD>(dk, s, Qs + qh * 32 * LD, lane);
    }
  }
  cp_wait<0>();

  store_dkv_rows<d, T>(p, dk, dv, dot0, dot1, j0, j1, cnt, tok0, h, tq);
}

}  // namespace pr
}  // namespace llmtrain
