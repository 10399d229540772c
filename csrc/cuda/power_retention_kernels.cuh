// Kernels of the chunked power retention (deg 2) on CUDA. See power_retention.cu for the plan.
//
// Notation (per KV head h, chunk n of C tokens, local row j, q pre-scaled by `scale`):
//   g_j   inclusive cumsum of log_g inside the chunk, Gt = g at the chunk's last token
//   S_n   fused state [D, d+1] entering chunk n (last column: sum of keys), canonical layout
//   o_i   = sum_{j<=i} (q_i.k_j)^2 e^{g_i-g_j} [v_j, 1] + e^{g_i} phi(q_i)^T S_n ;  y_i = o_i[:d] / o_i[d]
//   S_n+1 = e^{Gt} S_n + sum_j e^{Gt-g_j} phi(k_j) [v_j, 1]^T
// Workspace states are bf16 [D][E] (E = d + 8; columns d+1.. are zero). phi is never stored: the
// GEMM operands are expanded from q / k in registers (state query, dv) or from a transposed
// bf16 tile (state update). The u-GEMMs of the backward (u = S ghat) use feature n-tiles of
// 8 consecutive b for a fixed a so that J_phi^T u contracts in registers without atomics.
#pragma once

#include <type_traits>

#include "power_retention_common.cuh"

namespace llmtrain {
namespace pr {

// ------------------------------------------------------------------------------------------------
// State scan: one block per (128 features, b * hk); walks the chunks in order (forward: states
// entering each chunk) or in reverse (backward: gradients of the state leaving each chunk),
// keeping its rows of the state in registers (fp32) and storing each chunk's value in bf16.
// ------------------------------------------------------------------------------------------------
struct ScanArgs {
  const void* x;        // forward: k; reverse: q
  const void* yv;       // forward: v
  const bf16* ghat;     // reverse: [b, hq, tpad, E]
  const float* log_g;   // [b, t, hk] or null
  const float* s_init;  // [b, hk, D, d] or null (forward: s0; reverse: grad of the final state)
  const float* z_init;  // [b, hk, D] or null
  float* s_fin;         // final value (forward: state out; reverse: grad of the initial state) or null
  float* z_fin;
  const float* dot_s;   // forward in the backward: <dS_T, S_T> partials against these
  const float* dot_z;
  float* dot_out;       // [b * hk, gridDim.x] or null
  bf16* ws;             // [b * hk, N, D, E]
  float* fbuf;          // LOCAL: fp32 [b * hk, D, E] delta of the chunk that ends the walk, or null
  float* gtot;          // LOCAL: [b * hk, N] sum of log_g over each chunk
  int64_t nwork;        // LOCAL: b * hk * N
  int64_t b, t, hq, hk;
  int C, N, tpad;
  float scale;
  int need_final;
};

constexpr int kSB = 128;  // rows of one scan sub-block

// Columns [c8, c8 + 8) of the weighted yhat row of chunk-local token j (zeros from cnt on): forward
// e^{Gt - g_j} [v_j, 1, 0...]; reverse s^2 e^{g_j} ghat_j of GQA source head src. gs: the chunk's
// inclusive gate cumsum. Shared by the scan kernels (v1-v3) and state_local_kernel (v4).
template <int d, typename T, bool REV>
__device__ __forceinline__ void yhat8(const ScanArgs& p, const float* gs, float Gt, int64_t bi, int64_t h, int r,
                                      int src, int64_t cs, int j, int cnt, int c8, float (&yv)[8]) {
  constexpr int E = Cfg<d>::E;
#pragma unroll
  for (int u = 0; u < 8; ++u) yv[u] = 0.f;
  if (j >= cnt) return;
  if (REV) {
    const float w = p.scale * p.scale * expf(gs[j]);
    IO<bf16>::load8(p.ghat + ((bi * p.hq + h * r + src) * p.tpad + cs + j) * (int64_t)E + c8, yv);
#pragma unroll
    for (int u = 0; u < 8; ++u) yv[u] *= w;
  } else {
    const float w = expf(Gt - gs[j]);
    if (c8 < d) {
      IO<T>::load8(static_cast<const T*>(p.yv) + ((bi * p.t + cs + j) * p.hk + h) * d + c8, yv);
#pragma unroll
      for (int u = 0; u < 8; ++u) yv[u] *= w;
    } else {
      yv[0] = w;
    }
  }
}

template <int d> constexpr size_t scan_smem(int C) {
  return (size_t)(d + 1) * (kSB + 8) * 2 + (size_t)kSB * Cfg<d>::E * 2 + (size_t)C * 4;
}

// LOCAL (v2): one block per (128 features, chunk, b * hk) computes only its chunk's contribution
// from a zero state (forward: sum_j e^{Gt-g_j} phi(k_j) vhat_j^T; reverse: the ghat term), written
// where state_prefix_kernel expects it: forward chunk n -> slot n + 1, reverse chunk n -> slot
// n - 1, the chunk that ends the walk (forward N - 1, reverse 0) -> fbuf in fp32; plus gtot.
template <int d, typename T, bool REV, bool LOCAL>
__global__ void __launch_bounds__(kThreads) state_scan_kernel(const ScanArgs p) {
  constexpr int D = Cfg<d>::D, E = Cfg<d>::E, NT = Cfg<d>::NT, XL = kSB + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* XT = reinterpret_cast<bf16*>(smem_raw);  // [d + 1][XL], row d zero
  bf16* Ys = XT + (d + 1) * XL;                  // [kSB][E]
  float* gs = reinterpret_cast<float*>(Ys + kSB * E);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  int64_t bh = blockIdx.y;
  int nloc = 0;
  if constexpr (LOCAL) {
    const int64_t wi = (int64_t)blockIdx.z * gridDim.y + blockIdx.y;
    if (wi >= p.nwork) return;
    bh = wi / p.N;
    nloc = (int)(wi % p.N);
  }
  const int64_t bi = bh / p.hk, h = bh % p.hk;
  const int r = (int)(p.hq / p.hk);
  const int fw = blockIdx.x * 128 + warp * 16;

  int fa[2], fb[2];
  float fwt[2];
  bool fv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int f = fw + g + 8 * i;
    fv[i] = f < D;
    fa[i] = d;
    fb[i] = d;
    fwt[i] = 0.f;
    if (fv[i]) {
      int a = 0;
      while (row_start(a + 1, d) <= f) ++a;
      fa[i] = a;
      fb[i] = a + f - row_start(a, d);
      fwt[i] = fa[i] == fb[i] ? 1.f : kSqrt2;
    }
  }
  // acc holds S / w (w = sqrt 2 off the diagonal), so the expanded operand needs no weight.
  float acc[NT][4];
  const int64_t sbase = bh * D;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e >> 1, col = nt * 8 + 2 * tq + (e & 1);
      float v = 0.f;
      if (!LOCAL && fv[i]) {
        const int64_t f = fw + g + 8 * i;
        if (col < d) {
          if (p.s_init) v = p.s_init[(sbase + f) * d + col];
        } else if (col == d) {
          if (p.z_init) v = p.z_init[sbase + f];
        }
        v /= fwt[i];
      }
      acc[nt][e] = v;
    }
  for (int j = tid; j < XL; j += blockDim.x) XT[d * XL + j] = __float2bfloat16(0.f);

  const T* X = static_cast<const T*>(p.x);
  for (int step = 0; step < (LOCAL ? 1 : p.N); ++step) {
    const int n = LOCAL ? nloc : (REV ? p.N - 1 - step : step);
    if constexpr (!LOCAL) {
      bf16* slot = p.ws + (bh * p.N + n) * (int64_t)D * E;
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (fv[i]) {
          bf16* row = slot + (int64_t)(fw + g + 8 * i) * E + 2 * tq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            *reinterpret_cast<uint32_t*>(row + nt * 8) =
                pack_bf16(acc[nt][2 * i] * fwt[i], acc[nt][2 * i + 1] * fwt[i]);
        }
      if (!p.need_final && (REV ? n == 0 : n == p.N - 1)) return;
    }
    const int64_t cs = (int64_t)n * p.C;
    const int cnt = (int)min((int64_t)p.C, p.t - cs);
    __syncthreads();
    chunk_cumsum(gs, p.log_g ? p.log_g + (bi * p.t + cs) * p.hk + h : nullptr, p.hk, cnt);
    const float Gt = gs[cnt - 1];
    if constexpr (LOCAL) {
      if (blockIdx.x == 0 && tid == 0) p.gtot[bh * p.N + n] = Gt;
    } else {
      const float dec = expf(Gt);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= dec;
    }
    const int nsub = (cnt + kSB - 1) / kSB;
    const int nsrc = REV ? r : 1;
    for (int src = 0; src < nsrc; ++src)
      for (int sb = 0; sb < nsub; ++sb) {
        const int j0 = sb * kSB, jc = min(kSB, cnt - j0);
        __syncthreads();
        for (int idx = tid; idx < kSB * (d / 8); idx += blockDim.x) {
          const int j = idx / (d / 8), c8 = (idx % (d / 8)) * 8;
          float xv[8];
          if (j < jc) {
            const int64_t tok = bi * p.t + cs + j0 + j;
            const T* sp = REV ? X + (tok * p.hq + h * r + src) * d + c8 : X + (tok * p.hk + h) * d + c8;
            IO<T>::load8(sp, xv);
          } else {
#pragma unroll
            for (int u = 0; u < 8; ++u) xv[u] = 0.f;
          }
#pragma unroll
          for (int u = 0; u < 8; ++u) XT[(c8 + u) * XL + j] = __float2bfloat16(xv[u]);
        }
        for (int idx = tid; idx < kSB * (E / 8); idx += blockDim.x) {
          const int j = idx / (E / 8), c8 = (idx % (E / 8)) * 8;
          float yv[8];
          yhat8<d, T, REV>(p, gs, Gt, bi, h, r, src, cs, j0 + j, cnt, c8, yv);
          st8_bf16(Ys + j * E + c8, yv);
        }
        __syncthreads();
        const int ksteps = (jc + 15) >> 4;
        for (int ks = 0; ks < ksteps; ++ks) {
          const int jj = ks * 16 + 2 * tq;
          uint32_t A[4];
          A[0] = hmul2_bf16(ld32(XT + fa[0] * XL + jj), ld32(XT + fb[0] * XL + jj));
          A[1] = hmul2_bf16(ld32(XT + fa[1] * XL + jj), ld32(XT + fb[1] * XL + jj));
          A[2] = hmul2_bf16(ld32(XT + fa[0] * XL + jj + 8), ld32(XT + fb[0] * XL + jj + 8));
          A[3] = hmul2_bf16(ld32(XT + fa[1] * XL + jj + 8), ld32(XT + fb[1] * XL + jj + 8));
          const bf16* bp = Ys + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * E + (lane >> 4) * 8;
#pragma unroll
          for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldsm4t(b, bp + np * 16);
            mma(acc[2 * np], A, b[0], b[1]);
            mma(acc[2 * np + 1], A, b[2], b[3]);
          }
          uint32_t b2[2];
          ldsm2t(b2, bp + (NT - 1) * 8);
          mma(acc[NT - 1], A, b2[0], b2[1]);
        }
      }
  }
  if constexpr (LOCAL) {
    const bool ends = REV ? nloc == 0 : nloc == p.N - 1;
    if (ends) {
      if (!p.fbuf) return;
      float* dst = p.fbuf + bh * (int64_t)D * E;
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (fv[i]) {
          float* row = dst + (int64_t)(fw + g + 8 * i) * E + 2 * tq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            *reinterpret_cast<float2*>(row + nt * 8) = make_float2(acc[nt][2 * i] * fwt[i], acc[nt][2 * i + 1] * fwt[i]);
        }
    } else {
      bf16* slot = p.ws + (bh * p.N + (REV ? nloc - 1 : nloc + 1)) * (int64_t)D * E;
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (fv[i]) {
          bf16* row = slot + (int64_t)(fw + g + 8 * i) * E + 2 * tq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            *reinterpret_cast<uint32_t*>(row + nt * 8) =
                pack_bf16(acc[nt][2 * i] * fwt[i], acc[nt][2 * i + 1] * fwt[i]);
        }
    }
    return;
  }
  // final value
  float dot = 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e >> 1, col = nt * 8 + 2 * tq + (e & 1);
      if (!fv[i] || col > d) continue;
      const int64_t f = fw + g + 8 * i;
      const float v = acc[nt][e] * fwt[i];
      if (col < d) {
        if (p.s_fin) p.s_fin[(sbase + f) * d + col] = v;
        if (p.dot_s) dot += v * p.dot_s[(sbase + f) * d + col];
      } else {
        if (p.z_fin) p.z_fin[sbase + f] = v;
        if (p.dot_z) dot += v * p.dot_z[sbase + f];
      }
    }
  if (p.dot_out) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    __syncthreads();
    if (lane == 0) gs[warp] = dot;
    __syncthreads();
    if (tid == 0) {
      float s = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) s += gs[w];
      p.dot_out[bh * gridDim.x + blockIdx.x] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Shared pieces of the chunk kernels (blocks of 128 rows inside one chunk).
