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
template <typename T, int W, int J>
__global__ void __launch_bounds__(256) row_bwd_v3(const T* __restrict__ x, const T* __restrict__ g,
                                                  const float* __restrict__ rstd, T* dx, T* __restrict__ xn,
                                                  float* __restrict__ part, int64_t n, int64_t k) {
  static_assert(8 % W == 0, "block of 8 warps");
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
}

// Column partial sums of a row-major [n, cols] matrix: part[b, c] = sum over block b's rows.
template <typename T>
__global__ void __launch_bounds__(256) colsum_part(const T* __restrict__ a, float* __restrict__ part, int64_t n,
                                                   int64_t cols) {
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
}

// out[c] = sum_b part[b, c], in T.
template <typename T>
__global__ void reduce_parts(const float* __restrict__ part, T* __restrict__ out, int nb, int64_t cols) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.f;
  for (int b = 0; b < nb; ++b) s += part[(int64_t)b * cols + c];
  out[c] = from_f<T>(s);
}

}  // namespace fast
}  // namespace rmslin
}  // namespace llmtrain
