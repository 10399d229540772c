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