// ------------------------------------------------------------------------------------------------

// The A fragment of phi(x_rows) over tile B: features (a, 8B + k) in k 0-7 and (a + 1, 8B + k - 8) in
// k 8-15 (a even); xa, xn: x_a sqrt2, x_{a+1} sqrt2 of the thread's two rows. DIAG (B = a / 8): the
// features left of the diagonal are zero and x_a^2 carries 1 / sqrt2; right of it every weight is 1
// ((x_a sqrt2 * 1) * x_b is x_a sqrt2 * x_b exactly, so both forms give the same bits there).
template <int d, bool DIAG>
__device__ __forceinline__ void phi_a_frag(uint32_t (&A)[4], const bf16* xs, int B, int a, int wr0, int tq, float xa0,
                                           float xa1, float xn0, float xn1) {
  constexpr int LD = Cfg<d>::LD;
  const int bc = 8 * B + 2 * tq;
  const float2 xb0 = unpack_bf16(ld32(xs + wr0 * LD + bc)), xb1 = unpack_bf16(ld32(xs + (wr0 + 8) * LD + bc));
  if constexpr (DIAG) {
    const float w00 = bc > a ? 1.f : (bc == a ? kInvSqrt2 : 0.f);
    const float w01 = bc + 1 > a ? 1.f : (bc + 1 == a ? kInvSqrt2 : 0.f);
    const float w10 = bc > a + 1 ? 1.f : (bc == a + 1 ? kInvSqrt2 : 0.f);
    const float w11 = bc + 1 > a + 1 ? 1.f : (bc + 1 == a + 1 ? kInvSqrt2 : 0.f);
    A[0] = pack_bf16(xa0 * w00 * xb0.x, xa0 * w01 * xb0.y);
    A[1] = pack_bf16(xa1 * w00 * xb1.x, xa1 * w01 * xb1.y);
    A[2] = pack_bf16(xn0 * w10 * xb0.x, xn0 * w11 * xb0.y);
    A[3] = pack_bf16(xn1 * w10 * xb1.x, xn1 * w11 * xb1.y);
  } else {
    A[0] = pack_bf16(xa0 * xb0.x, xa0 * xb0.y);
    A[1] = pack_bf16(xa1 * xb1.x, xa1 * xb1.y);
    A[2] = pack_bf16(xn0 * xb0.x, xn0 * xb0.y);
    A[3] = pack_bf16(xn1 * xb1.x, xn1 * xb1.y);
  }
}

// acc[:, n-tiles] += A @ the slab rows at bp (transposed 8 x 8 loads; bp: this lane's row).
template <int NTILES>
__device__ __forceinline__ void phi_mma_tile(float (&acc)[NTILES][4], const uint32_t (&A)[4], const bf16* bp) {
#pragma unroll
  for (int np = 0; np < NTILES / 2; ++np) {
    uint32_t b[4];
    ldsm4t(b, bp + np * 16);
    mma(acc[2 * np], A, b[0], b[1]);
    mma(acc[2 * np + 1], A, b[2], b[3]);
  }
  if constexpr (NTILES % 2 == 1) {
    uint32_t b2[2];
    ldsm2t(b2, bp + (NTILES - 1) * 8);
    mma(acc[NTILES - 1], A, b2[0], b2[1]);
  }
}

// acc[16 x N] += phi(x_rows) @ S over the features of triangle rows a, a+1 (a even), for the
// n-tiles [0, NTILES) of the slab rows. xs: [128][LD] bf16 holding x (any per-row scaling
// already applied); sl: slab whose row (f - base) holds feature f; zero row at index zrow.
template <int d, int NTILES, int STRIDE>
__device__ __forceinline__ void phi_pair_gemm(float (&acc)[NTILES][4], const bf16* xs, const bf16* sl, int base,
                                              int zrow, int a, int wr0, int lane) {
  constexpr int LD = Cfg<d>::LD;
  const int tq = lane & 3;
  const int wr1 = wr0 + 8;
  const float xa0 = bf2f(xs[wr0 * LD + a]) * kSqrt2, xa1 = bf2f(xs[wr1 * LD + a]) * kSqrt2;
  const float xn0 = bf2f(xs[wr0 * LD + a + 1]) * kSqrt2, xn1 = bf2f(xs[wr1 * LD + a + 1]) * kSqrt2;
  const int Bd = a >> 3;
  const int arow = ((lane >> 3) & 1) ? a + 1 : a;
  const int rsa = row_start(arow, d) - base;
#pragma unroll
  for (int B = 0; B < d / 8; ++B) {
    if (B < Bd) continue;
    uint32_t A[4];
    if (B == Bd)
      phi_a_frag<d, true>(A, xs, B, a, wr0, tq, xa0, xa1, xn0, xn1);
    else
      phi_a_frag<d, false>(A, xs, B, a, wr0, tq, xa0, xa1, xn0, xn1);
    const int brow = 8 * B + (lane & 7);
    const int srow = brow >= arow ? rsa + brow - arow : zrow;
    phi_mma_tile<NTILES>(acc, A, sl + srow * STRIDE + (lane >> 4) * 8);
  }
}

// v12: phi_pair_gemm with the triangle-row tiles unrolled per BD = a / 8 (a even: a + 1 has the
// same BD): only the diagonal tile is masked, right of it an A element costs one multiply, and the
// loop has no runtime guard per tile (ncu, H100, 64K: ~65 other instructions per 9 HMMA in v11's
// chunk_out tile loop). Same products, same MMA order: bitwise phi_pair_gemm.
template <int d, int NTILES, int STRIDE, int BD>
__device__ __forceinline__ void phi_pair_tiles(float (&acc)[NTILES][4], const bf16* xs, const bf16* sl, int base,
                                               int zrow, int a, int wr0, int lane) {
  constexpr int LD = Cfg<d>::LD;
  const int tq = lane & 3;
  const int wr1 = wr0 + 8;
  const float xa0 = bf2f(xs[wr0 * LD + a]) * kSqrt2, xa1 = bf2f(xs[wr1 * LD + a]) * kSqrt2;
  const float xn0 = bf2f(xs[wr0 * LD + a + 1]) * kSqrt2, xn1 = bf2f(xs[wr1 * LD + a + 1]) * kSqrt2;
  const int arow = ((lane >> 3) & 1) ? a + 1 : a;
  const int rsa = row_start(arow, d) - base;
  {
    uint32_t A[4];
    phi_a_frag<d, true>(A, xs, BD, a, wr0, tq, xa0, xa1, xn0, xn1);
    const int brow = 8 * BD + (lane & 7);
    const int srow = brow >= arow ? rsa + brow - arow : zrow;
    phi_mma_tile<NTILES>(acc, A, sl + srow * STRIDE + (lane >> 4) * 8);
  }
  const bf16* bp0 = sl + (rsa - arow + (lane & 7)) * STRIDE + (lane >> 4) * 8;  // + 8 B rows: tile B
#pragma unroll
  for (int B = BD + 1; B < d / 8; ++B) {
    uint32_t A[4];
    phi_a_frag<d, false>(A, xs, B, a, wr0, tq, xa0, xa1, xn0, xn1);
    phi_mma_tile<NTILES>(acc, A, bp0 + 8 * B * STRIDE);
  }
}

template <int d, int NTILES, int STRIDE, int BD = 0>
__device__ __forceinline__ void phi_pair_bd(float (&acc)[NTILES][4], const bf16* xs, const bf16* sl, int base, int zrow,
                                            int a, int wr0, int lane) {
  if constexpr (BD < d / 8) {
    if ((a >> 3) == BD)
      phi_pair_tiles<d, NTILES, STRIDE, BD>(acc, xs, sl, base, zrow, a, wr0, lane);
    else
      phi_pair_bd<d, NTILES, STRIDE, BD + 1>(acc, xs, sl, base, zrow, a, wr0, lane);
  }
}

// phi_pair_gemm's interface; UCV = 1: phi_pair_gemm (v1 .. v11), 2: the v12 tiles.
template <int d, int NTILES, int STRIDE, int UCV>
__device__ __forceinline__ void phi_pair_v(float (&acc)[NTILES][4], const bf16* xs, const bf16* sl, int base, int zrow,
                                           int a, int wr0, int lane) {
  if constexpr (UCV == 1)
    phi_pair_gemm<d, NTILES, STRIDE>(acc, xs, sl, base, zrow, a, wr0, lane);
  else
    phi_pair_bd<d, NTILES, STRIDE>(acc, xs, sl, base, zrow, a, wr0, lane);
}

// u += Y_rows @ S_rows^T over the d value columns, S_rows the 8 slab rows of one n-tile (bp: this
// lane's row and its 8-column group).
template <int d>
__device__ __forceinline__ void u_mma(float (&u)[4], const uint32_t (&Ay)[d / 16][4], const bf16* bp) {
#pragma unroll
  for (int kp = 0; kp < d / 32; ++kp) {
    uint32_t b[4];
    ldsm4(b, bp + kp * 32);
    mma(u, Ay[2 * kp], b[0], b[1]);
    mma(u, Ay[2 * kp + 1], b[2], b[3]);
  }
}

// One tile B >= a / 8 of u_contract, every feature masked and weighted (bc < a: zero row and zero z;
// b = a: weight 1; b > a: sqrt2): u = Y_rows @ S[f(a, 8B ..), :d]^T (+ zc z), scaled by us, then
// dx[b] += w x_a u into dq4 = dacc[B] and pa += sum_b w x_b u (this lane's two columns).
template <int d>
__device__ __forceinline__ void u_tile_masked(float (&dq4)[4], const uint32_t (&Ay)[d / 16][4], const bf16* xs,
                                              const bf16* sl, int B, int rsa, int zrow, int a, int wr0, int lane,
                                              float zc0, float zc1, float us0, float us1, float xa0, float xa1,
                                              float& pa0, float& pa1) {
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  const int tq = lane & 3;
  float u[4] = {0.f, 0.f, 0.f, 0.f};
  const int bl = 8 * B + (lane & 7);
  const int srow = bl >= a ? rsa + bl - a : zrow;
  u_mma<d>(u, Ay, sl + srow * E + (lane >> 3) * 8);
  const int bc = 8 * B + 2 * tq;
  const float z0 = bc >= a ? bf2f(sl[(rsa + bc - a) * E + d]) : 0.f;
  const float z1 = bc + 1 >= a ? bf2f(sl[(rsa + bc + 1 - a) * E + d]) : 0.f;
  u[0] = (u[0] + z0 * zc0) * us0;
  u[1] = (u[1] + z1 * zc0) * us0;
  u[2] = (u[2] + z0 * zc1) * us1;
  u[3] = (u[3] + z1 * zc1) * us1;
  const float w0 = bc > a ? kSqrt2 : (bc == a ? 1.f : 0.f);
  const float w1 = bc + 1 > a ? kSqrt2 : (bc + 1 == a ? 1.f : 0.f);
  const float2 xb0 = unpack_bf16(ld32(xs + wr0 * LD + bc)), xb1 = unpack_bf16(ld32(xs + (wr0 + 8) * LD + bc));
  dq4[0] += w0 * xa0 * u[0];
  dq4[1] += w1 * xa0 * u[1];
  dq4[2] += w0 * xa1 * u[2];
  dq4[3] += w1 * xa1 * u[3];
  pa0 += w0 * xb0.x * u[0] + w1 * xb0.y * u[1];
  pa1 += w0 * xb1.x * u[2] + w1 * xb1.y * u[3];
}

// dx[a] of the thread's two rows: the quad's column sums, written by its first lane.
__device__ __forceinline__ void u_write_xa(float pa0, float pa1, float* xa_out, int xa_ld, int wr0, int a, int lane) {
  pa0 += __shfl_xor_sync(0xffffffffu, pa0, 1);
  pa0 += __shfl_xor_sync(0xffffffffu, pa0, 2);
  pa1 += __shfl_xor_sync(0xffffffffu, pa1, 1);
  pa1 += __shfl_xor_sync(0xffffffffu, pa1, 2);
  if ((lane & 3) == 0) {
    xa_out[wr0 * xa_ld + a] = pa0;
    xa_out[(wr0 + 8) * xa_ld + a] = pa1;
  }
}

// u = Y_rows @ S[f(a, .), :d]^T (+ rank-1 zc * z_f) for the n-tiles B >= a/8, contracted at once
// through J_phi(x)^T: dx[b] += w x_a u_ab (registers, C-fragment layout) and
// dx[a] += sum_b w x_b u_ab (quad-reduced, written to xa_out[row][a]).
// Ay: A fragments of Y (d/16 k-steps); us: per-row scale of u; zc: per-row coefficient of z.
template <int d>
__device__ __forceinline__ void u_contract(float (&dacc)[d / 8][4], const uint32_t (&Ay)[d / 16][4],
                                           const bf16* xs, const bf16* sl, int base, int zrow, int a, int wr0,
                                           int lane, float zc0, float zc1, float us0, float us1, float* xa_out,
                                           int xa_ld) {
  constexpr int LD = Cfg<d>::LD;
  const float xa0 = bf2f(xs[wr0 * LD + a]), xa1 = bf2f(xs[(wr0 + 8) * LD + a]);
  const int rsa = row_start(a, d) - base;
  float pa0 = 0.f, pa1 = 0.f;
#pragma unroll
  for (int B = 0; B < d / 8; ++B) {
    if (B < (a >> 3)) continue;
    u_tile_masked<d>(dacc[B], Ay, xs, sl, B, rsa, zrow, a, wr0, lane, zc0, zc1, us0, us1, xa0, xa1, pa0, pa1);
  }
  u_write_xa(pa0, pa1, xa_out, xa_ld, wr0, a, lane);
}

