// Memory-bound helper kernels for the fast (sm_90a GEMM) path of RMSNorm + Linear, 16-bit dtypes,
// hidden sizes that are multiples of 8 (16-byte vectors).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rmsnorm_linear_common.cuh"

namespace llmtrain {
namespace rmslin {
namespace fast {

template <typename T> __device__ __forceinline__ void load8(const T* p, float f[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = to_f(h[j]);
}
template <typename T> __device__ __forceinline__ void load8_nc(const T* p, float f[8]) {  // may alias a write
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = to_f(h[j]);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float f[8]) {
  uint4 u;
  T* h = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = from_f<T>(f[j]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Programmatic dependent launch (sm_90+): a kernel launched with the PDL attribute may start while
// its predecessor on the stream is still finishing, so it must wait here before its first global
// memory access (read or write). griddepcontrol.wait is a no-op for a kernel launched without the
// attribute, and the instructions do not exist before sm_90 (the sm_80 path never launches with PDL).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Lets the next PDL-launched kernel get its blocks resident (they then wait in pdl_wait) as soon as
// this grid's blocks are all running; only a scheduling hint, never a correctness condition.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Forward pre-pass (session 7), one launch, a warp per "row task": tasks [0, n) are rows of x (sum of
// squares -> rstd), tasks [n, n + m) rows of W (wg = W diag(g)). Both kinds are k long, so the
// grid-stride walk over n + m tasks balances the two jobs over every warp (the older prep_fwd gave
// them separate blocks, and the W blocks only started once the x blocks drained). Each lane issues
// its J 16-byte loads of a 32 J-chunk pass before using any (J = 8 at k = 2048: the whole 4 KB row in
// flight per warp), so the pass is bandwidth- not latency-bound. rstd sums each lane's chunks in the
// same order as prep_fwd (c8 = lane, lane + 32, ...) then the same shuffle tree: same bits.
template <typename T, int J>
__global__ void __launch_bounds__(256) prep_fwd_rows(const T* __restrict__ x, const T* __restrict__ g,
                                                     const T* __restrict__ w, float* __restrict__ rstd,
                                                     T* __restrict__ wg, int64_t n, int64_t k, int64_t m, float eps) {
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int64_t k8 = k / 8;
  const int64_t nw = (int64_t)gridDim.x * 8;
  const uint4* g4 = reinterpret_cast<const uint4*>(g);
  for (int64_t t = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5); t < n + m; t += nw) {
    if (t < n) {  // warp-uniform
      const uint4* src = reinterpret_cast<const uint4*>(x + t * k);
      float ss = 0.f;
      for (int64_t c0 = 0; c0 < k8; c0 += 32 * J) {
        uint4 v[J];
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c8 = c0 + lane + 32 * j;
          v[j] = c8 < k8 ? __ldg(src + c8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const T* h = reinterpret_cast<const T*>(&v[j]);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float f = to_f(h[e]);
            ss = fmaf(f, f, ss);
          }
        }
      }
      ss = warp_sum(ss);
      if (lane == 0) rstd[t] = 1.f / sqrtf(ss / (float)k + eps);
    } else {
      const uint4* src = reinterpret_cast<const uint4*>(w + (t - n) * k);
      uint4* dst = reinterpret_cast<uint4*>(wg + (t - n) * k);
      for (int64_t c0 = 0; c0 < k8; c0 += 32 * J) {
        uint4 v[J], gv[J];
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c8 = c0 + lane + 32 * j;
          if (c8 < k8) {
            v[j] = __ldg(src + c8);
            gv[j] = __ldg(g4 + c8);
          }
        }
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c8 = c0 + lane + 32 * j;
          if (c8 >= k8) continue;
          const T* a = reinterpret_cast<const T*>(&v[j]);
          const T* b = reinterpret_cast<const T*>(&gv[j]);
          float f[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) f[e] = to_f(a[e]) * to_f(b[e]);
          store8(reinterpret_cast<T*>(dst + c8), f);
        }
      }
    }
  }
}

// Forward pre-pass, one launch: blocks [0, row_blocks) write rstd (a warp per row); the rest write
// wg = W diag(g) (16-byte chunks, grid-stride).
template <typename T>
__global__ void __launch_bounds__(256) prep_fwd(const T* __restrict__ x, const T* __restrict__ g,
                                                const T* __restrict__ w, float* __restrict__ rstd,
                                                T* __restrict__ wg, int64_t n, int64_t k, int64_t m, float eps,
                                                int row_blocks) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k8 = k / 8;
  if ((int)blockIdx.x < row_blocks) {
    for (int64_t row = (int64_t)blockIdx.x * 8 + warp; row < n; row += (int64_t)row_blocks * 8) {
      const T* xr = x + row * k;
      float ss = 0.f;
      for (int64_t c = lane; c < k8; c += 32) {
        float f[8];
        load8(xr + c * 8, f);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss = fmaf(f[j], f[j], ss);
      }
      ss = warp_sum(ss);
      if (lane == 0) rstd[row] = 1.f / sqrtf(ss / (float)k + eps);
    }
  } else {
    const int64_t total = m * k8;
    const int64_t stride = (int64_t)(gridDim.x - row_blocks) * blockDim.x;
    for (int64_t e = (int64_t)(blockIdx.x - row_blocks) * blockDim.x + threadIdx.x; e < total; e += stride) {
      const int64_t c = (e % k8) * 8;
      float a[8], b[8];
      load8(w + e * 8, a);
      load8(g + c, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] *= b[j];
      store8(wg + e * 8, a);
    }
  }
}

// Forward pre-pass of the portable tensor-core path: rstd and xn = rstd x g (a warp per row; the
// second read of the row comes from L1/L2), so the GEMM is a plain y = xn W^T + bias.
template <typename T>
__global__ void __launch_bounds__(256) prep_xn(const T* __restrict__ x, const T* __restrict__ g,
                                               float* __restrict__ rstd, T* __restrict__ xn, int64_t n, int64_t k,
                                               float eps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k8 = k / 8;
  for (int64_t row = (int64_t)blockIdx.x * 8 + warp; row < n; row += (int64_t)gridDim.x * 8) {
    const T* xr = x + row * k;
    float ss = 0.f;
    for (int64_t c = lane; c < k8; c += 32) {
      float f[8];
      load8(xr + c * 8, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss = fmaf(f[j], f[j], ss);
    }
    ss = warp_sum(ss);
    const float r = 1.f / sqrtf(ss / (float)k + eps);
    if (lane == 0) rstd[row] = r;
    for (int64_t c = lane; c < k8; c += 32) {
      float f[8], gv[8];
      load8(xr + c * 8, f);
      load8(g + c * 8, gv);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] *= r * gv[j];
      store8(xn + row * k + c * 8, f);
    }
  }
}

// ---- deterministic column sums of per-block partials part[nb, cols] (fp32) into out (T) ----
// Order, for every column: 8 interleaved slices of the nb rows (slice r: rows r, r + 8, ..., summed
// in increasing row order from 0.f), then slice 0 + slice 1 + ... + slice 7. The reduce_parts kernel
// and finish_parts (the last blocks of the grid that wrote part) both follow it: the same bits either
// way, and the same bits on every run (no atomics in the arithmetic).

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Called at the end by every block of a grid whose block b wrote part[b, 0:cols] (cols % 4 == 0,
// part 16-byte aligned). Each block takes a ticket; the last `fin` blocks to arrive wait until all
// nb = gridDim.x have (they only wait on blocks that are already running or about to: fin is kept
// well under the number of blocks the GPU holds at once), then finalizer s sums column quads
// [s per, (s + 1) per). This replaces a separate reduce_parts launch (5-9 us plus a launch gap at
// 2048 columns). The counter returns to 0 at the end (the last finalizer resets it), ready for the
// next kernel on the stream; each stream has its own counter (rmsnorm_linear.cu: ticket_for).
// blockDim.x must be 256.
template <typename T>
__device__ void finish_parts(const float* part, T* __restrict__ out, int64_t cols, unsigned* ticket, int fin) {
  __shared__ unsigned s_ticket;
  __shared__ float4 sl[8][32];
  __threadfence();  // this thread's part writes are visible device-wide before the block is counted
  __syncthreads();
  const unsigned nb = gridDim.x;
  if (threadIdx.x == 0) s_ticket = atomicAdd(ticket, 1u);
  __syncthreads();
  const unsigned t = s_ticket;
  if (t + (unsigned)fin < nb) return;  // not among the last fin arrivals (block-uniform)
  if (threadIdx.x == 0)
    while (ld_acquire_gpu(ticket) < nb) __nanosleep(32);
  __threadfence();
  __syncthreads();
  const int64_t nq = cols / 4;
  const int64_t per = (nq + fin - 1) / fin;
  const int64_t slice = (int64_t)t - (int64_t)(nb - (unsigned)fin);
  const int64_t lo = slice * per, hi = min(nq, lo + per);
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const float4* p4 = reinterpret_cast<const float4*>(part);
  for (int64_t q0 = lo; q0 < hi; q0 += 32) {
    const int64_t q = q0 + lx;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (q < hi) {
#pragma unroll 16
      for (int b = ly; b < (int)nb; b += 8) {
        const float4 v = __ldcg(p4 + (int64_t)b * nq + q);  // L2: written by other blocks
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
      }
    }
    sl[ly][lx] = acc;
    __syncthreads();
    if (ly == 0 && q < hi) {
#pragma unroll
      for (int r = 1; r < 8; ++r) {
        acc.x += sl[r][lx].x;
        acc.y += sl[r][lx].y;
        acc.z += sl[r][lx].z;
        acc.w += sl[r][lx].w;
      }
      out[q * 4 + 0] = from_f<T>(acc.x);
      out[q * 4 + 1] = from_f<T>(acc.y);
      out[q * 4 + 2] = from_f<T>(acc.z);
      out[q * 4 + 3] = from_f<T>(acc.w);
    }
    __syncthreads();
  }
  // Every finalizer has seen the count reach nb before adding its second increment, so the last of
  // those (count nb + fin - 1) can reset it without stranding a waiter.
  if (threadIdx.x == 0 && atomicAdd(ticket, 1u) == nb + (unsigned)fin - 1) atomicExch(ticket, 0u);
}

// Backward row pass. dx holds dxn = dy W on entry (from the dgrad GEMM) and is overwritten row by
// row (each warp reads its whole row before writing it):
//   proj_i = sum_c dxn_ic g_c x_ic;  dx_i = r_i g dxn_i - r_i^3 / k proj_i x_i;  xn_i = r_i g x_i
// and per-block partial sums of dg_c = sum_i dxn_ic x_ic r_i go to part[blockIdx.x, :] (fp32).
template <typename T>
__global__ void __launch_bounds__(512) row_bwd(const T* __restrict__ x, const T* __restrict__ g,
                                               const float* __restrict__ rstd, T* dx, T* __restrict__ xn,
                                               float* __restrict__ part, int64_t n, int64_t k) {
  extern __shared__ float dgs[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = blockDim.x >> 5;
  const int64_t k8 = k / 8;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) dgs[c] = 0.f;
  __syncthreads();
  for (int64_t row = (int64_t)blockIdx.x * nwarp + warp; row < n; row += (int64_t)gridDim.x * nwarp) {
    const T* xr = x + row * k;
    T* dr = dx + row * k;
    float p = 0.f;
    for (int64_t c = lane; c < k8; c += 32) {
      float d[8], xv[8], gv[8];
      load8_nc(dr + c * 8, d);
      load8(xr + c * 8, xv);
      load8(g + c * 8, gv);
#pragma unroll
      for (int j = 0; j < 8; ++j) p = fmaf(d[j] * gv[j], xv[j], p);
    }
    p = warp_sum(p);
    const float r = rstd[row];
    const float coef = r * r * r * p / (float)k;
    for (int64_t c = lane; c < k8; c += 32) {
      float d[8], xv[8], gv[8], o[8], q[8];
      load8_nc(dr + c * 8, d);
      load8(xr + c * 8, xv);
      load8(g + c * 8, gv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[j] = r * gv[j] * d[j] - coef * xv[j];
        q[j] = r * gv[j] * xv[j];
        // (shared-memory atomics: the order across warps varies, so v2's dg may differ in the last
        // bit between runs; the default v3 row pass sums in a fixed order)
        atomicAdd(&dgs[c * 8 + j], d[j] * xv[j] * r);
      }
      store8(dr + c * 8, o);
      store8(xn + row * k + c * 8, q);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) part[(int64_t)blockIdx.x * k + c] = dgs[c];
}

// v3 backward row pass (same outputs as row_bwd, one read of each input, no shared atomics).
// W warps share a row (W = 1 up to k = 2048, so the row sum is a warp shuffle), and thread tr of
// the row group owns the 16-byte column chunks c8 = tr + 32 W j, j < J: its g chunks and its dg
// partial sums (fp32) stay in registers for every row the block visits, the row's dxn and x chunks
// are loaded once into registers, and the dg partials meet in shared memory only once per block,
// in a fixed warp order (deterministic). dx may alias nothing but is read before it is written by
// the same thread.
// Session 7: launched with PDL on the sm_90a path (waits for the dgrad GEMM here), and with a
// ticket the last blocks also turn the partials into dg (finish_parts) instead of a reduce_parts launch.
template <typename T, int W, int J>
__global__ void __launch_bounds__(256) row_bwd_v3(const T* __restrict__ x, const T* __restrict__ g,
                                                  const float* __restrict__ rstd, T* dx, T* __restrict__ xn,
                                                  float* __restrict__ part, int64_t n, int64_t k,
                                                  T* __restrict__ dg, unsigned* ticket, int fin) {
  static_assert(8 % W == 0, "block of 8 warps");
  pdl_wait();
  pdl_launch_dependents();
  constexpr int R = 8 / W, TPR = 32 * W;
  extern __shared__ float red[];  // [k] block dg sums, then [2][8] row-sum partials (W > 1)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = warp / W, tr = (warp % W) * 32 + lane;
  const int64_t k8 = k / 8;
  float* pw = red + k;
  uint4 gv[J];
  float acc[J][8];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t c8 = tr + (int64_t)TPR * j;
    gv[j] = c8 < k8 ? __ldg(reinterpret_cast<const uint4*>(g) + c8) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
  }
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) red[c] = 0.f;
  int it = 0;
  for (int64_t base = (int64_t)blockIdx.x * R; base < n; base += (int64_t)gridDim.x * R, ++it) {
    const int64_t row = base + grp;
    const bool ok = row < n;
    uint4 dv[J], xv[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t c8 = tr + (int64_t)TPR * j;
      if (ok && c8 < k8) {
        dv[j] = *reinterpret_cast<const uint4*>(dx + row * k + c8 * 8);
        xv[j] = __ldg(reinterpret_cast<const uint4*>(x + row * k + c8 * 8));
      } else {
        dv[j] = make_uint4(0, 0, 0, 0);
        xv[j] = make_uint4(0, 0, 0, 0);
      }
    }
    float p = 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const T* d = reinterpret_cast<const T*>(&dv[j]);
      const T* xx = reinterpret_cast<const T*>(&xv[j]);
      const T* gg = reinterpret_cast<const T*>(&gv[j]);
#pragma unroll
      for (int e = 0; e < 8; ++e) p = fmaf(to_f(d[e]) * to_f(gg[e]), to_f(xx[e]), p);
    }
    p = warp_sum(p);
    if constexpr (W > 1) {
      // Double-buffered by iteration parity: one barrier per iteration suffices.
      float* buf = pw + (it & 1) * 8;
      if (lane == 0) buf[warp] = p;
      __syncthreads();
      p = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) p += buf[grp * W + w];
    }
    if (ok) {
      const float r = rstd[row];
      const float coef = r * r * r * p / (float)k;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t c8 = tr + (int64_t)TPR * j;
        if (c8 >= k8) continue;
        const T* d = reinterpret_cast<const T*>(&dv[j]);
        const T* xx = reinterpret_cast<const T*>(&xv[j]);
        const T* gg = reinterpret_cast<const T*>(&gv[j]);
        float o[8], q[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float df = to_f(d[e]), xf = to_f(xx[e]), rg = r * to_f(gg[e]);
          o[e] = rg * df - coef * xf;
          q[e] = rg * xf;
          acc[j][e] = fmaf(df * xf, r, acc[j][e]);
        }
        store8(dx + row * k + c8 * 8, o);
        store8(xn + row * k + c8 * 8, q);
      }
    }
  }
  // Block sum of the dg partials, warp by warp (fixed order).
  for (int w = 0; w < 8; ++w) {
    __syncthreads();
    if (warp == w) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t c8 = tr + (int64_t)TPR * j;
        if (c8 < k8)
#pragma unroll
          for (int e = 0; e < 8; ++e) red[c8 * 8 + e] += acc[j][e];
      }
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) part[(int64_t)blockIdx.x * k + c] = red[c];
  if (ticket) finish_parts<T>(part, dg, k, ticket, fin);
}

