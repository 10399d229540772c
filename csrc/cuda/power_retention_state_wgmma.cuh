// v18: the chunked backward's state parts on Hopper's warpgroup MMA (wgmma; sm_90a builds, d = 64).
//
// Why: from t = 8K on, dq_kernel and dkv_kernel spend most of their time on the chunk's state S
// (D = 2080 features x [v, z] columns). v12 forms u = dN S^T (D values per row) with mma.sync and
// contracts it through J_phi element by element: ~5 instructions per (row, feature), so both
// kernels are bound by instruction issue (ncu at 64K: dq 692 M instructions at IPC 2.2, HMMA 6.6%
// of them; docs/perf.md, v12). Putting only the MMAs on wgmma does not help (session 15, "v18a",
// branch exp-v18a-triangle-rows: dq 1.36 -> 1.42 ms).
//
// The reformulation moves the contraction onto the tensor cores. With M the symmetric d x d matrix
// (per value column e) M_ab = S_f(a,b) / sqrt2 (a != b), M_aa = S_f(a,a), phi(x) . S_e = x^T M_e x,
// so J_phi(x)^T u with u_f = dN . S_f is, per column c of the head dim,
//   dx_c = sqrt2 (dN . Y^(c)) + (2 - sqrt2) x_c (dN . S_f(c,c)),   Y^(c) = sum_a x_a S_f(min(a,c), max(a,c)),
// and phi(x) . S[:, :d] = (1 / sqrt2) sum_c x_c Y^(c) + (1 - 1 / sqrt2) (x^2) S_diag.
// Y^(c) for the warpgroup's 64 rows is one GEMM, X [64 x 64] times B^(c) [64 x 64] (row a of B^(c) =
// S_f(min(a,c), max(a,c))[0:64], gathered from the state into a swizzled shared-memory tile): twice
// the multiply-adds of u = dN S^T, but the per-row work left is a 64-long dot product (and, for dv,
// an axpy) per c, on fragments already in registers. Its normaliser column (the z term, Y^(c)_64 =
// X . Z[:, c] with Z_ac = z_f(min,max)) and the diagonal terms are three GEMMs over all c at once.
//
// Every GEMM keeps the mma.sync conventions the kernels already use: the wgmma m64nNk16 accumulator
// gives each warp its 16 rows in the m16n8 C layout, and A operands come from registers in the
// m16n8k16 A layout (ldmatrix of the block's [128][LD] tiles).
//
// Measured (H100, 64K, session 15): dq 1.35 -> 1.29 ms, dkv 2.08 -> 1.90 ms; dq's instructions
// 692 M -> 507 M, but the kernels now wait (IPC 1.7 / 1.4; ncu's top stall is long_scoreboard): each
// column's GEMM waits for its gathered tile, and the symmetric gather moves each off-diagonal state
// row through L2 twice. Pairing columns (GEMM c + 1 in flight during c's dot products, 4 slots) was
// slower (dq 1.41 ms): more spills, and the larger ring left less L1 for them.
#pragma once

#include "power_retention_kernels.cuh"
#include "power_retention_wgmma_ops.cuh"

