// v4 per-chunk state contribution ("LOCAL" scan) of the CUDA power retention.
//
// Same result as state_scan_kernel<d, T, REV, LOCAL = true> (power_retention_kernels.cuh), bit for
// bit: the same bf16 operands go through the same mma.sync k-steps in the same order. What changes
// is the work split. v2/v3 launch one block per (128 features, chunk, b*hk), so each chunk's k/v
// (reverse: q/ghat) are loaded and transposed 17 times at d = 64, with scalar, 8-way bank-conflicted
// shared-memory stores and one barrier per 8 k-steps. Here one block per (chunk, b*hk, feature
// group) stages the chunk's K = nsrc * Cp token rows once (x transposed, yhat as is), then every
// warp walks 32-row feature tiles on its own (no barriers after the staging; two m16 tiles per warp
// so each B fragment read from shared memory feeds two MMAs).
//
//   forward (REV = false): delta_n = sum_j e^{Gt-g_j} phi(k_j) [v_j, 1]^T   -> slot n + 1
//   reverse (REV = true):  L_n = sum_{src, i} s^2 e^{g_i} phi(q_src,i) ghat_src,i^T -> slot n - 1
// and the chunk that ends the walk (forward N - 1, reverse 0) to fbuf in fp32, plus gtot[n] = Gt.
//
// v20: the kernel is templated on KMAX, the token rows one block stages (and its thread count):
// KMAX = 256 (8 warps, 2 blocks per SM; v4 .. v18, and v20 up to nsrc * C = 256) and KMAX = 512
// (16 warps, one block per SM, 143,376 bytes of shared memory at d = 64; v20 for
// 256 < nsrc * C <= 512: chunk 384 / 512, or the reverse scan of chunk 256 under GQA 2:1 and of
// chunk 128 under 4:1). Why: at chunk 512 the LOCAL scan fell back to state_scan_kernel<LOCAL>
// (restages each chunk once per 128 features): on an H100 at t = 65536, b = 1, 8 heads, d = 64,
// fwd+bwd, 1.51 + 1.47 ms, against 0.59 ms each for this kernel at chunk 256; that ate chunk 512's
// gain on state_prefix_kernel (0.31 + 0.21 ms vs 0.63 + 0.43) and more. Measured (session 17): the
// 512-row block takes 0.61 ms each way at chunk 512, and chunk 512 is 0.20 / 0.27 ms faster than chunk
// 256 at 8K / 64K (docs/perf.md, "v20 and v21").
// Both variants run the same k-steps on the same bf16 operands in the same order per feature row
// (only the work split differs), so they agree bit for bit with each other and with the fallback.
// Both cap registers at 128 per thread.
#pragma once

#include "power_retention_kernels.cuh"