// ---- Session 8 row kernels (default; LLMTRAIN_RMSLIN_ROWS=s7 selects the two above) ----
// Both kernels are memory-bound; Little's law at ~3 TB/s and ~1 us of loaded DRAM latency asks for
// ~23 KB of loads in flight per SM (132 SMs). The session-7 kernels kept too few warps per SM with
// loads in flight, and each warp idled between its rows (loads only after the previous row's shuffles
// and stores, and the row pass's rstd load after the row sum: a second dependent round trip per row).

// Named barrier over `threads` threads (a multiple of 32) of the block; id 0 is __syncthreads'.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Forward pre-pass, session 8: rstd and wg = W diag(g) in one launch, a non-persistent grid.
// Blocks [0, w_blocks) come first (the block scheduler starts them first): warp i of block b turns
// row 8 b + i of W into wg (J chunks of W and of g per lane and pass). The remaining blocks are rows
// of x: each warp owns RX consecutive rows and issues all RX x J of its 16-byte loads before using
// any (RX J = 16 at k = 1024 and 2048: 8 KB in flight per warp, 24 warps per SM at 3 blocks per SM), so a
// warp never idles between rows and the hardware's block scheduler balances the tail (the session-7
// persistent walk ran 8.7 rows of x or W per warp with one row in flight, the W rows last).
// rstd sums each lane's chunks in the same order as prep_fwd_rows (pass, then chunk j, then element)
// and the same shuffle tree: the same bits. wg is elementwise: the same bits. MULTI: rows longer
// than one pass of 32 J chunks (k > 2048 at J = 8).
template <typename T, int J, int RX, bool MULTI>
__global__ void __launch_bounds__(256, MULTI ? 2 : 3) prep_fwd_s8(const T* __restrict__ x, const T* __restrict__ g,
                                                      const T* __restrict__ w, float* __restrict__ rstd,
                                                      T* __restrict__ wg, int64_t n, int64_t k, int64_t m, float eps,
                                                      int w_blocks) {
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k8 = k / 8;
  if ((int)blockIdx.x < w_blocks) {
    const int64_t row = (int64_t)blockIdx.x * 8 + warp;
    if (row >= m) return;
    const uint4* src = reinterpret_cast<const uint4*>(w + row * k);
    const uint4* g4 = reinterpret_cast<const uint4*>(g);
    uint4* dst = reinterpret_cast<uint4*>(wg + row * k);
    for (int64_t c0 = 0; c0 < k8; c0 += 32 * J) {
      uint4 v[J], gv[J];
      if (c0 + 32 * J <= k8) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
          v[j] = __ldg(src + c0 + lane + 32 * j);
          gv[j] = __ldg(g4 + c0 + lane + 32 * j);
        }
      } else {
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c8 = c0 + lane + 32 * j;
          if (c8 < k8) {
            v[j] = __ldg(src + c8);
            gv[j] = __ldg(g4 + c8);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t c8 = c0 + lane + 32 * j;
        if (c8 >= k8) continue;
        const T* a = reinterpret_cast<const T*>(&v[j]);
        const T* b = reinterpret_cast<const T*>(&gv[j]);
        float f[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = to_f(a[e]) * to_f(b[e]);
        store8(reinterpret_cast<T*>(dst + c8), f);
      }
    }
    return;
  }
  const int64_t row0 = ((int64_t)(blockIdx.x - w_blocks) * 8 + warp) * RX;
  if (row0 >= n) return;
  float ss[RX];
#pragma unroll
  for (int r = 0; r < RX; ++r) ss[r] = 0.f;
  // MULTI = false: the row fits one pass (k8 <= 32 J; a loop-carried ss made ptxas spill at J = 8).
  for (int64_t c0 = 0; MULTI ? c0 < k8 : c0 == 0; c0 += 32 * J) {
    uint4 v[RX][J];
    const uint4* src = reinterpret_cast<const uint4*>(x + row0 * k) + c0 + lane;
    if (row0 + RX <= n && c0 + 32 * J <= k8) {
      // Unpredicated: ptxas then issues all RX J loads before the first use (with per-load
      // predicates it started the sums after 3/4 of them, waiting on the first with the rest unissued).
#pragma unroll
      for (int r = 0; r < RX; ++r)
#pragma unroll
        for (int j = 0; j < J; ++j) v[r][j] = __ldg(src + r * k8 + 32 * j);
    } else {
#pragma unroll
      for (int r = 0; r < RX; ++r) {
        const bool ok = row0 + r < n;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c8 = c0 + lane + 32 * j;
          v[r][j] = ok && c8 < k8 ? __ldg(src + r * k8 + 32 * j) : make_uint4(0, 0, 0, 0);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RX; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const T* h = reinterpret_cast<const T*>(&v[r][j]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float f = to_f(h[e]);
          ss[r] = fmaf(f, f, ss[r]);
        }
      }
  }
#pragma unroll
  for (int r = 0; r < RX; ++r) ss[r] = warp_sum(ss[r]);
  if (lane < RX && row0 + lane < n) {
    float s = ss[0];
#pragma unroll
    for (int r = 1; r < RX; ++r)
      if (lane == r) s = ss[r];
    rstd[row0 + lane] = 1.f / sqrtf(s / (float)k + eps);
  }
}

// Backward row pass, session 8: the v3 arithmetic (same per-element float expressions, same dg
// summation order) with the dg partial sums in shared memory instead of registers, so a block of 8
// warps needs ~100 registers per thread instead of 255 and two blocks share an SM (16 warps, each
// with its row's 2 x J 16-byte loads in flight: 128 KB per SM at k = 2048, against 64 KB in v3).
// Each row group (W warps, one row at a time) owns a private slice of the partials, laid out
// [group][chunk j][half h][thread] as float4 (conflict-free 16-byte accesses); g is staged in shared
// memory once per block; rstd[row] is loaded together with the row (v3 loaded it after the row sum:
// a second dependent global round trip per row). At the end the slices are added in group order
// (= v3's warp order, from 0.f), so with the same grid dg has v3's bits. W > 1 (k > 2048): the
// row's W warps exchange their partial row sums through a named barrier of the group only (v3: a
// __syncthreads of the whole block every row). Dynamic shared memory: row_bwd_s8_smem(k, W).
// PF (opt-in, LLMTRAIN_RMSLIN_PREFETCH=1; sm_90): after issuing its row's loads, the row group asks
// L2 for the group's next row (cp.async.bulk.prefetch, 4 KB pieces of x and dx), so each warp has
// a second row on the way without registers for it. A hint only: results are the same bits.
template <typename T, int W, int J, bool PF>
__global__ void __launch_bounds__(256, J >= 8 ? 2 : J >= 4 ? 3 : 4)
    row_bwd_s8(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ rstd, T* dx,
               T* __restrict__ xn, float* __restrict__ part, int64_t n, int64_t k, T* __restrict__ dg,
               unsigned* ticket, int fin) {
  static_assert(8 % W == 0, "block of 8 warps");
  pdl_wait();
  pdl_launch_dependents();
  constexpr int R = 8 / W, TPR = 32 * W;
  extern __shared__ float4 sm4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = warp / W, tr = (warp % W) * 32 + lane;
  const int64_t k8 = k / 8;
  const int jn = (int)((k8 + TPR - 1) / TPR);  // chunks per thread in use (<= J)
  const int slice = jn * 2 * TPR;              // float4 per group
  float4* acc4 = sm4;
  uint4* gs = reinterpret_cast<uint4*>(sm4 + (size_t)R * slice);
  float* pw = reinterpret_cast<float*>(gs + k8);  // [2][8] row-sum partials (W > 1)
  float4* my = acc4 + (size_t)grp * slice + tr;   // my[(2 j + h) TPR]
  for (int i = threadIdx.x; i < R * slice; i += blockDim.x) acc4[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t c8 = threadIdx.x; c8 < k8; c8 += blockDim.x) gs[c8] = __ldg(reinterpret_cast<const uint4*>(g) + c8);
  __syncthreads();
  int it = 0;
  const int64_t stride = (int64_t)gridDim.x * R;
  // rstd of the next row is loaded one row ahead (the compiler may sink a load of this row's below
  // the row sum; one row ahead it always has a whole row of time).
  float r_next = (int64_t)blockIdx.x * R + grp < n ? __ldg(rstd + (int64_t)blockIdx.x * R + grp) : 0.f;
  for (int64_t base = (int64_t)blockIdx.x * R; base < n; base += stride, ++it) {
    const int64_t row = base + grp;
    const bool ok = row < n;
    const float r = r_next;
    r_next = row + stride < n ? __ldg(rstd + row + stride) : 0.f;
    const uint4* dr = reinterpret_cast<const uint4*>(dx + row * k) + tr;
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * k) + tr;
    uint4 dv[J], xv[J];
    if (ok && k8 >= (int64_t)TPR * J) {  // every chunk in range: unpredicated loads, all issued first
#pragma unroll
      for (int j = 0; j < J; ++j) {
        dv[j] = dr[TPR * j];
        xv[j] = __ldg(xr + TPR * j);
      }
    } else {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if (ok && tr + TPR * j < k8) {
          dv[j] = dr[TPR * j];
          xv[j] = __ldg(xr + TPR * j);
        } else {
          dv[j] = make_uint4(0, 0, 0, 0);
          xv[j] = make_uint4(0, 0, 0, 0);
        }
      }
    }
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    if constexpr (PF) {
      const int64_t nrow = row + stride;
      if (nrow < n) {
        const int64_t bytes = k * (int64_t)sizeof(T);
        const int pieces = (int)((bytes + 4095) / 4096);
        for (int pc = tr; pc < 2 * pieces; pc += TPR) {
          const int64_t off = (int64_t)(pc % pieces) * 4096;
          const unsigned sz = (unsigned)min((int64_t)4096, bytes - off);
          const char* src = reinterpret_cast<const char*>(pc < pieces ? x : dx) + nrow * bytes + off;
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(sz) : "memory");
        }
      }
    }