namespace llmtrain {
namespace pr {

// Gathered [64][64] bf16 tiles of one chunk's state S ([D][E] bf16, E = 72) with the 128-byte swizzle
// (16-byte chunk k of row r at k ^ (r & 7)), in 3 slots. Thread tid copies chunk tid % 8 of rows
// tid / 8 and tid / 8 + 32 with cp.async (the caller commits).
struct StateTiles {
  bf16* tiles;
  const bf16* S;
  int row, chunk;
  __device__ StateTiles(unsigned char* mem, const bf16* S_) : S(S_) {
    tiles = reinterpret_cast<bf16*>(mem + ((1024 - (smem_u32(mem) & 1023)) & 1023));
    row = threadIdx.x >> 3;
    chunk = threadIdx.x & 7;
  }
  __device__ bf16* slot(int s) const { return tiles + s * kStateTile; }
  __device__ static int feature(int a, int c) {  // f(min(a, c), max(a, c)) at d = 64
    const int m = min(a, c), M = max(a, c);
    return row_start(m, 64) + M - m;
  }
  __device__ void copy_row(bf16* dst, int r, int f) const {
    cp_async16(dst + r * 64 + ((chunk ^ (r & 7)) << 3), S + (int64_t)f * Cfg<64>::E + chunk * 8);
  }
  // B^(c): row a = S_f(min(a, c), max(a, c))[0:64]
  __device__ void load_column(int c, int s) const {
    copy_row(slot(s), row, feature(row, c));
    copy_row(slot(s), row + 32, feature(row + 32, c));
  }
  // S_diag: row c = S_f(c, c)[0:64]
  __device__ void load_diagonal(int s) const {
    copy_row(slot(s), row, row_start(row, 64));
    copy_row(slot(s), row + 32, row_start(row + 32, 64));
  }
  // Z: [a][c] = z_f(min(a, c), max(a, c)) (column 64 of S; plain loads and stores)
  __device__ void load_normalisers(int s) const {
    bf16* dst = slot(s);
    for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) {
      const int a = i >> 6, c = i & 63;
      dst[a * 64 + ((((c >> 3) ^ (a & 7))) << 3) + (c & 7)] = S[(int64_t)feature(a, c) * Cfg<64>::E + 64];
    }
  }
  // element (r, c) of a tile
  __device__ float at(int s, int r, int c) const {
    return bf2f(slot(s)[r * 64 + ((((c >> 3) ^ (r & 7))) << 3) + (c & 7)]);
  }
};

#if defined(LLMTRAIN_PR_WGMMA)
// acc[64 x 64] = A [64 x 64] (registers, 4 k-steps) times a [64][64] tile: TB = 1, the tile is B
// itself ([k][n], MN-major); TB = 0, the tile is B^T ([n][k], K-major).
template <int TB>
__device__ __forceinline__ void tile_gemm(float (&acc)[8][4], const uint32_t (&A)[4][4], const bf16* tile) {
  const uint64_t db = sw128_desc(tile);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_rs<64, TB>(acc, A[ks], db + (TB ? ks * (2048 >> 4) : 2 * ks), ks);
  wg_commit();
  wg_wait<0>();
  fence_regs(acc);
}

// A fragments (m16n8k16 layout, 4 k-steps) of the warp's 16 rows of a [128][LD] bf16 tile.
__device__ __forceinline__ void row_frags(uint32_t (&A)[4][4], const bf16* tile, int warp, int lane) {
  constexpr int LD = Cfg<64>::LD;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
    ldsm4(A[ks], tile + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
}

// The ring of the two state parts. stage_diagonal_tiles: Z into slot 0 and S_diag into slot 1, landed
// and published (with the caller's row tiles). start_columns (once the pre-pass GEMMs are done):
// columns 0 and 1 into slots 0 and 1. next_column(c): column c landed everywhere, column c + 2 on
// its way into the slot column c - 1 used (column c is in slot c % 3).
__device__ __forceinline__ void stage_diagonal_tiles(const StateTiles& st) {
  st.load_normalisers(0);
  st.load_diagonal(1);
  cp_commit();
  cp_wait<0>();
  fence_async_smem();
  __syncthreads();
}
__device__ __forceinline__ void start_columns(const StateTiles& st) {
  __syncthreads();  // (slots 0 and 1 are free again)
  st.load_column(0, 0);
  cp_commit();
  st.load_column(1, 1);
  cp_commit();
}
template <int d>
__device__ __forceinline__ void next_column(const StateTiles& st, int c) {
  cp_wait<1>();  // (this thread's copies of column c)
  fence_async_smem();
  __syncthreads();
  if (c + 2 < d) st.load_column(c + 2, (c + 2) % 3);
  cp_commit();
}

// This thread's (row, column) pairs of the m16n8 C layout over 64 columns of a [128][LD] tile: (wr0 |
// wr0 + 8, 8 j + 2 tq + 0 | 1), as floats.
__device__ __forceinline__ void c_values(float (&x)[8][4], const bf16* tile, int wr0, int tq) {
  constexpr int LD = Cfg<64>::LD;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float2 a = unpack_bf16(ld32(tile + wr0 * LD + 8 * j + 2 * tq));
    const float2 b = unpack_bf16(ld32(tile + (wr0 + 8) * LD + 8 * j + 2 * tq));
    x[j][0] = a.x;
    x[j][1] = a.y;
    x[j][2] = b.x;
    x[j][3] = b.y;
  }
}

// The terms of dx over all c at once, added to the C-layout accumulator dx (the x rows' gradient):
//   dx_c += us (sqrt2 zc Y^(c)_64 + (2 - sqrt2) x_c (dN . S_f(c,c) + zc z_f(c,c))),
// Y^(c)_64 = X Z (Z in slot zs), dN . S_f(c,c) = N S_diag^T (S_diag in slot ds), N = the rows' dN
// value part as A fragments; zc: the rows' normaliser coefficient, us: their scale.
__device__ __forceinline__ void state_diag_terms(float (&dx)[8][4], const uint32_t (&Ax)[4][4],
                                                 const uint32_t (&An)[4][4], const StateTiles& st, int zs, int ds,
                                                 const bf16* xs, int wr0, int tq, float zc0, float zc1, float us0,
                                                 float us1) {
  constexpr int LD = Cfg<64>::LD;
  float acc[8][4];
  tile_gemm<1>(acc, Ax, st.slot(zs));
  const float k0 = kSqrt2 * zc0 * us0, k1 = kSqrt2 * zc1 * us1;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    dx[j][0] = fmaf(k0, acc[j][0], dx[j][0]);
    dx[j][1] = fmaf(k0, acc[j][1], dx[j][1]);
    dx[j][2] = fmaf(k1, acc[j][2], dx[j][2]);
    dx[j][3] = fmaf(k1, acc[j][3], dx[j][3]);
  }
  tile_gemm<0>(acc, An, st.slot(ds));
  const float e0 = (2.f - kSqrt2) * us0, e1 = (2.f - kSqrt2) * us1;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = 8 * j + 2 * tq + (e & 1), r = wr0 + (e >> 1) * 8;
      const float zcc = st.at(zs, c, c);
      const float xc = bf2f(xs[r * LD + c]);
      dx[j][e] = fmaf((e < 2 ? e0 : e1) * xc, fmaf(e < 2 ? zc0 : zc1, zcc, acc[j][e]), dx[j][e]);
    }
}