namespace llmtrain {
namespace pr {

constexpr int kLocalK = 256;     // token rows (nsrc * Cp) staged per block: v4's variant (8 warps)
constexpr int kLocalK512 = 512;  // v20's wide variant (16 warps, one block per SM)
constexpr int kLocalRows = 32;   // feature rows per warp tile (two m16 tiles)

// Can a block of capacity kmax stage this chunk in one go? (Otherwise the v2/v3 kernel runs.)
__host__ __device__ constexpr bool local_fits(int d, int nsrc, int C, int kmax = kLocalK) {
  return d <= 64 && nsrc * C <= kmax;
}

// Dynamic shared memory of state_local_kernel<d, .., .., KMAX>: XT [d + 1][KMAX + 8] bf16,
// Ys [KMAX][E] bf16, gs [KMAX] fp32 (d = 64: 72,208 bytes at 256, 143,376 at 512).
template <int d, int KMAX = kLocalK> constexpr size_t local_smem() {
  return (size_t)(d + 1) * (KMAX + 8) * 2 + (size_t)KMAX * Cfg<d>::E * 2 + (size_t)KMAX * 4;
}

// Row a of canonical feature f (row_start(a) <= f < row_start(a + 1)): the quadratic formula, then
// an exact fix-up for float rounding.
template <int d>
__device__ __forceinline__ int feature_row(int f) {
  const float m = 2.f * d + 1.f;
  int a = (int)((m - sqrtf(fmaxf(m * m - 8.f * (float)f, 0.f))) * 0.5f);
  a = max(0, min(a, d - 1));
  while (a > 0 && row_start(a, d) > f) --a;
  while (a + 1 < d && row_start(a + 1, d) <= f) ++a;
  return a;
}

// Launched with KMAX threads (one per staged token row): 256 -> 8 warps, 2 blocks per SM;
// 512 -> 16 warps, 1 block per SM. Either way at most 128 registers per thread.
template <int d, typename T, bool REV, int KMAX = kLocalK>
__global__ void __launch_bounds__(KMAX, KMAX <= 256 ? 2 : 1) state_local_kernel(const ScanArgs p) {
  static_assert(KMAX == 256 || KMAX == 512, "state_local_kernel stages 256 or 512 token rows");
  constexpr int D = Cfg<d>::D, E = Cfg<d>::E, NT = Cfg<d>::NT, XL = KMAX + 8;
  constexpr int NWT = (D + kLocalRows - 1) / kLocalRows;
  constexpr int NW = KMAX / 32;  // warps per block (the block has KMAX threads)
  static_assert(d % 16 == 0, "the staging reads 16 columns per thread");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* XT = reinterpret_cast<bf16*>(smem_raw);  // [d + 1][XL]: x transposed; row d zero
  bf16* Ys = XT + (d + 1) * XL;                  // [KMAX][E]: yhat, weighted
  float* gs = reinterpret_cast<float*>(Ys + KMAX * E);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int64_t wi = (int64_t)blockIdx.z * gridDim.y + blockIdx.y;
  if (wi >= p.nwork) return;
  const int64_t bh = wi / p.N, bi = bh / p.hk, h = bh % p.hk;
  const int n = (int)(wi % p.N);
  const int r = (int)(p.hq / p.hk), nsrc = REV ? r : 1;
  const int64_t cs = (int64_t)n * p.C;
  const int cnt = (int)min((int64_t)p.C, p.t - cs);
  const int cp = (cnt + 15) & ~15;  // token rows per source head, zero-padded to the k-step
  const int K = nsrc * cp;

  chunk_cumsum(gs, p.log_g ? p.log_g + (bi * p.t + cs) * p.hk + h : nullptr, p.hk, cnt);
  const float Gt = gs[cnt - 1];
  if (blockIdx.x == 0 && tid == 0) p.gtot[bh * p.N + n] = Gt;

  // Stage x^T: each thread takes two consecutive token rows and 16 columns and writes bf16 pairs,
  // so a warp's stores cover 32 consecutive words of one XT row (conflict-free).
  const T* X = static_cast<const T*>(p.x);
  for (int idx = tid; idx < (K / 2) * (d / 16); idx += blockDim.x) {
    const int kk = 2 * (idx % (K / 2)), c16 = (idx / (K / 2)) * 16;
    const int src = kk / cp, j = kk - src * cp;  // cp is even: both rows belong to one source
    float x0[16], x1[16];
#pragma unroll
    for (int u = 0; u < 16; ++u) x0[u] = x1[u] = 0.f;
    auto load16 = [&](int jr, float (&o)[16]) {
      const int64_t tok = bi * p.t + cs + jr;
      const T* sp = REV ? X + (tok * p.hq + h * r + src) * d + c16 : X + (tok * p.hk + h) * d + c16;
      float lo[8], hi[8];
      IO<T>::load8(sp, lo);
      IO<T>::load8(sp + 8, hi);
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        o[u] = lo[u];
        o[8 + u] = hi[u];
      }
    };
    if (j < cnt) load16(j, x0);
    if (j + 1 < cnt) load16(j + 1, x1);
#pragma unroll
    for (int u = 0; u < 16; ++u) *reinterpret_cast<uint32_t*>(XT + (c16 + u) * XL + kk) = pack_bf16(x0[u], x1[u]);
  }
  for (int j = tid; j < XL / 2; j += blockDim.x) reinterpret_cast<uint32_t*>(XT + d * XL)[j] = 0u;
  // Stage yhat (forward: e^{Gt-g_j} [v_j, 1, 0...]; reverse: s^2 e^{g_i} ghat_i), 8 columns per thread.
  for (int idx = tid; idx < K * (E / 8); idx += blockDim.x) {
    const int kk = idx / (E / 8), c8 = (idx % (E / 8)) * 8;
    const int src = kk / cp, j = kk - src * cp;
    float yv[8];
    yhat8<d, T, REV>(p, gs, Gt, bi, h, r, src, cs, j, cnt, c8, yv);
    st8_bf16(Ys + kk * E + c8, yv);
  }
  __syncthreads();