// v12: u_contract's arithmetic with the triangle-row tiles unrolled at compile time. ncu (H100,
// 64K): in v11's dq_kernel, HMMA was 4.7% of the issued instructions and u_contract ~75% of them,
// each tile a 4-deep HMMA chain (NOPs between) followed by ~55 masking / scaling instructions, one
// runtime-guarded tile at a time. Here the diagonal tile (B = a / 8, masked as before) and the
// tiles right of it (B > a / 8: weight sqrt2, no masks, no zero row) are instantiated per BD = a / 8,
// so the compiler interleaves the independent tiles' MMA chains; the row scale us and sqrt2 are
// applied once per a (folded into x_a for dx[b], and into the finished sum for dx[a]) instead of
// per element. Same terms as u_contract, summed in another order (fp32).
template <int d, int BD>
__device__ __forceinline__ void u_contract_tiles(float (&dacc)[d / 8][4], const uint32_t (&Ay)[d / 16][4],
                                                 const bf16* xs, const bf16* sl, int rsa, int zrow, int a, int wr0,
                                                 int lane, float zc0, float zc1, float us0, float us1, float xa0,
                                                 float xa1, float& pa0, float& pa1) {
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  const int tq = lane & 3;
  const int wr1 = wr0 + 8;
  float pd0 = 0.f, pd1 = 0.f;  // the diagonal tile, weighted and scaled
  u_tile_masked<d>(dacc[BD], Ay, xs, sl, BD, rsa, zrow, a, wr0, lane, zc0, zc1, us0, us1, xa0, xa1, pd0, pd1);
  const float ca0 = kSqrt2 * us0 * xa0, ca1 = kSqrt2 * us1 * xa1;
  float po0 = 0.f, po1 = 0.f;  // tiles right of the diagonal, unweighted and unscaled
  const int r0 = rsa - a;      // slab row of feature (a, b) is r0 + b for b >= a
#pragma unroll
  for (int B = BD + 1; B < d / 8; ++B) {
    float u[4] = {0.f, 0.f, 0.f, 0.f};
    u_mma<d>(u, Ay, sl + (r0 + 8 * B + (lane & 7)) * E + (lane >> 3) * 8);
    const int bc = 8 * B + 2 * tq;
    const float z0 = bf2f(sl[(r0 + bc) * E + d]), z1 = bf2f(sl[(r0 + bc + 1) * E + d]);
    const float u0 = fmaf(z0, zc0, u[0]), u1 = fmaf(z1, zc0, u[1]);
    const float u2 = fmaf(z0, zc1, u[2]), u3 = fmaf(z1, zc1, u[3]);
    dacc[B][0] = fmaf(ca0, u0, dacc[B][0]);
    dacc[B][1] = fmaf(ca0, u1, dacc[B][1]);
    dacc[B][2] = fmaf(ca1, u2, dacc[B][2]);
    dacc[B][3] = fmaf(ca1, u3, dacc[B][3]);
    const float2 xb0 = unpack_bf16(ld32(xs + wr0 * LD + bc)), xb1 = unpack_bf16(ld32(xs + wr1 * LD + bc));
    po0 = fmaf(xb0.x, u0, fmaf(xb0.y, u1, po0));
    po1 = fmaf(xb1.x, u2, fmaf(xb1.y, u3, po1));
  }
  pa0 = fmaf(kSqrt2 * us0, po0, pd0);
  pa1 = fmaf(kSqrt2 * us1, po1, pd1);
}

// Compile-time BD = a / 8 for u_contract_tiles (an if-chain per triangle row a, not per tile).
template <int d, int BD = 0>
__device__ __forceinline__ void u_contract_bd(float (&dacc)[d / 8][4], const uint32_t (&Ay)[d / 16][4],
                                              const bf16* xs, const bf16* sl, int rsa, int zrow, int a, int wr0,
                                              int lane, float zc0, float zc1, float us0, float us1, float xa0,
                                              float xa1, float& pa0, float& pa1) {
  if constexpr (BD < d / 8) {
    if ((a >> 3) == BD)
      u_contract_tiles<d, BD>(dacc, Ay, xs, sl, rsa, zrow, a, wr0, lane, zc0, zc1, us0, us1, xa0, xa1, pa0, pa1);
    else
      u_contract_bd<d, BD + 1>(dacc, Ay, xs, sl, rsa, zrow, a, wr0, lane, zc0, zc1, us0, us1, xa0, xa1, pa0, pa1);
  }
}

// u_contract's interface; UCV = 1: u_contract (v1 .. v11), 2: the v12 tiles above.
template <int d, int UCV>
__device__ __forceinline__ void u_contract_v(float (&dacc)[d / 8][4], const uint32_t (&Ay)[d / 16][4], const bf16* xs,
                                             const bf16* sl, int base, int zrow, int a, int wr0, int lane, float zc0,
                                             float zc1, float us0, float us1, float* xa_out, int xa_ld) {
  if constexpr (UCV == 1) {
    u_contract<d>(dacc, Ay, xs, sl, base, zrow, a, wr0, lane, zc0, zc1, us0, us1, xa_out, xa_ld);
  } else {
    constexpr int LD = Cfg<d>::LD;
    const float xa0 = bf2f(xs[wr0 * LD + a]), xa1 = bf2f(xs[(wr0 + 8) * LD + a]);
    float pa0 = 0.f, pa1 = 0.f;
    u_contract_bd<d>(dacc, Ay, xs, sl, row_start(a, d) - base, zrow, a, wr0, lane, zc0, zc1, us0, us1, xa0, xa1, pa0,
                     pa1);
    u_write_xa(pa0, pa1, xa_out, xa_ld, wr0, a, lane);
  }
}

// Load rows [lr0, lr0 + nrows) (chunk-local, valid below cnt) of a [b, t, heads, d] tensor into a
// bf16 [nrows][LD] tile, scaled per row by rs(local row) (zeros past cnt).
template <int d, typename T, typename RS>
__device__ __forceinline__ void load_tile(bf16* dst, const T* src, int64_t tok0, int64_t heads, int64_t head,
                                          int lr0, int nrows, int cnt, RS rs) {
  constexpr int LD = Cfg<d>::LD;
  for (int idx = threadIdx.x; idx < nrows * (d / 8); idx += blockDim.x) {
    const int i = idx / (d / 8), c8 = (idx % (d / 8)) * 8;
    const int li = lr0 + i;
    float x[8];
    if (li < cnt) {
      IO<T>::load8(src + ((tok0 + li) * heads + head) * d + c8, x);
      const float s = rs(li);
#pragma unroll
      for (int u = 0; u < 8; ++u) x[u] *= s;
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u) x[u] = 0.f;
    }
    st8_bf16(dst + i * LD + c8, x);
  }
}

// [v, 1, 0...] rows (E columns), zeros past cnt.
template <int d, typename T>
__device__ __forceinline__ void load_vhat(bf16* dst, const T* v, int64_t tok0, int64_t heads, int64_t head, int lr0,
                                          int nrows, int cnt) {
  constexpr int E = Cfg<d>::E;
  for (int idx = threadIdx.x; idx < nrows * (E / 8); idx += blockDim.x) {
    const int i = idx / (E / 8), c8 = (idx % (E / 8)) * 8;
    const int li = lr0 + i;
    float x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) x[u] = 0.f;
    if (li < cnt) {
      if (c8 < d) IO<T>::load8(v + ((tok0 + li) * heads + head) * d + c8, x);
      else x[0] = 1.f;
    }
    st8_bf16(dst + i * E + c8, x);
  }
}

// Copy ghat rows (bf16, E columns) into smem, zeros past cnt.
template <int d>
__device__ __forceinline__ void load_ghat(bf16* dst, const bf16* src_rows, int lr0, int nrows, int cnt) {
  constexpr int E = Cfg<d>::E;
  for (int idx = threadIdx.x; idx < nrows * (E / 8); idx += blockDim.x) {
    const int i = idx / (E / 8), c8 = (idx % (E / 8)) * 8;
    const int li = lr0 + i;
    uint4 u = make_uint4(0, 0, 0, 0);
    if (li < cnt) u = *reinterpret_cast<const uint4*>(src_rows + (int64_t)li * E + c8);
    *reinterpret_cast<uint4*>(dst + i * E + c8) = u;
  }
}

// v8 (bf16 inputs): rows [lr0, lr0 + nrows) (chunk-local) of a [b, t, heads, d] bf16 tensor into a
// [nrows][ld] tile with cp.async: the bits load_tile stores for bf16 (its round trip through float
// is exact), without holding them in registers, so the next tile loads while this one is used.
// Zeros past cnt; VHAT: columns d .. d+7 = [1, 0 x 7] on valid rows (load_vhat's normaliser).
template <int d, bool VHAT>
__device__ __forceinline__ void load_tile_async(bf16* dst, int ld, const bf16* src, int64_t tok0, int64_t heads,
                                                int64_t head, int lr0, int nrows, int cnt) {
  constexpr int V = d / 8 + (VHAT ? 1 : 0);
  for (int idx = threadIdx.x; idx < nrows * V; idx += blockDim.x) {
    const int i = idx / V, c8 = (idx % V) * 8;
    const int li = lr0 + i;
    bf16* dp = dst + i * ld + c8;
    if (li < cnt && c8 < d) {
      cp_async16(dp, src + ((tok0 + li) * heads + head) * d + c8);
    } else {
      uint4 u = make_uint4(0, 0, 0, 0);
      if (VHAT && li < cnt) u.x = 0x3f80u;  // bf16 1.0 in column d
      *reinterpret_cast<uint4*>(dp) = u;
    }
  }
}