#endif
    float p = 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t c8 = tr + (int64_t)TPR * j;
      const uint4 gq = c8 < k8 ? gs[c8] : make_uint4(0, 0, 0, 0);
      const T* d = reinterpret_cast<const T*>(&dv[j]);
      const T* xx = reinterpret_cast<const T*>(&xv[j]);
      const T* gg = reinterpret_cast<const T*>(&gq);
#pragma unroll
      for (int e = 0; e < 8; ++e) p = fmaf(to_f(d[e]) * to_f(gg[e]), to_f(xx[e]), p);
    }
    p = warp_sum(p);
    if constexpr (W > 1) {
      // Double-buffered by iteration parity: one group barrier per row suffices.
      float* buf = pw + (it & 1) * 8;
      if (lane == 0) buf[warp] = p;
      bar_sync(1 + grp, TPR);
      p = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) p += buf[grp * W + w];
    }
    if (ok) {
      const float coef = r * r * r * p / (float)k;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t c8 = tr + (int64_t)TPR * j;
        if (c8 >= k8) continue;
        const uint4 gq = gs[c8];
        const T* d = reinterpret_cast<const T*>(&dv[j]);
        const T* xx = reinterpret_cast<const T*>(&xv[j]);
        const T* gg = reinterpret_cast<const T*>(&gq);
        float o[8], q[8], a[8];
        const float4 a0 = my[(2 * j) * TPR], a1 = my[(2 * j + 1) * TPR];
        a[0] = a0.x; a[1] = a0.y; a[2] = a0.z; a[3] = a0.w;
        a[4] = a1.x; a[5] = a1.y; a[6] = a1.z; a[7] = a1.w;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float df = to_f(d[e]), xf = to_f(xx[e]), rg = r * to_f(gg[e]);
          o[e] = rg * df - coef * xf;
          q[e] = rg * xf;
          a[e] = fmaf(df * xf, r, a[e]);
        }
        my[(2 * j) * TPR] = make_float4(a[0], a[1], a[2], a[3]);
        my[(2 * j + 1) * TPR] = make_float4(a[4], a[5], a[6], a[7]);
        store8(dx + row * k + c8 * 8, o);
        store8(xn + row * k + c8 * 8, q);
      }
    }
  }
  // Block sum of the group slices in group order from 0.f (v3: warp order), one float4 of part per step.
  __syncthreads();
  float4* part4 = reinterpret_cast<float4*>(part + (int64_t)blockIdx.x * k);
  for (int64_t qi = threadIdx.x; qi < 2 * k8; qi += blockDim.x) {
    const int64_t c8 = qi >> 1;
    const int h = (int)(qi & 1), t = (int)(c8 % TPR), j = (int)(c8 / TPR);
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int gi = 0; gi < R; ++gi) {
      const float4 v = acc4[(size_t)gi * slice + (2 * j + h) * TPR + t];
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    part4[qi] = s;
  }
  if (ticket) finish_parts<T>(part, dg, k, ticket, fin);
}
inline size_t row_bwd_s8_smem(int64_t k, int w) {
  const int64_t k8 = k / 8, tpr = 32 * w, jn = (k8 + tpr - 1) / tpr;
  return (size_t)(8 / w) * (size_t)jn * 2 * (size_t)tpr * 16 + (size_t)k8 * 16 + 16 * sizeof(float);
}