// Quad sums of a row pair's partial dot products, added (times k0 / k1) to out[row][c] by lane tq = 0.
__device__ __forceinline__ void add_row_dots(float r0, float r1, float k0, float k1, float* out, int ld, int wr0,
                                             int c, int tq) {
  r0 += __shfl_xor_sync(0xffffffffu, r0, 1);
  r0 += __shfl_xor_sync(0xffffffffu, r0, 2);
  r1 += __shfl_xor_sync(0xffffffffu, r1, 1);
  r1 += __shfl_xor_sync(0xffffffffu, r1, 2);
  if (tq == 0) {
    out[wr0 * ld + c] += k0 * r0;
    out[(wr0 + 8) * ld + c] += k1 * r1;
  }
}

// Moves the C-layout accumulator into out[row][col] (which the epilogue adds) and zeroes it.
__device__ __forceinline__ void spill_rows(float (&acc)[8][4], float* out, int ld, int wr0, int tq) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      out[(wr0 + (e >> 1) * 8) * ld + 8 * j + 2 * tq + (e & 1)] = acc[j][e];
      acc[j][e] = 0.f;
    }
}
#endif  // LLMTRAIN_PR_WGMMA

// dq_kernel's state part (UCV = 3; declared in power_retention_kernels.cuh) from the chunk's incoming
// state S. dacc (the intra part) moves to dqa, which collects every state term; dacc leaves zero.
// Ag: the rows' dy fragments; gh: the dy tile; xs: q scaled by scale^2 e^g; zc, us: -dy.y, 1 / den.
// live: the warpgroup has rows in the chunk (uniform; every thread takes part in the staging).
template <int d>
__device__ __forceinline__ void dq_state_wgmma(float (&dacc)[d / 8][4], const uint32_t (&Ag)[d / 16][4],
                                               const bf16* gh, const bf16* xs, float* dqa, unsigned char* ring_mem,
                                               const bf16* S, bool live, int warp, int lane, float zc0, float zc1,
                                               float us0, float us1) {
#if defined(LLMTRAIN_PR_WGMMA)
  static_assert(d == 64, "the wgmma state parts are written for d = 64");
  constexpr int LDO = d + 4;
  const StateTiles st(ring_mem, S);
  const int tq = lane & 3, wr0 = warp * 16 + (lane >> 2);
  stage_diagonal_tiles(st);  // (the barrier also publishes the caller's xs)
  uint32_t Ax[4][4];
  row_frags(Ax, xs, warp, lane);
  if (live) state_diag_terms(dacc, Ax, Ag, st, 0, 1, xs, wr0, tq, zc0, zc1, us0, us1);
  spill_rows(dacc, dqa, LDO, wr0, tq);
  float dyc[8][4];
  c_values(dyc, gh, wr0, tq);
  const float k0 = kSqrt2 * us0, k1 = kSqrt2 * us1;
  start_columns(st);
  for (int c = 0; c < d; ++c) {
    next_column<d>(st, c);
    if (!live) continue;
    float y[8][4];
    tile_gemm<1>(y, Ax, st.slot(c % 3));
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      r0 = fmaf(y[j][0], dyc[j][0], fmaf(y[j][1], dyc[j][1], r0));
      r1 = fmaf(y[j][2], dyc[j][2], fmaf(y[j][3], dyc[j][3], r1));
    }
    add_row_dots(r0, r1, k0, k1, dqa, LDO, wr0, c, tq);
  }
  cp_wait<0>();
  __syncthreads();  // dqa complete before the epilogue reads it