// v7: the within-chunk inclusive cumsum of log_g, once per (chunk, b * hk), into gcum [b * hk, t]
// (deterministic: per-thread contiguous segments, then a block scan of their totals). The chunk
// kernels then read their gates from it instead of each scanning the chunk again into shared
// memory (C floats there capped the chunk size; a single-warp scan of an 8K chunk per block).
__global__ void __launch_bounds__(kThreads)
    gate_cumsum_kernel(const float* log_g, float* gcum, int64_t t, int64_t hk, int C) {
  __shared__ float warp_tot[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = blockIdx.y, bi = bh / hk, h = bh % hk;
  const int64_t cs = (int64_t)blockIdx.x * C;
  const int cnt = (int)min((int64_t)C, t - cs);
  const int per = (cnt + kThreads - 1) / kThreads, beg = min(tid * per, cnt), end = min(beg + per, cnt);
  const float* src = log_g + (bi * t + cs) * hk + h;
  float s = 0.f;
  for (int i = beg; i < end; ++i) s += src[i * hk];
  float incl = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  float run = incl - s;
  for (int w = 0; w < warp; ++w) run += warp_tot[w];
  float* dst = gcum + bh * t + cs;
  for (int i = beg; i < end; ++i) {
    run += src[i * hk];
    dst[i] = run;
  }
}

// The chunk's inclusive gate cumsum: v7's precomputed one (global), or scanned here into smem
// (rows [0, cnt)). Contains barriers only in the second case (uniform per launch).
__device__ __forceinline__ const float* chunk_gates(float* smem, const float* gcum, const float* log_g, int64_t bi,
                                                    int64_t h, int64_t t, int64_t hk, int64_t cs, int cnt) {
  if (gcum) return gcum + (bi * hk + h) * t + cs;
  chunk_cumsum(smem, log_g ? log_g + (bi * t + cs) * hk + h : nullptr, hk, cnt);
  return smem;
}
// Bytes of shared memory the chunk kernels reserve for the gates (none with v7's gcum).
__host__ __device__ constexpr int gate_smem_bytes(int C, bool gcum) { return gcum ? 0 : ((C * 4 + 15) / 16) * 16; }

// ------------------------------------------------------------------------------------------------
// Chunk output: y (forward) or ghat = [dy / den, -(dy . y) / den] (backward), one block per
// (128 rows, q head, batch). State query first (phi(e^{g/2} q) @ S_n), then the intra-chunk
// power attention, FlashAttention style with the squared score in place of softmax.
// ------------------------------------------------------------------------------------------------
struct OutArgs {
  const void *q, *k, *v, *dy;
  const float* log_g;
  const bf16* Sws;
  void* y;
  bf16* ghat;
  float2* rowstat;  // ghat mode: [b, hq, tpad] (1 / den, dy . y)
  const float* gcum;  // v7: within-chunk gate cumsums [b * hk, t] (zeros ungated); null: scan here
  int gen;           // kernel generation: 7+ fp32 dlog_g dots (dq/dkv), 8+ cp.async tiles (bf16)
  float* y32;        // v9 forward, one chunk: y in fp32 [b, t, hq, d] and 1 / den [b, hq, t], so the
  float* inv_den;    //   backward gets its row statistics without recomputing the attention (or null)
  int64_t b, t, hq, hk;
  int C, N, tpad;
  float scale;
  int has_s0;
};

// v21, UCV = 3 or 4 (d = 64, sm_90a): the state query on wgmma (power_retention_query_wgmma.cuh), with
// a ring of k-step tiles of the state in place of the slabs: per k-step 16 state rows, their 64 values
// 128-byte swizzled (2 KiB) and their normaliser column (16 B a row); a slot holds one pair of
// triangle rows (at most 8 k-steps); UCV slots and 1 KiB to align them.
constexpr int kQueryValueBytes = 16 * 128, kQueryNormBytes = 16 * 16;
constexpr int kQuerySlotBytes = 8 * (kQueryValueBytes + kQueryNormBytes);
constexpr size_t query_ring_smem(int slots) { return 1024 + (size_t)slots * kQuerySlotBytes; }
template <int d, int SLOTS>
__device__ __forceinline__ void state_query_wgmma(float (&acc)[Cfg<d>::NT][4], const bf16* xs, const bf16* S,
                                                  unsigned char* ring_mem, int warp, int lane);

template <int d, int G, int NBUF> constexpr size_t out_smem(int gate_bytes) {
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  constexpr size_t slab = (size_t)NBUF * (slab_rows(d, G) + 1) * E * 2;
  constexpr size_t intra = 2 * ((size_t)kKB * LD * 2 + (size_t)kKB * E * 2);  // two buffers (v8)
  return (size_t)2 * kBM * LD * 2 + gate_bytes + (slab > intra ? slab : intra);
}
template <int d> constexpr size_t out_smem_wgmma(int gate_bytes, int slots) {  // UCV = slots (v21)
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  constexpr size_t intra = 2 * ((size_t)kKB * LD * 2 + (size_t)kKB * E * 2);
  return (size_t)2 * kBM * LD * 2 + gate_bytes + (query_ring_smem(slots) > intra ? query_ring_smem(slots) : intra);
}

// MINB: blocks per SM that the register allocation must allow (0: no bound; v6: 3 at d <= 64).
// UCV: the state query, 1: phi_pair_gemm (v1 .. v11), 2: the v12 tiles, >= 3: wgmma with a ring of UCV
// slots (v21, d = 64: 3).
template <int d, typename T, bool GHAT, int G, int NBUF, int MINB = 0, int UCV = 1>
__global__ void __launch_bounds__(kThreads, MINB) chunk_out_kernel(const OutArgs p) {
  constexpr int D = Cfg<d>::D, E = Cfg<d>::E, NT = Cfg<d>::NT, ND = Cfg<d>::ND, LD = Cfg<d>::LD;
  constexpr int SL = slab_rows(d, G) + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);  // raw q
  bf16* xs = qs + kBM * LD;                      // e^{g/2} scale q
  float* gsm = reinterpret_cast<float*>(xs + kBM * LD);
  unsigned char* region = reinterpret_cast<unsigned char*>(gsm) + gate_smem_bytes(p.C, p.gcum != nullptr);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t hqi = blockIdx.y, bi = blockIdx.z;
  const int r = (int)(p.hq / p.hk);
  const int64_t h = hqi / r;
  const int row0 = blockIdx.x * kBM;
  const int n = row0 / p.C;
  const int64_t cs = (int64_t)n * p.C;
  const int cnt = (int)min((int64_t)p.C, p.t - cs);
  const int lrow0 = row0 - (int)cs;
  const int nq = min(cnt, lrow0 + kBM);
  const int64_t tok0 = bi * p.t + cs;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);

  const float* gs = chunk_gates(gsm, p.gcum, p.log_g, bi, h, p.t, p.hk, cs, nq);
  load_tile<d>(qs, Q, tok0, p.hq, hqi, lrow0, kBM, cnt, [](int) { return 1.f; });
  const float sc = p.scale;
  load_tile<d>(xs, Q, tok0, p.hq, hqi, lrow0, kBM, cnt, [&](int li) { return sc * expf(0.5f * gs[li]); });
  __syncthreads();

  const int wr0 = warp * 16 + g, wr1 = wr0 + 8;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

  if constexpr (UCV >= 3) {
    if (n > 0 || p.has_s0)
      state_query_wgmma<d, UCV>(acc, xs, p.Sws + ((bi * p.hk + h) * p.N + n) * (int64_t)D * E, region, warp, lane);
  } else if (n > 0 || p.has_s0) {
    const bf16* S = p.Sws + ((bi * p.hk + h) * p.N + n) * (int64_t)D * E;
    bf16* slab = reinterpret_cast<bf16*>(region);
    for (int j = tid; j < NBUF * E; j += blockDim.x) slab[(j / E) * SL * E + (SL - 1) * E + (j % E)] = __float2bfloat16(0.f);
    constexpr int NG = d / G;
    auto issue = [&](int grp) {
      const int a0 = grp * G;
      load_rows_async<E>(slab + (grp % NBUF) * SL * E, S, row_start(a0, d), min(row_start(a0 + G, d), D));
      cp_commit();
    };
    issue(0);
    for (int grp = 0; grp < NG; ++grp) {
      if (NBUF > 1 && grp + 1 < NG) {
        issue(grp + 1);
        cp_wait<1>();
      } else {
        cp_wait<0>();
      }
      __syncthreads();
      const bf16* sl = slab + (grp % NBUF) * SL * E;
      const int a0 = grp * G, base = row_start(a0, d);
#pragma unroll 1
      for (int ap = 0; ap < G; ap += 2) phi_pair_v<d, NT, E, UCV>(acc, xs, sl, base, SL - 1, a0 + ap, warp * 16 + g, lane);
      __syncthreads();
      if (NBUF == 1 && grp + 1 < NG) issue(grp + 1);
    }
  }

  // intra-chunk (v8, bf16: K / vhat tiles double-buffered, the next one loading during this one)
  bf16* const Kbuf = reinterpret_cast<bf16*>(region);
  constexpr int KV = kKB * LD + kKB * E;  // elements of one K + vhat buffer
  const bool async = std::is_same<T, bf16>::value && p.gen >= 8;
  auto issue_kv = [&](int kb, bf16* dst) {
    if constexpr (std::is_same<T, bf16>::value) {
      load_tile_async<d, false>(dst, LD, K, tok0, p.hk, h, kb, kKB, cnt);
      load_tile_async<d, true>(dst + kKB * LD, E, V, tok0, p.hk, h, kb, kKB, cnt);
    }
  };
  if (async) {
    issue_kv(0, Kbuf);
    cp_commit();
  }
  const int qi0 = lrow0 + wr0, qi1 = lrow0 + wr1;
  const float gq0 = gs[min(qi0, nq - 1)], gq1 = gs[min(qi1, nq - 1)];
  for (int kb0 = 0, it = 0; kb0 < nq; kb0 += kKB, ++it) {
    __syncthreads();
    bf16* Ks = Kbuf + (async ? (it & 1) * KV : 0);
    bf16* Vs = Ks + kKB * LD;
    if (async) {
      if (kb0 + kKB < nq) issue_kv(kb0 + kKB, Kbuf + ((it + 1) & 1) * KV);
      cp_commit();
      cp_wait<1>();
    } else {
      load_tile<d>(Ks, K, tok0, p.hk, h, kb0, kKB, cnt, [](int) { return 1.f; });
      load_vhat<d>(Vs, V, tok0, p.hk, h, kb0, kKB, cnt);
    }
    __syncthreads();
    if (lrow0 + warp * 16 + 15 < kb0) continue;
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < d / 16; ++ks) {
      uint32_t Aq[4];
      ldsm4(Aq, qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ldsm4(b, Ks + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
        mma(s[2 * np], Aq, b[0], b[1]);
        mma(s[2 * np + 1], Aq, b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = e < 2 ? qi0 : qi1;
        const int kj = kb0 + nt * 8 + 2 * tq + (e & 1);
        const bool ok = kj <= qi && kj < cnt;
        const float x = s[nt][e] * p.scale;
        s[nt][e] = ok ? x * x * __expf((e < 2 ? gq0 : gq1) - gs[ok ? kj : 0]) : 0.f;
      }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t A[4];
      A[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      A[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      A[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      A[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const bf16* bp = Vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * E + (lane >> 4) * 8;
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldsm4t(b, bp + np * 16);
        mma(acc[2 * np], A, b[0], b[1]);
        mma(acc[2 * np + 1], A, b[2], b[3]);
      }
      uint32_t b2[2];
      ldsm2t(b2, bp + (NT - 1) * 8);
      mma(acc[NT - 1], A, b2[0], b2[1]);
    }
  }
  cp_wait<0>();  // (v8: the last, empty group)

  // epilogue
  const float den0 = __shfl_sync(0xffffffffu, acc[ND][0], lane & ~3);
  const float den1 = __shfl_sync(0xffffffffu, acc[ND][2], lane & ~3);
  const float inv0 = 1.f / den0, inv1 = 1.f / den1;
  const bool v0 = qi0 < cnt, v1 = qi1 < cnt;
  if constexpr (!GHAT) {
    T* Y = static_cast<T*>(p.y);
#pragma unroll
    for (int nt = 0; nt < ND; ++nt) {
      const int col = nt * 8 + 2 * tq;
      if (v0) IO<T>::store2(Y + ((tok0 + qi0) * p.hq + hqi) * d + col, acc[nt][0] * inv0, acc[nt][1] * inv0);
      if (v1) IO<T>::store2(Y + ((tok0 + qi1) * p.hq + hqi) * d + col, acc[nt][2] * inv1, acc[nt][3] * inv1);
    }
    if (p.y32) {
#pragma unroll
      for (int nt = 0; nt < ND; ++nt) {
        const int col = nt * 8 + 2 * tq;
        if (v0)
          *reinterpret_cast<float2*>(p.y32 + ((tok0 + qi0) * p.hq + hqi) * d + col) =
              make_float2(acc[nt][0] * inv0, acc[nt][1] * inv0);
        if (v1)
          *reinterpret_cast<float2*>(p.y32 + ((tok0 + qi1) * p.hq + hqi) * d + col) =
              make_float2(acc[nt][2] * inv1, acc[nt][3] * inv1);
      }
      if (tq == 0) {
        if (v0) p.inv_den[(bi * p.hq + hqi) * p.t + cs + qi0] = inv0;
        if (v1) p.inv_den[(bi * p.hq + hqi) * p.t + cs + qi1] = inv1;
      }
    }
  } else {
    const T* DY = static_cast<const T*>(p.dy);
    bf16* gh0 = p.ghat + ((bi * p.hq + hqi) * p.tpad + cs + qi0) * (int64_t)E;
    bf16* gh1 = p.ghat + ((bi * p.hq + hqi) * p.tpad + cs + qi1) * (int64_t)E;
    float dyy0 = 0.f, dyy1 = 0.f;
    float2 dy0[ND], dy1[ND];
#pragma unroll
    for (int nt = 0; nt < ND; ++nt) {
      const int col = nt * 8 + 2 * tq;
      dy0[nt] = v0 ? IO<T>::load2(DY + ((tok0 + qi0) * p.hq + hqi) * d + col) : make_float2(0.f, 0.f);
      dy1[nt] = v1 ? IO<T>::load2(DY + ((tok0 + qi1) * p.hq + hqi) * d + col) : make_float2(0.f, 0.f);
      // v7: dy . num with the bf16 dy that the dq / dkv kernels multiply v with (fp32 / fp16 dy:
      // the exact one left a rounding-size gap in dy.v - dy.y, amplified in dq / dk)
      const float2 e0 = p.gen >= 7 ? make_float2(bf16_round(dy0[nt].x), bf16_round(dy0[nt].y)) : dy0[nt];
      const float2 e1 = p.gen >= 7 ? make_float2(bf16_round(dy1[nt].x), bf16_round(dy1[nt].y)) : dy1[nt];
      dyy0 += e0.x * acc[nt][0] + e0.y * acc[nt][1];
      dyy1 += e1.x * acc[nt][2] + e1.y * acc[nt][3];
    }
    dyy0 += __shfl_xor_sync(0xffffffffu, dyy0, 1);
    dyy0 += __shfl_xor_sync(0xffffffffu, dyy0, 2);
    dyy1 += __shfl_xor_sync(0xffffffffu, dyy1, 1);
    dyy1 += __shfl_xor_sync(0xffffffffu, dyy1, 2);
    // dyy = dy . num; ghat[d] = -(dy . y) / den = -dyy / den^2
#pragma unroll
    for (int nt = 0; nt < ND; ++nt) {
      const int col = nt * 8 + 2 * tq;
      *reinterpret_cast<uint32_t*>(gh0 + col) = v0 ? pack_bf16(dy0[nt].x * inv0, dy0[nt].y * inv0) : 0u;
      *reinterpret_cast<uint32_t*>(gh1 + col) = v1 ? pack_bf16(dy1[nt].x * inv1, dy1[nt].y * inv1) : 0u;
    }
    const int col = d + 2 * tq;
    *reinterpret_cast<uint32_t*>(gh0 + col) = (v0 && tq == 0) ? pack_bf16(-dyy0 * inv0 * inv0, 0.f) : 0u;
    *reinterpret_cast<uint32_t*>(gh1 + col) = (v1 && tq == 0) ? pack_bf16(-dyy1 * inv1 * inv1, 0.f) : 0u;
    if (tq == 0) {
      float2* rs = p.rowstat + (bi * p.hq + hqi) * p.tpad + cs;
      rs[qi0] = v0 ? make_float2(inv0, dyy0 * inv0) : make_float2(0.f, 0.f);
      rs[qi1] = v1 ? make_float2(inv1, dyy1 * inv1) : make_float2(0.f, 0.f);
    }
  }
}

// This lane's part of x_r . acc_r for the warp's rows r = wr0, wr0 + 8 (m16n8 accumulator layout),
// x_r from a bf16 [rows][LD] tile.
template <int ND, int LD>
__device__ __forceinline__ void tile_row_dots(float (&out)[2], const bf16* tile, const float (&acc)[ND][4], int wr0,
                                              int tq) {
#pragma unroll
  for (int nt = 0; nt < ND; ++nt) {
    const int col = nt * 8 + 2 * tq;
    const float2 x0 = unpack_bf16(ld32(tile + wr0 * LD + col)), x1 = unpack_bf16(ld32(tile + (wr0 + 8) * LD + col));
    out[0] += x0.x * acc[nt][0] + x0.y * acc[nt][1];
    out[1] += x1.x * acc[nt][2] + x1.y * acc[nt][3];
  }
}

// v9, one chunk without states: the backward's row statistics (1 / den, dy . y) from the forward's
// fp32 y and 1 / den, one warp per row (zeros for the padding rows up to tpad), instead of
// chunk_out's ghat pass recomputing the whole attention. dy . y with the bf16 dy, as chunk_out's.
// v11 (ghat != nullptr): also ghat = [dy / den, -(dy . y) / den, 0 ...] (E columns, bf16), what
// chunk_out's ghat pass writes for the state parts, so chunked sequences skip that pass too.
template <int d, typename T>
__global__ void __launch_bounds__(kThreads) rowstat_kernel(const T* dy, const float* y32, const float* inv_den,
                                                          float2* rowstat, bf16* ghat, int64_t b, int64_t t,
                                                          int64_t hq, int tpad) {
  constexpr int E = d + 8;
  const int64_t w = (int64_t)blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= b * hq * tpad) return;
  const int64_t row = w % tpad, bh = w / tpad, bi = bh / hq, h = bh % hq;
  bf16* gh = ghat ? ghat + w * (int64_t)E : nullptr;
  float2 out = make_float2(0.f, 0.f);
  if (row < t) {
    const int64_t o = ((bi * t + row) * hq + h) * d;
    const float inv = inv_den[bh * t + row];
    float s = 0.f;
    for (int c = 2 * lane; c < d; c += 64) {
      const float2 g = IO<T>::load2(dy + o + c);
      const float2 y = *reinterpret_cast<const float2*>(y32 + o + c);
      s += bf16_round(g.x) * y.x + bf16_round(g.y) * y.y;
      if (gh) *reinterpret_cast<uint32_t*>(gh + c) = pack_bf16(g.x * inv, g.y * inv);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    out = make_float2(inv, s);
    if (gh && lane < 4) *reinterpret_cast<uint32_t*>(gh + d + 2 * lane) = pack_bf16(lane == 0 ? -s * inv : 0.f, 0.f);
  } else if (gh) {
    for (int c = 2 * lane; c < E; c += 64) *reinterpret_cast<uint32_t*>(gh + c) = 0u;
  }
  if (lane == 0) rowstat[w] = out;
}

// v16: rowstat_kernel's row statistics without ghat (the one-chunk flash backward), nearer memory
// speed: d / 8 threads per row with 16-byte loads, U rows per thread, every load issued before the
// first sum (rowstat_kernel: a warp per row, 4-8 bytes per lane, one row in flight per warp: 113 us
// for 200 MB at t = 2048, d = 64, 8 x 32 heads). The same values up to the fp32 order of the sum.
constexpr int kRowstatRowsPerThread = 4;
template <int d> constexpr int rowstat_rows_per_block() { return kThreads / (d / 8) * kRowstatRowsPerThread; }
// grid: (b * hq, tpad / rows per block); no 64-bit division per row (rowstat_kernel's w / tpad).
template <int d, typename T>
__global__ void __launch_bounds__(kThreads) rowstat_rows_kernel(const T* dy, const float* y32, const float* inv_den,
                                                               float2* rowstat, int64_t t, int64_t hq, int tpad) {
  constexpr int TPR = d / 8, RPP = kThreads / TPR, U = kRowstatRowsPerThread;
  const int sub = threadIdx.x % TPR;
  const int64_t bh = blockIdx.x, bi = bh / hq, h = bh % hq;
  const int row0 = blockIdx.y * (RPP * U) + threadIdx.x / TPR;
  float g[U][8], y[U][8];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int row = row0 + u * RPP;
    if (row < t) {
      const int64_t o = ((bi * t + row) * hq + h) * d + sub * 8;
      IO<T>::load8(dy + o, g[u]);
      IO<float>::load8(y32 + o, y[u]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) g[u][e] = y[u][e] = 0.f;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s += bf16_round(g[u][e]) * y[u][e];
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const int row = row0 + u * RPP;
    if (sub == 0 && row < tpad)
      rowstat[bh * tpad + row] = row < t ? make_float2(inv_den[bh * t + row], s) : make_float2(0.f, 0.f);
  }
}

// ------------------------------------------------------------------------------------------------
// dq: one block per (128 query rows, q head, batch). Intra-chunk part first, then the state part
// u = S_n ghat contracted through J_phi(e^{g} scale q)^T. Also writes q.dq per row for dlog_g.
// ------------------------------------------------------------------------------------------------
struct GradArgs {
  const void *q, *k, *v;
  const float* log_g;
  const bf16* Sws;   // dq: states entering each chunk; dkv: gradients of states leaving each chunk
  const bf16* ghat;  // [b, hq, tpad, E]
  const void* dy;
  const float2* rowstat;  // [b, hq, tpad]: (1 / den, dy . y)
  void *dq, *dk, *dv;
  float* dG;         // dq: [b, t, hq] (q.dq); dkv: [b, t, hk] (k.dk)
  const float* gcum;  // as OutArgs::gcum
  int gen;           // as OutArgs::gen
  int64_t b, t, hq, hk;
  int C, N, tpad;
  float scale;
  int has_s0;        // dq: a state enters chunk 0; dkv: the last chunk has a non-zero dS
};

template <int d, int G, int NBUF> constexpr size_t dq_smem(int gate_bytes) {
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  constexpr size_t intra = (size_t)kBM * LD * 2 + (size_t)4 * kKB * LD * 2;  // K, V: two buffers (v8)
  constexpr size_t state =
      (size_t)kBM * LD * 2 + (size_t)kBM * (d + 4) * 4 + (size_t)NBUF * (slab_rows(d, G) + 1) * E * 2;
  return (size_t)kBM * E * 2 + gate_bytes + (intra > state ? intra : state);
}

// v18, UCV = 3 (d = 64, sm_90a): the state part on wgmma (power_retention_state_wgmma.cuh), with a
// ring of triangle-row tiles in place of the slabs.
constexpr int kStateTile = 64 * 64;  // elements of one gathered [64][64] state tile
// Shared memory of the gathered state tiles: 3 slots, and 1 KiB to align them.
constexpr size_t state_ring_smem() { return 1024 + (size_t)3 * kStateTile * 2; }
template <int d> constexpr size_t dq_smem_wgmma(int gate_bytes) {
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  constexpr size_t intra = (size_t)kBM * LD * 2 + (size_t)4 * kKB * LD * 2;
  constexpr size_t state = (size_t)kBM * LD * 2 + (size_t)kBM * (d + 4) * 4 + state_ring_smem();
  return (size_t)kBM * E * 2 + gate_bytes + (intra > state ? intra : state);
}
template <int d>
__device__ __forceinline__ void dq_state_wgmma(float (&dacc)[d / 8][4], const uint32_t (&Ag)[d / 16][4],
                                               const bf16* gh, const bf16* xs, float* dqa, unsigned char* ring_mem,
                                               const bf16* S, bool live, int warp, int lane, float zc0, float zc1,
                                               float us0, float us1);

// MINB: blocks per SM that the register allocation must allow (0: no bound; v5: 2 at d <= 64).
// UCV: the state contraction, 1: u_contract (v1 .. v11), 2: the v12 tiles, 3: wgmma (v18).
template <int d, typename T, int G, int NBUF, int MINB = 0, int UCV = 1>
__global__ void __launch_bounds__(kThreads, MINB) dq_kernel(const GradArgs p) {
  constexpr int D = Cfg<d>::D, E = Cfg<d>::E, ND = Cfg<d>::ND, LD = Cfg<d>::LD;
  constexpr int SL = slab_rows(d, G) + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* gh = reinterpret_cast<bf16*>(smem_raw);  // [128][E]
  float* gsm = reinterpret_cast<float*>(gh + kBM * E);
  unsigned char* region = reinterpret_cast<unsigned char*>(gsm) + gate_smem_bytes(p.C, p.gcum != nullptr);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t hqi = blockIdx.y, bi = blockIdx.z;
  const int r = (int)(p.hq / p.hk);
  const int64_t h = hqi / r;
  const int row0 = blockIdx.x * kBM;
  const int n = row0 / p.C;
  const int64_t cs = (int64_t)n * p.C;
  const int cnt = (int)min((int64_t)p.C, p.t - cs);
  const int lrow0 = row0 - (int)cs;
  const int nq = min(cnt, lrow0 + kBM);
  const int64_t tok0 = bi * p.t + cs;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);

  const float* gs = chunk_gates(gsm, p.gcum, p.log_g, bi, h, p.t, p.hk, cs, nq);
  load_tile<d>(gh, static_cast<const T*>(p.dy), tok0, p.hq, hqi, lrow0, kBM, cnt, [](int) { return 1.f; });
  bf16* qs = reinterpret_cast<bf16*>(region);
  bf16* const Kbuf = qs + kBM * LD;  // K, V tiles; v8 (bf16): two buffers, the next one loading
  const bool async = std::is_same<T, bf16>::value && p.gen >= 8;
  auto issue_kv = [&](int kb, bf16* dst) {
    if constexpr (std::is_same<T, bf16>::value) {
      load_tile_async<d, false>(dst, LD, K, tok0, p.hk, h, kb, kKB, cnt);
      load_tile_async<d, false>(dst + kKB * LD, LD, V, tok0, p.hk, h, kb, kKB, cnt);
    }
  };
  load_tile<d>(qs, Q, tok0, p.hq, hqi, lrow0, kBM, cnt, [](int) { return 1.f; });
  if (async) {
    issue_kv(0, Kbuf);
    cp_commit();
  }
  __syncthreads();

  const int wr0 = warp * 16 + g, wr1 = wr0 + 8;
  uint32_t Ag[d / 16][4];
#pragma unroll
  for (int ks = 0; ks < d / 16; ++ks)
    ldsm4(Ag[ks], gh + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
  // ghat . [v, 1] = (dy . v - dy . y) / den, from the exact dy and fp32 row statistics
  const float2* rst = p.rowstat + (bi * p.hq + hqi) * p.tpad + cs;
  const float2 st0 = rst[min(lrow0 + wr0, cnt - 1)], st1 = rst[min(lrow0 + wr1, cnt - 1)];
  float dacc[ND][4];
#pragma unroll
  for (int nt = 0; nt < ND; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dacc[nt][e] = 0.f;

  const int qi0 = lrow0 + wr0, qi1 = lrow0 + wr1;
  const float gq0 = gs[min(qi0, nq - 1)], gq1 = gs[min(qi1, nq - 1)];
  // v7: q.dq of the intra part for dlog_g, sum_j a_ij x_ij in fp32 from the unrounded operand values
  // (dkv_kernel sums the same terms by column), not from q and the bf16-operand dq (see the epilogue)
  float rdot[2] = {0.f, 0.f};
  for (int kb0 = 0, it = 0; kb0 < nq; kb0 += kKB, ++it) {
    __syncthreads();
    bf16* Ks = Kbuf + (async ? (it & 1) * 2 * kKB * LD : 0);
    bf16* Vs = Ks + kKB * LD;
    if (async) {
      if (kb0 + kKB < nq) issue_kv(kb0 + kKB, Kbuf + ((it + 1) & 1) * 2 * kKB * LD);
      cp_commit();
      cp_wait<1>();
    } else {
      load_tile<d>(Ks, K, tok0, p.hk, h, kb0, kKB, cnt, [](int) { return 1.f; });
      load_tile<d>(Vs, V, tok0, p.hk, h, kb0, kKB, cnt, [](int) { return 1.f; });
    }
    __syncthreads();
    if (lrow0 + warp * 16 + 15 < kb0) continue;
    float s[8][4], da[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = da[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < d / 16; ++ks) {
      uint32_t Aq[4];
      ldsm4(Aq, qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        const int off = (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8;
        ldsm4(b, Ks + off);
        mma(s[2 * np], Aq, b[0], b[1]);
        mma(s[2 * np + 1], Aq, b[2], b[3]);
        ldsm4(b, Vs + off);
        mma(da[2 * np], Ag[ks], b[0], b[1]);
        mma(da[2 * np + 1], Ag[ks], b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = e < 2 ? qi0 : qi1;
        const int kj = kb0 + nt * 8 + 2 * tq + (e & 1);
        const bool ok = kj <= qi && kj < cnt;
        const float x = s[nt][e] * p.scale;
        const float ex = __expf((e < 2 ? gq0 : gq1) - gs[ok ? kj : 0]);
        const float2 st = e < 2 ? st0 : st1;
        // pre-scaled exactly as in dkv_kernel, so both sides round the same value (telescoping dlog_g)
        const float a = ok ? 2.f * x * ex * (da[nt][e] - st.y) * st.x * p.scale : 0.f;
        rdot[e >> 1] += a * x;
        s[nt][e] = a;
      }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t A[4];
      A[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      A[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      A[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      A[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const bf16* bp = Ks + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
      for (int np = 0; np < ND / 2; ++np) {
        uint32_t b[4];
        ldsm4t(b, bp + np * 16);
        mma(dacc[2 * np], A, b[0], b[1]);
        mma(dacc[2 * np + 1], A, b[2], b[3]);
      }
    }
  }
  cp_wait<0>();  // (v8: the last, empty group) before the state part reuses the tiles' memory
  // v7: q . dacc of the intra part, to swap for rdot in the epilogue (the state part below adds
  // to dacc too, so the epilogue's q . dq still takes the whole dacc)
  float idot[2] = {0.f, 0.f};
  if (p.gen >= 7) tile_row_dots<ND, LD>(idot, qs, dacc, wr0, tq);
  __syncthreads();

  const bool has_state = n > 0 || p.has_s0;
  bf16* xs = reinterpret_cast<bf16*>(region);
  float* dqa = reinterpret_cast<float*>(xs + kBM * LD);
  bf16* slab = reinterpret_cast<bf16*>(dqa + kBM * (d + 4));
  if (has_state) {
    const float sc = p.scale;
    // e^{g} scale q for J_phi, times scale again: the state part then comes out as dq (not d(scale q))
    load_tile<d>(xs, Q, tok0, p.hq, hqi, lrow0, kBM, cnt, [&](int li) { return sc * sc * expf(gs[li]); });
    const bf16* S = p.Sws + ((bi * p.hk + h) * p.N + n) * (int64_t)D * E;
    if constexpr (UCV == 3) {
      dq_state_wgmma<d>(dacc, Ag, gh, xs, dqa, reinterpret_cast<unsigned char*>(slab), S,
                        lrow0 + (warp >> 2) * 64 < cnt, warp, lane, -st0.y, -st1.y, st0.x, st1.x);
    } else {
      for (int j = tid; j < NBUF * E; j += blockDim.x)
        slab[(j / E) * SL * E + (SL - 1) * E + (j % E)] = __float2bfloat16(0.f);
      constexpr int NG = d / G;
      auto issue = [&](int grp) {
        const int a0 = grp * G;
        load_rows_async<E>(slab + (grp % NBUF) * SL * E, S, row_start(a0, d), min(row_start(a0 + G, d), D));
        cp_commit();
      };
      issue(0);
      for (int grp = 0; grp < NG; ++grp) {
        if (NBUF > 1 && grp + 1 < NG) {
          issue(grp + 1);
          cp_wait<1>();
        } else {
          cp_wait<0>();
        }
        __syncthreads();
        const bf16* sl = slab + (grp % NBUF) * SL * E;
        const int a0 = grp * G, base = row_start(a0, d);
#pragma unroll 1
        for (int ai = 0; ai < G; ++ai)
          u_contract_v<d, UCV>(dacc, Ag, xs, sl, base, SL - 1, a0 + ai, wr0, lane, -st0.y, -st1.y, st0.x, st1.x, dqa,
                               d + 4);
        __syncthreads();
        if (NBUF == 1 && grp + 1 < NG) issue(grp + 1);
      }
    }
  }

  // epilogue: dq = dacc + dqa (both already in units of dq); dG = q . dq. v7: the intra part of
  // q . dq from the fp32 row dots instead of q . (bf16-operand intra dq), and the rest with the bf16
  // operand q the kernels used (fp32 / fp16 inputs: the exact q's rounding difference broke the
  // telescoping of dlog_g over long chunks)
  T* DQ = static_cast<T*>(p.dq);
  const bool v0 = qi0 < cnt, v1 = qi1 < cnt;
  const bool fdots = p.gen >= 7;
  float dot0 = fdots ? rdot[0] / p.scale - idot[0] : 0.f, dot1 = fdots ? rdot[1] / p.scale - idot[1] : 0.f;
#pragma unroll
  for (int nt = 0; nt < ND; ++nt) {
    const int col = nt * 8 + 2 * tq;
    float x0 = dacc[nt][0], x1 = dacc[nt][1], x2 = dacc[nt][2], x3 = dacc[nt][3];
    if (has_state) {
      x0 += dqa[wr0 * (d + 4) + col];
      x1 += dqa[wr0 * (d + 4) + col + 1];
      x2 += dqa[wr1 * (d + 4) + col];
      x3 += dqa[wr1 * (d + 4) + col + 1];
    }
    if (v0) {
      T* dst = DQ + ((tok0 + qi0) * p.hq + hqi) * d + col;
      float2 qv = IO<T>::load2(Q + ((tok0 + qi0) * p.hq + hqi) * d + col);
      if (fdots) qv = make_float2(bf16_round(qv.x), bf16_round(qv.y));
      dot0 += qv.x * x0 + qv.y * x1;
      IO<T>::store2(dst, x0, x1);
    }
    if (v1) {
      T* dst = DQ + ((tok0 + qi1) * p.hq + hqi) * d + col;
      float2 qv = IO<T>::load2(Q + ((tok0 + qi1) * p.hq + hqi) * d + col);
      if (fdots) qv = make_float2(bf16_round(qv.x), bf16_round(qv.y));
      dot1 += qv.x * x2 + qv.y * x3;
      IO<T>::store2(dst, x2, x3);
    }
  }
  dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
  dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
  dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
  dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
  if (tq == 0 && p.dG) {
    if (v0) p.dG[(tok0 + qi0) * p.hq + hqi] = dot0;
    if (v1) p.dG[(tok0 + qi1) * p.hq + hqi] = dot1;
  }
}

// ------------------------------------------------------------------------------------------------
// dk, dv: one block per (128 key rows, KV head, batch). Intra-chunk part over the r query heads,
// then the state part from dS (gradient of the state leaving the chunk):
//   dv_j += e^{Gt-g_j} phi(k_j)^T dS[:, :d];  dk_j += J_phi(k_j)^T (e^{Gt-g_j} dS [v_j, 1]).
// ------------------------------------------------------------------------------------------------
template <int d, int G, int NBUF> constexpr size_t dkv_smem(int gate_bytes) {
  constexpr int LD = Cfg<d>::LD, E = Cfg<d>::E;
  constexpr size_t intra = (size_t)kBM * LD * 2 + 2 * ((size_t)2 * kKB * LD * 2 + (size_t)kKB * 8);  // 2 buffers
  constexpr size_t state =
      (size_t)kBM * LD * 2 + (size_t)kBM * (d + 4) * 4 + (size_t)NBUF * (slab_rows(d, G) + 1) * E * 2;
  return (size_t)kBM * LD * 2 + gate_bytes + (intra > state ? intra : state);
}

template <int d> constexpr size_t dkv_smem_wgmma(int gate_bytes) {  // UCV = 3 (v18)
  constexpr int LD = Cfg<d>::LD;
  constexpr size_t intra = (size_t)kBM * LD * 2 + 2 * ((size_t)2 * kKB * LD * 2 + (size_t)kKB * 8);
  constexpr size_t state = (size_t)kBM * LD * 2 + (size_t)kBM * (d + 4) * 4 + state_ring_smem();
  return (size_t)kBM * LD * 2 + gate_bytes + (intra > state ? intra : state);
}
template <int d>
__device__ __forceinline__ void dkv_state_wgmma(float (&dk)[d / 8][4], float (&dv)[d / 8][4],
                                                const uint32_t (&Av)[d / 16][4], const bf16* vs, const bf16* xs,
                                                float* dka, unsigned char* ring_mem, const bf16* S, bool live,
                                                int warp, int lane, float us0, float us1);

template <int d, typename T, int G, int NBUF, int MINB = 0, int UCV = 1>
__global__ void __launch_bounds__(kThreads, MINB) dkv_kernel(const GradArgs p) {
  constexpr int D = Cfg<d>::D, E = Cfg<d>::E, ND = Cfg<d>::ND, LD = Cfg<d>::LD;
  constexpr int SL = slab_rows(d, G) + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* vs = reinterpret_cast<bf16*>(smem_raw);  // raw v [128][LD]
  float* gsm = reinterpret_cast<float*>(vs + kBM * LD);
  unsigned char* region = reinterpret_cast<unsigned char*>(gsm) + gate_smem_bytes(p.C, p.gcum != nullptr);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t h = blockIdx.y, bi = blockIdx.z;
  const int r = (int)(p.hq / p.hk);
  const int row0 = blockIdx.x * kBM;
  const int n = row0 / p.C;
  const int64_t cs = (int64_t)n * p.C;
  const int cnt = (int)min((int64_t)p.C, p.t - cs);
  const int lrow0 = row0 - (int)cs;
  const int64_t tok0 = bi * p.t + cs;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);

  const float* gs = chunk_gates(gsm, p.gcum, p.log_g, bi, h, p.t, p.hk, cs, cnt);
  const float Gt = gs[cnt - 1];
  bf16* ks = reinterpret_cast<bf16*>(region);
  // query tiles: q [64][LD], dy [64][LD], (1 / den, dy . y) [64] float2; v8 (bf16): two buffers
  bf16* const Qbuf = ks + kBM * LD;
  constexpr int QB = 2 * kKB * LD + kKB * 4;  // elements (bf16-sized) of one buffer
  const bool async = std::is_same<T, bf16>::value && p.gen >= 8;
  auto issue_q = [&](int64_t hq_i, int qb, bf16* dst) {
    if constexpr (std::is_same<T, bf16>::value) {
      load_tile_async<d, false>(dst, LD, Q, tok0, p.hq, hq_i, qb, kKB, cnt);
      load_tile_async<d, false>(dst + kKB * LD, LD, static_cast<const T*>(p.dy), tok0, p.hq, hq_i, qb, kKB, cnt);
      // rowstat rows past cnt hold zeros (chunk_out writes every row up to tpad)
      if (threadIdx.x < kKB / 2)
        cp_async16(dst + 2 * kKB * LD + threadIdx.x * 8, p.rowstat + (bi * p.hq + hq_i) * p.tpad + cs + qb + threadIdx.x * 2);
    }
  };
  if (async && lrow0 < cnt) {
    issue_q(h * r, lrow0, Qbuf);
    cp_commit();
  }
  load_tile<d>(vs, V, tok0, p.hk, h, lrow0, kBM, cnt, [](int) { return 1.f; });
  load_tile<d>(ks, K, tok0, p.hk, h, lrow0, kBM, cnt, [](int) { return 1.f; });
  __syncthreads();

  const int wr0 = warp * 16 + g, wr1 = wr0 + 8;
  const int kj0 = lrow0 + wr0, kj1 = lrow0 + wr1;
  const float gk0 = gs[min(kj0, cnt - 1)], gk1 = gs[min(kj1, cnt - 1)];
  uint32_t Av[d / 16][4];
#pragma unroll
  for (int kk = 0; kk < d / 16; ++kk)
    ldsm4(Av[kk], vs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);
  float dv[ND][4], dk[ND][4];
#pragma unroll
  for (int nt = 0; nt < ND; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[nt][e] = dk[nt][e] = 0.f;

  float cdot[2] = {0.f, 0.f};  // v7: k.dk of the intra part in fp32 (see dq_kernel's rdot)
  int it = 0;
  for (int rr = 0; rr < r; ++rr) {
    const int64_t hq_i = h * r + rr;
    for (int qb0 = lrow0; qb0 < cnt; qb0 += kKB, ++it) {
      __syncthreads();
      bf16* Qs = Qbuf + (async ? (it & 1) * QB : 0);
      bf16* DYs = Qs + kKB * LD;
      float2* qst = reinterpret_cast<float2*>(DYs + kKB * LD);
      if (async) {
        bf16* nxt = Qbuf + ((it + 1) & 1) * QB;
        if (qb0 + kKB < cnt) issue_q(hq_i, qb0 + kKB, nxt);
        else if (rr + 1 < r) issue_q(hq_i + 1, lrow0, nxt);
        cp_commit();
        cp_wait<1>();
      } else {
        load_tile<d>(Qs, Q, tok0, p.hq, hq_i, qb0, kKB, cnt, [](int) { return 1.f; });
        load_tile<d>(DYs, static_cast<const T*>(p.dy), tok0, p.hq, hq_i, qb0, kKB, cnt, [](int) { return 1.f; });
        if (tid < kKB) {
          const int qi = qb0 + tid;
          qst[tid] = qi < cnt ? p.rowstat[(bi * p.hq + hq_i) * p.tpad + cs + qi] : make_float2(0.f, 0.f);
        }
      }
      __syncthreads();
      if (lrow0 + warp * 16 > qb0 + kKB - 1) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int qh0 = qb0 + half * 32;
        if (lrow0 + warp * 16 > qh0 + 31) continue;
        float s[4][4], da[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = da[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < d / 16; ++kk) {
          uint32_t Ak[4];
          ldsm4(Ak, ks + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t b[4];
            const int rowi = half * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8, colk = kk * 16 + ((lane >> 3) & 1) * 8;
            ldsm4(b, Qs + rowi * LD + colk);
            mma(s[2 * np], Ak, b[0], b[1]);
            mma(s[2 * np + 1], Ak, b[2], b[3]);
            ldsm4(b, DYs + rowi * LD + colk);
            mma(da[2 * np], Av[kk], b[0], b[1]);
            mma(da[2 * np + 1], Av[kk], b[2], b[3]);
          }
        }
        float w[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int qi = qh0 + nt * 8 + 2 * tq + c;
            const bool qok = qi < cnt;
            const float gqi = gs[qok ? qi : 0];
            const float2 sti = qst[qi - qb0];
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
              const int e = 2 * hr + c;
              const int kj = hr ? kj1 : kj0;
              const bool ok = qok && qi >= kj;
              const float x = s[nt][e] * p.scale;
              const float ex = __expf(gqi - (hr ? gk1 : gk0));
              w[nt][e] = ok ? x * x * ex * sti.x : 0.f;  // times 1 / den: dv = sum w dy / den
              const float a = ok ? 2.f * x * ex * (da[nt][e] - sti.y) * sti.x * p.scale : 0.f;
              cdot[hr] += a * x;
              s[nt][e] = a;
            }
          }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          uint32_t Aw[4], As[4];
          Aw[0] = pack_bf16(w[2 * kk][0], w[2 * kk][1]);
          Aw[1] = pack_bf16(w[2 * kk][2], w[2 * kk][3]);
          Aw[2] = pack_bf16(w[2 * kk + 1][0], w[2 * kk + 1][1]);
          Aw[3] = pack_bf16(w[2 * kk + 1][2], w[2 * kk + 1][3]);
          As[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
          As[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
          As[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          As[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
          const int rowk = half * 32 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, coln = (lane >> 4) * 8;
#pragma unroll
          for (int np = 0; np < ND / 2; ++np) {
            uint32_t b[4];
            ldsm4t(b, DYs + rowk * LD + coln + np * 16);
            mma(dv[2 * np], Aw, b[0], b[1]);
            mma(dv[2 * np + 1], Aw, b[2], b[3]);
            ldsm4t(b, Qs + rowk * LD + coln + np * 16);
            mma(dk[2 * np], As, b[0], b[1]);
            mma(dk[2 * np + 1], As, b[2], b[3]);
          }
        }
      }
    }
  }
  cp_wait<0>();  // (v8: the last, empty group) before the state part reuses the tiles' memory
  // v7: k . dk of the intra part, swapped for cdot in the epilogue (as dq_kernel's idot)
  float idot[2] = {0.f, 0.f};
  if (p.gen >= 7) tile_row_dots<ND, LD>(idot, ks, dk, wr0, tq);
  __syncthreads();

  const bool has_dS = n < p.N - 1 || p.has_s0;
  bf16* xk = reinterpret_cast<bf16*>(region);
  float* dka = reinterpret_cast<float*>(xk + kBM * LD);
  bf16* slab = reinterpret_cast<bf16*>(dka + kBM * (d + 4));
  if (has_dS) {
    load_tile<d>(xk, K, tok0, p.hk, h, lrow0, kBM, cnt, [&](int li) { return expf(0.5f * (Gt - gs[li])); });
    const float us0 = kj0 < cnt ? expf(0.5f * (Gt - gk0)) : 0.f;
    const float us1 = kj1 < cnt ? expf(0.5f * (Gt - gk1)) : 0.f;
    const bf16* S = p.Sws + ((bi * p.hk + h) * p.N + n) * (int64_t)D * E;
    if constexpr (UCV == 3) {
      dkv_state_wgmma<d>(dk, dv, Av, vs, xk, dka, reinterpret_cast<unsigned char*>(slab), S,
                         lrow0 + (warp >> 2) * 64 < cnt, warp, lane, us0, us1);
    } else {
      for (int j = tid; j < NBUF * E; j += blockDim.x)
        slab[(j / E) * SL * E + (SL - 1) * E + (j % E)] = __float2bfloat16(0.f);
      constexpr int NG = d / G;
      auto issue = [&](int grp) {
        const int a0 = grp * G;
        load_rows_async<E>(slab + (grp % NBUF) * SL * E, S, row_start(a0, d), min(row_start(a0 + G, d), D));
        cp_commit();
      };
      issue(0);
      for (int grp = 0; grp < NG; ++grp) {
        if (NBUF > 1 && grp + 1 < NG) {
          issue(grp + 1);
          cp_wait<1>();
        } else {
          cp_wait<0>();
        }
        __syncthreads();
        const bf16* sl = slab + (grp % NBUF) * SL * E;
        const int a0 = grp * G, base = row_start(a0, d);
#pragma unroll 1
        for (int ap = 0; ap < G; ap += 2) {
          phi_pair_v<d, ND, E, UCV>(dv, xk, sl, base, SL - 1, a0 + ap, wr0, lane);
          u_contract_v<d, UCV>(dk, Av, xk, sl, base, SL - 1, a0 + ap, wr0, lane, 1.f, 1.f, us0, us1, dka, d + 4);
          u_contract_v<d, UCV>(dk, Av, xk, sl, base, SL - 1, a0 + ap + 1, wr0, lane, 1.f, 1.f, us0, us1, dka, d + 4);
        }
        __syncthreads();
        if (NBUF == 1 && grp + 1 < NG) issue(grp + 1);
      }
    }
  }

  T* DK = static_cast<T*>(p.dk);
  T* DV = static_cast<T*>(p.dv);
  const bool v0 = kj0 < cnt, v1 = kj1 < cnt;
  const bool fdots = p.gen >= 7;  // as in dq_kernel's epilogue
  float dot0 = fdots ? cdot[0] / p.scale - idot[0] : 0.f, dot1 = fdots ? cdot[1] / p.scale - idot[1] : 0.f;
#pragma unroll
  for (int nt = 0; nt < ND; ++nt) {
    const int col = nt * 8 + 2 * tq;
    float x0 = dk[nt][0], x1 = dk[nt][1], x2 = dk[nt][2], x3 = dk[nt][3];
    if (has_dS) {
      x0 += dka[wr0 * (d + 4) + col];
      x1 += dka[wr0 * (d + 4) + col + 1];
      x2 += dka[wr1 * (d + 4) + col];
      x3 += dka[wr1 * (d + 4) + col + 1];
    }
    if (v0) {
      const int64_t o = ((tok0 + kj0) * p.hk + h) * d + col;
      float2 kv = IO<T>::load2(K + o);
      if (fdots) kv = make_float2(bf16_round(kv.x), bf16_round(kv.y));
      dot0 += kv.x * x0 + kv.y * x1;
      IO<T>::store2(DK + o, x0, x1);
      IO<T>::store2(DV + o, dv[nt][0], dv[nt][1]);
    }
    if (v1) {
      const int64_t o = ((tok0 + kj1) * p.hk + h) * d + col;
      float2 kv = IO<T>::load2(K + o);
      if (fdots) kv = make_float2(bf16_round(kv.x), bf16_round(kv.y));
      dot1 += kv.x * x2 + kv.y * x3;
      IO<T>::store2(DK + o, x2, x3);
      IO<T>::store2(DV + o, dv[nt][2], dv[nt][3]);
    }
  }
  dot0 += __shfl_xor_sync(0xffffffffu, dot0, 1);
  dot0 += __shfl_xor_sync(0xffffffffu, dot0, 2);
  dot1 += __shfl_xor_sync(0xffffffffu, dot1, 1);
  dot1 += __shfl_xor_sync(0xffffffffu, dot1, 2);
  if (tq == 0 && p.dG) {
    if (v0) p.dG[(tok0 + kj0) * p.hk + h] = dot0;
    if (v1) p.dG[(tok0 + kj1) * p.hk + h] = dot1;
  }
}

// ------------------------------------------------------------------------------------------------
// dlog_g: dG_i = (sum_heads q.dq - k.dk) / 2 (+ <dS_T, S_T> at the last token), then a reverse
// cumulative sum over time. One block per (batch, KV head); deterministic order.
// ------------------------------------------------------------------------------------------------
constexpr int kScanThreads = 512;
__global__ void __launch_bounds__(kScanThreads)
    dlogg_kernel(const float* dGq, const float* dGk, const float* dot, int ntiles, float* dlog_g, int64_t t,
                 int64_t hq, int64_t hk) {
  __shared__ float tot[kScanThreads + 1];
  __shared__ float dot_total;
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, bi = bh / hk, h = bh % hk;
  const int r = (int)(hq / hk);
  if (tid == 0) {
    float s = 0.f;
    if (dot)
      for (int i = 0; i < ntiles; ++i) s += dot[bh * ntiles + i];
    dot_total = s;
  }
  __syncthreads();
  // sum_heads q.dq = 2 sum_heads ghat . o is zero in exact arithmetic (y is invariant to scaling o),
  // but its computed value shares the rounded intra-chunk terms of k.dk, which then telescope in
  // the reverse cumsum: keep both sides.
  auto dG = [&](int64_t i) {
    float s = 0.f;
    for (int rr = 0; rr < r; ++rr) s += dGq[(bi * t + i) * hq + h * r + rr];
    s = 0.5f * (s - dGk[(bi * t + i) * hk + h]);
    if (i == t - 1) s += dot_total;
    return s;
  };
  const int64_t seg = (t + kScanThreads - 1) / kScanThreads;
  const int64_t beg = min((int64_t)tid * seg, t), end = min(beg + seg, t);
  float local = 0.f;
  for (int64_t i = beg; i < end; ++i) local += dG(i);
  tot[tid] = local;
  if (tid == 0) tot[kScanThreads] = 0.f;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {
    const float v = tid + off < kScanThreads ? tot[tid + off] : 0.f;
    __syncthreads();
    tot[tid] += v;
    __syncthreads();
  }
  float run = tot[tid + 1];  // sum of all later segments
  for (int64_t i = end - 1; i >= beg; --i) {
    run += dG(i);
    dlog_g[(bi * t + i) * hk + h] = run;
  }
}

// ------------------------------------------------------------------------------------------------
// v2 state combine: after state_scan_kernel<LOCAL> has put each chunk's own contribution into the
// workspace (see there), walk the chunks once per state element, in place:
//   forward  slot 0 = S0;         slot m = e^{Gt_{m-1}} slot m-1 + delta_{m-1}   (m = 1 .. N-1)
//   reverse  slot N-1 = dS_T;     slot m = e^{Gt_{m+1}} slot m+1 + L_{m+1}       (m = N-2 .. 0)
// and the end value (forward: the final state; reverse: the gradient of the initial state) from
// fbuf. Each thread owns 8 consecutive elements of one fused row [D][E] and keeps them in fp32, so
// only the per-chunk contributions are rounded to bf16, never the running sum. Memory bound.
// dlog_g partials (deterministic, per block): reverse <D_m, S_{m+1}> against the forward states
// for m <= N-2; forward <dS_T, S_T> (the m = N-1 term). part: [b * hk, N, gridDim.x].
// ------------------------------------------------------------------------------------------------
struct PrefixArgs {
  bf16* ws;              // [b * hk, N, D, E]
  const float* fbuf;     // [b * hk, D, E] or null (no end value)
  const float* gtot;     // [b * hk, N]
  const float* s_init;   // [b * hk, D, d] or null
  const float* z_init;   // [b * hk, D] or null
  float* s_fin;          // [b * hk, D, d] or null
  float* z_fin;          // [b * hk, D] or null
  const float* dot_s;    // forward: <., S_T> against these (gradient of the final state) or null
  const float* dot_z;
  const bf16* dot_ws;    // reverse: forward states for <D_m, S_{m+1}>, or null
  float* part;           // [b * hk, N, gridDim.x]
  int64_t N, D;
};
constexpr int kPT = 256;

__device__ __forceinline__ void block_sum_to(float v, float* red, float* out) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kPT / 32; ++w) s += red[w];
    *out = s;
  }
  __syncthreads();
}

template <int d, bool REV>
__global__ void __launch_bounds__(kPT) state_prefix_kernel(const PrefixArgs p) {
  constexpr int E = Cfg<d>::E, V = E / 8;
  __shared__ float red[kPT / 32];
  const int64_t bh = blockIdx.y, N = p.N, SE = p.D * E;
  const int64_t e8 = (int64_t)blockIdx.x * kPT + threadIdx.x;
  const bool act = e8 < p.D * V;
  const int64_t f = act ? e8 / V : 0;
  const int c0 = act ? (int)(e8 % V) * 8 : 0;
  bf16* base = p.ws + bh * N * SE + f * E + c0;  // slot m at base + m * SE
  const float* gt = p.gtot + bh * N;
  float* part = p.part + bh * N * gridDim.x + blockIdx.x;  // chunk m at part[m * gridDim.x]
  float X[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int col = c0 + u;
    float x = 0.f;
    if (act && col < d && p.s_init) x = p.s_init[(bh * p.D + f) * d + col];
    if (act && col == d && p.z_init) x = p.z_init[bh * p.D + f];
    X[u] = x;
  }
  if (act && (p.s_init || p.z_init)) st8_bf16(base + (REV ? N - 1 : 0) * SE, X);
  auto slot_of = [&](int64_t i) { return REV ? N - 1 - i : i; };
  uint4 nxt = make_uint4(0, 0, 0, 0);
  if (act && N > 1) nxt = *reinterpret_cast<const uint4*>(base + slot_of(1) * SE);
  for (int64_t i = 1; i < N; ++i) {
    const int64_t m = slot_of(i);
    const uint4 cur = nxt;
    if (act && i + 1 < N) nxt = *reinterpret_cast<const uint4*>(base + slot_of(i + 1) * SE);
    const float dec = expf(gt[REV ? m + 1 : m - 1]);
    const uint32_t w[4] = {cur.x, cur.y, cur.z, cur.w};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 dl = unpack_bf16(w[u]);
      X[2 * u] = dec * X[2 * u] + dl.x;
      X[2 * u + 1] = dec * X[2 * u + 1] + dl.y;
    }
    if (act) st8_bf16(base + m * SE, X);
    if (REV && p.dot_ws) {  // m <= N - 2 here
      float dot = 0.f;
      if (act) {
        float sv[8];
        IO<bf16>::load8(p.dot_ws + (bh * N + m + 1) * SE + f * E + c0, sv);
#pragma unroll
        for (int u = 0; u < 8; ++u) dot += X[u] * sv[u];
      }
      block_sum_to(dot, red, part + m * gridDim.x);
    }
  }
  if (!p.fbuf) return;
  const float dec = expf(gt[REV ? 0 : N - 1]);
  float dot = 0.f;
  if (act) {
    const float* fb = p.fbuf + bh * SE + f * E + c0;
    const float4 a = *reinterpret_cast<const float4*>(fb), b = *reinterpret_cast<const float4*>(fb + 4);
    const float fv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float x = dec * X[u] + fv[u];
      const int col = c0 + u;
      if (col < d) {
        if (p.s_fin) p.s_fin[(bh * p.D + f) * d + col] = x;
        if (p.dot_s) dot += x * p.dot_s[(bh * p.D + f) * d + col];
      } else if (col == d) {
        if (p.z_fin) p.z_fin[bh * p.D + f] = x;
        if (p.dot_z) dot += x * p.dot_z[bh * p.D + f];
      }
    }
  }
  if (!REV && (p.dot_s || p.dot_z)) block_sum_to(dot, red, part + (N - 1) * gridDim.x);
}

// v2 dlog_g, chunk-local: for token tau in chunk n,
//   dlog_g_tau = sum_{i >= tau, i in chunk n} dG_i + <dS_{n+1}, S_{n+1}>,  dG_i = (sum_heads q.dq - k.dk)/2,
// with S_{n+1} the state leaving chunk n and dS_{n+1} its gradient (for the last chunk: the final
// state and its given gradient). Exact (every pair (i, j) with j < tau <= i is counted once; see
// docs/perf.md), and the rounding errors no longer accumulate across chunks. One block per
// (chunk, b * hk); part as written by state_prefix_kernel (mid: chunks 0..N-2, last: chunk N-1).
__global__ void __launch_bounds__(kPT)
    dlogg_local_kernel(const float* dGq, const float* dGk, const float* part, int nparts, int has_mid, int has_last,
                       float* dlog_g, int64_t t, int64_t hq, int64_t hk, int C, int N) {
  __shared__ float tot[kPT + 1];
  __shared__ float kn;
  const int tid = threadIdx.x;
  const int n = blockIdx.x;
  const int64_t bh = blockIdx.y, bi = bh / hk, h = bh % hk;
  const int r = (int)(hq / hk);
  if (tid == 0) {
    float s = 0.f;
    if (n < N - 1 ? has_mid : has_last)
      for (int i = 0; i < nparts; ++i) s += part[(bh * N + n) * nparts + i];
    kn = s;
  }
  const int64_t cs = (int64_t)n * C;
  const int cnt = (int)min((int64_t)C, t - cs);
  auto dG = [&](int64_t i) {
    float s = 0.f;
    for (int rr = 0; rr < r; ++rr) s += dGq[(bi * t + i) * hq + h * r + rr];
    return 0.5f * (s - dGk[(bi * t + i) * hk + h]);
  };
  const int seg = (cnt + kPT - 1) / kPT;
  const int beg = min(tid * seg, cnt), end = min(beg + seg, cnt);
  float local = 0.f;
  for (int i = beg; i < end; ++i) local += dG(cs + i);
  tot[tid] = local;
  if (tid == 0) tot[kPT] = 0.f;
  __syncthreads();
  for (int off = 1; off < kPT; off <<= 1) {
    const float v = tid + off < kPT ? tot[tid + off] : 0.f;
    __syncthreads();
    tot[tid] += v;
    __syncthreads();
  }
  float run = tot[tid + 1] + kn;  // later segments of this chunk, then the state term
  for (int i = end - 1; i >= beg; --i) {
    run += dG(cs + i);
    dlog_g[(bi * t + cs + i) * hk + h] = run;
  }
}

// ------------------------------------------------------------------------------------------------
// Decode step: one block per (64 features, b * hk); updates its rows of S and z in place, token
// by token, and writes per-tile partial [num, den] for each q head; a second kernel reduces.
// ------------------------------------------------------------------------------------------------
struct StepArgs {
  const void *q, *k, *v;
  const float* log_g;
  float *S, *z, *part;
  void* y;
  int64_t b, t, hq, hk;
  float scale;
  int nft;
};
constexpr int kStepFT = 64;

// PRE (v3): each thread issues its state loads for token i before that token's q/k/v loads, barriers
// and phi (and for token 0 before the feature-index setup), so the one big memory round trip of a
// block overlaps its latency-bound prologue instead of following it. Same indices and arithmetic:
// a thread only ever reads the S / z elements it writes itself, so hoisting the load is safe.
template <int d, typename T, bool PRE = false>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepArgs p) {
  constexpr int D = Cfg<d>::D;
  constexpr int TPR = d / 4;          // threads per feature row (4 columns each)
  constexpr int RP = kThreads / TPR;  // rows per pass
  constexpr int PASSES = kStepFT / RP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int r = (int)(p.hq / p.hk);
  float* kv = reinterpret_cast<float*>(smem_raw);  // k [d], v [d]
  float* qv = kv + 2 * d;                           // [r][d]
  float* phk = qv + r * d;                          // [kStepFT]
  float* phq = phk + kStepFT;                       // [r][kStepFT]
  float* red = phq + r * kStepFT;                   // [RP][d + 1]
  int* fab = reinterpret_cast<int*>(red + RP * (d + 1));  // [kStepFT] packed a | b << 16
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.y, bi = bh / p.hk, h = bh % p.hk;
  const int f0 = blockIdx.x * kStepFT;
  const int nf = min(kStepFT, D - f0);
  float* S = p.S + (bh * D + f0) * (int64_t)d;
  float* z = p.z + bh * D + f0;
  const int cg = tid % TPR, rg = tid / TPR;
  float sreg[PASSES][4], zreg[PASSES];
  auto load_state = [&]() {
#pragma unroll
    for (int ps = 0; ps < PASSES; ++ps) {
      const int fl = rg + ps * RP;
      float4 s4 = make_float4(0.f, 0.f, 0.f, 0.f);
      float zz = 0.f;
      if (fl < nf) {
        s4 = *reinterpret_cast<const float4*>(S + (int64_t)fl * d + 4 * cg);
        if (cg == 0) zz = z[fl];
      }
      sreg[ps][0] = s4.x; sreg[ps][1] = s4.y; sreg[ps][2] = s4.z; sreg[ps][3] = s4.w;
      zreg[ps] = zz;
    }
  };
  if constexpr (PRE) {
    if (p.t > 0) load_state();
  } else {
    (void)load_state;  // the !PRE path loads inside the update below
  }
  if (tid < kStepFT) {
    const int f = f0 + tid;
    int a = 0;
    if (f < D)
      while (row_start(a + 1, d) <= f) ++a;
    const int b = f < D ? a + f - row_start(a, d) : 0;
    fab[tid] = a | (b << 16);
  }
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  for (int64_t i = 0; i < p.t; ++i) {
    const int64_t tok = bi * p.t + i;
    if constexpr (PRE) {
      if (i > 0) load_state();
    }
    __syncthreads();
    for (int c = tid; c < (2 + r) * d; c += blockDim.x) {
      const int which = c / d, col = c % d;
      float x;
      if (which == 0) x = (float)K[(tok * p.hk + h) * d + col];
      else if (which == 1) x = (float)V[(tok * p.hk + h) * d + col];
      else x = p.scale * (float)Q[(tok * p.hq + h * r + which - 2) * d + col];
      kv[c] = x;
    }
    const float decay = p.log_g ? expf(p.log_g[tok * p.hk + h]) : 1.f;
    __syncthreads();
    for (int c = tid; c < (1 + r) * kStepFT; c += blockDim.x) {
      const int which = c / kStepFT, fl = c % kStepFT;
      const int a = fab[fl] & 0xffff, b = fab[fl] >> 16;
      const float w = fl < nf ? (a == b ? 1.f : kSqrt2) : 0.f;
      const float* x = which == 0 ? kv : qv + (which - 1) * d;
      (which == 0 ? phk : phq + (which - 1) * kStepFT)[fl] = w * x[a] * x[b];
    }
    __syncthreads();
#pragma unroll
    for (int ps = 0; ps < PASSES; ++ps) {
      const int fl = rg + ps * RP;
      if constexpr (!PRE) {
        sreg[ps][0] = sreg[ps][1] = sreg[ps][2] = sreg[ps][3] = 0.f;
        zreg[ps] = 0.f;
      }
      if (fl < nf) {
        float4* sp = reinterpret_cast<float4*>(S + (int64_t)fl * d + 4 * cg);
        float4 s4 = PRE ? make_float4(sreg[ps][0], sreg[ps][1], sreg[ps][2], sreg[ps][3]) : *sp;
        const float pk = phk[fl];
        s4.x = decay * s4.x + pk * kv[d + 4 * cg];
        s4.y = decay * s4.y + pk * kv[d + 4 * cg + 1];
        s4.z = decay * s4.z + pk * kv[d + 4 * cg + 2];
        s4.w = decay * s4.w + pk * kv[d + 4 * cg + 3];
        *sp = s4;
        sreg[ps][0] = s4.x; sreg[ps][1] = s4.y; sreg[ps][2] = s4.z; sreg[ps][3] = s4.w;
        if (cg == 0) {
          const float zz = decay * (PRE ? zreg[ps] : z[fl]) + pk;
          z[fl] = zz;
          zreg[ps] = zz;
        }
      }
    }
    for (int rr = 0; rr < r; ++rr) {
      float num[4] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;
#pragma unroll
      for (int ps = 0; ps < PASSES; ++ps) {
        const int fl = rg + ps * RP;
        const float pq = fl < nf ? phq[rr * kStepFT + fl] : 0.f;
#pragma unroll
        for (int u = 0; u < 4; ++u) num[u] += pq * sreg[ps][u];
        den += pq * zreg[ps];
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < 4; ++u) red[rg * (d + 1) + 4 * cg + u] = num[u];
      if (cg == 0) red[rg * (d + 1) + d] = den;
      __syncthreads();
      for (int c = tid; c <= d; c += blockDim.x) {
        float s = 0.f;
        for (int g2 = 0; g2 < RP; ++g2) s += red[g2 * (d + 1) + c];
        p.part[(((tok * p.hq) + h * r + rr) * p.nft + blockIdx.x) * (d + 1) + c] = s;
      }
    }
  }
}

template <int d, typename T>
__global__ void step_reduce_kernel(const float* part, int nft, T* y) {
  __shared__ float den;
  const int64_t row = blockIdx.x;  // (b, t, hq) flattened
  const float* pr = part + row * nft * (d + 1);
  const int c = threadIdx.x;
  float s = 0.f;
  if (c <= d)
    for (int i = 0; i < nft; ++i) s += pr[i * (d + 1) + c];
  if (c == d) den = s;
  __syncthreads();
  if (c < d) y[row * d + c] = static_cast<T>(s / den);
}

}  // namespace pr
}  // namespace llmtrain