// Column partial sums of a row-major [n, cols] matrix: part[b, c] = sum over block b's rows.
// With a ticket, the last blocks also write out = the column sums (finish_parts).
template <typename T>
__global__ void __launch_bounds__(256) colsum_part(const T* __restrict__ a, float* __restrict__ part, int64_t n,
                                                   int64_t cols, T* __restrict__ out, unsigned* ticket, int fin) {
  pdl_wait();
  const int64_t c8n = cols / 8;
  const int64_t rows_per = (n + gridDim.x - 1) / gridDim.x;
  const int64_t r0 = (int64_t)blockIdx.x * rows_per, r1 = min(n, r0 + rows_per);
  for (int64_t c8 = threadIdx.x; c8 < c8n; c8 += blockDim.x) {
    float s[8] = {};
    for (int64_t i = r0; i < r1; ++i) {
      float f[8];
      load8(a + i * cols + c8 * 8, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j] += f[j];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) part[(int64_t)blockIdx.x * cols + c8 * 8 + j] = s[j];
  }
  if (ticket) finish_parts<T>(part, out, cols, ticket, fin);
}

// out[c] = sum_b part[b, c], in T, in finish_parts' order. Block (32, 8): 32 columns, 8 interleaved
// slices of the nb parts, then the 8 slice sums in a fixed order: deterministic, and 8x the
// parallelism of a thread per column (nb = 2 x SMs parts of 2048 columns took 7 us that way, 5 us
// this way; from branch rmslin-v4-experiment). The fallback when no ticket counter is available.
template <typename T>
__global__ void __launch_bounds__(256) reduce_parts(const float* __restrict__ part, T* __restrict__ out, int nb,
                                                    int64_t cols) {
  __shared__ float sl[8][33];
  pdl_wait();
  const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < cols)
    for (int b = threadIdx.y; b < nb; b += 8) s += __ldcg(part + (int64_t)b * cols + c);
  sl[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
#pragma unroll
    for (int r = 1; r < 8; ++r) s += sl[r][threadIdx.x];
    out[c] = from_f<T>(s);
  }
}
inline unsigned reduce_parts_blocks(int64_t cols) { return (unsigned)((cols + 31) / 32); }

}  // namespace fast
}  // namespace rmslin
}  // namespace llmtrain