#else
  __trap();  // launched only on sm_90 devices of an sm_90a build (power_retention.cu: state_wgmma_usable)
#endif
}

// dkv_kernel's state part (UCV = 3; declared in power_retention_kernels.cuh) from the gradient dS of
// the state leaving the chunk, dN = [v, 1]. dk (the intra part) moves to dka, which collects every
// dk term; dk leaves zero; dv accumulates in registers. Av: the rows' v fragments; vs: the raw v
// tile; xs: k scaled by e^{(G_t - g) / 2}; us: that factor per row.
template <int d>
__device__ __forceinline__ void dkv_state_wgmma(float (&dk)[d / 8][4], float (&dv)[d / 8][4],
                                                const uint32_t (&Av)[d / 16][4], const bf16* vs, const bf16* xs,
                                                float* dka, unsigned char* ring_mem, const bf16* S, bool live,
                                                int warp, int lane, float us0, float us1) {
#if defined(LLMTRAIN_PR_WGMMA)
  static_assert(d == 64, "the wgmma state parts are written for d = 64");
  constexpr int LD = Cfg<d>::LD, LDO = d + 4;
  const StateTiles st(ring_mem, S);
  const int tq = lane & 3, wr0 = warp * 16 + (lane >> 2), wr1 = wr0 + 8;
  stage_diagonal_tiles(st);  // (the barrier also publishes the caller's xs)
  uint32_t Ax[4][4];
  row_frags(Ax, xs, warp, lane);
  if (live) {
    state_diag_terms(dk, Ax, Av, st, 0, 1, xs, wr0, tq, 1.f, 1.f, us0, us1);
    // dv += (1 - 1 / sqrt2) (x^2) S_diag: A = the squared rows (scaled), B = S_diag ([c][e]: MN-major)
    uint32_t Aq[4][4];
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 x = unpack_bf16(Ax[ks][i]);
        Aq[ks][i] = pack_bf16((1.f - kInvSqrt2) * x.x * x.x, (1.f - kInvSqrt2) * x.y * x.y);
      }
    const uint64_t db = sw128_desc(st.slot(1));
    fence_regs(dv);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_rs<64, 1>(dv, Aq[ks], db + ks * (2048 >> 4), 1);
    wg_commit();
    wg_wait<0>();
    fence_regs(dv);
  }
  spill_rows(dk, dka, LDO, wr0, tq);
  uint32_t vc[8][2];  // v in the C layout, bf16 pairs (rows wr0, wr1)
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    vc[j][0] = ld32(vs + wr0 * LD + 8 * j + 2 * tq);
    vc[j][1] = ld32(vs + wr1 * LD + 8 * j + 2 * tq);
  }
  const float k0 = kSqrt2 * us0, k1 = kSqrt2 * us1;
  start_columns(st);
  for (int c = 0; c < d; ++c) {
    next_column<d>(st, c);
    if (!live) continue;
    float y[8][4];
    tile_gemm<1>(y, Ax, st.slot(c % 3));
    const float xc0 = kInvSqrt2 * bf2f(xs[wr0 * LD + c]), xc1 = kInvSqrt2 * bf2f(xs[wr1 * LD + c]);
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 v0 = unpack_bf16(vc[j][0]), v1 = unpack_bf16(vc[j][1]);
      r0 = fmaf(y[j][0], v0.x, fmaf(y[j][1], v0.y, r0));
      r1 = fmaf(y[j][2], v1.x, fmaf(y[j][3], v1.y, r1));
      dv[j][0] = fmaf(xc0, y[j][0], dv[j][0]);
      dv[j][1] = fmaf(xc0, y[j][1], dv[j][1]);
      dv[j][2] = fmaf(xc1, y[j][2], dv[j][2]);
      dv[j][3] = fmaf(xc1, y[j][3], dv[j][3]);
    }
    add_row_dots(r0, r1, k0, k1, dka, LDO, wr0, c, tq);
  }
  cp_wait<0>();
  __syncthreads();  // dka complete before the epilogue reads it
#else
  __trap();  // launched only on sm_90 devices of an sm_90a build (power_retention.cu: state_wgmma_usable)
#endif
}

}  // namespace pr
}  // namespace llmtrain