  const bool ends = REV ? n == 0 : n == p.N - 1;
  if (ends && !p.fbuf) return;
  bf16* slot = ends ? nullptr : p.ws + (bh * p.N + (REV ? n - 1 : n + 1)) * (int64_t)D * E;
  float* fdst = ends ? p.fbuf + bh * (int64_t)D * E : nullptr;
  const int ksteps = K >> 4;
  const bf16* bp0 = Ys + ((lane & 7) + ((lane >> 3) & 1) * 8) * E + (lane >> 4) * 8;

  for (int wt = blockIdx.x * NW + warp; wt < NWT; wt += gridDim.x * NW) {
    const int fw = wt * kLocalRows;
    int fa[4], fb[4];
    float fwt[4];
    bool fv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // rows fw + g + 8 i: tile i / 2, fragment half i % 2
      const int f = fw + g + 8 * i;
      fv[i] = f < D;
      fa[i] = fb[i] = d;  // XT row d is zero: padded rows accumulate zeros
      fwt[i] = 0.f;
      if (fv[i]) {
        fa[i] = feature_row<d>(f);
        fb[i] = fa[i] + f - row_start(fa[i], d);
        fwt[i] = fa[i] == fb[i] ? 1.f : kSqrt2;
      }
    }
    float acc[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][nt][e] = 0.f;
    for (int ks = 0; ks < ksteps; ++ks) {
      const int jj = ks * 16 + 2 * tq;
      uint32_t A[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int i0 = 2 * m, i1 = 2 * m + 1;
        A[m][0] = hmul2_bf16(ld32(XT + fa[i0] * XL + jj), ld32(XT + fb[i0] * XL + jj));
        A[m][1] = hmul2_bf16(ld32(XT + fa[i1] * XL + jj), ld32(XT + fb[i1] * XL + jj));
        A[m][2] = hmul2_bf16(ld32(XT + fa[i0] * XL + jj + 8), ld32(XT + fb[i0] * XL + jj + 8));
        A[m][3] = hmul2_bf16(ld32(XT + fa[i1] * XL + jj + 8), ld32(XT + fb[i1] * XL + jj + 8));
      }
      const bf16* bp = bp0 + ks * 16 * E;
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldsm4t(b, bp + np * 16);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          mma(acc[m][2 * np], A[m], b[0], b[1]);
          mma(acc[m][2 * np + 1], A[m], b[2], b[3]);
        }
      }
      uint32_t b2[2];
      ldsm2t(b2, bp + (NT - 1) * 8);
#pragma unroll
      for (int m = 0; m < 2; ++m) mma(acc[m][NT - 1], A[m], b2[0], b2[1]);
    }
    // acc holds S / w (w = sqrt 2 off the diagonal): scale back on the way out.
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 2 * m + hf;
        if (!fv[i]) continue;
        const int64_t f = fw + g + 8 * i;
        if (fdst) {
          float* row = fdst + f * E + 2 * tq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            *reinterpret_cast<float2*>(row + nt * 8) =
                make_float2(acc[m][nt][2 * hf] * fwt[i], acc[m][nt][2 * hf + 1] * fwt[i]);
        } else {
          bf16* row = slot + f * E + 2 * tq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            *reinterpret_cast<uint32_t*>(row + nt * 8) =
                pack_bf16(acc[m][nt][2 * hf] * fwt[i], acc[m][nt][2 * hf + 1] * fwt[i]);
        }
      }
  }
}

}  // namespace pr
}  // namespace llmtrain
