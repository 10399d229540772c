// Fused RMSNorm + Linear on CUDA: y = (x * rstd * g) W^T + bias, rstd = 1/sqrt(mean(x^2) + eps).
//
// Fast path (sm_90a build on a compute-capability 9.0 GPU, bf16/fp16, k and m multiples of 8):
//   forward:  one pre-pass writes rstd and wg = W diag(g) (workspace), then a TMA + wgmma GEMM on raw
//             x whose epilogue computes y = rstd[row] * acc + bias[col];
//   backward: dgrad GEMM dxn = dy W straight into dx, one row pass that turns dxn into dx, writes
//             xn = rstd x g (workspace) and per-block dg partials, then the wgrad GEMM dW = dy^T xn;
//             dbias and dg from deterministic two-level column sums.
// Portable path (any GPU, also fp32 and odd sizes): an rstd row reduction and SIMT tiled GEMMs with
// the row scale and bias in the epilogue; the backward runs dxn = dy W and dW = dy^T xn as tiled
// GEMMs and finishes dx, dg and dbias with row/column reductions.
// Accumulation is fp32 throughout. Workspaces are stream-ordered (cudaMallocAsync). Every launch runs on the caller's stream and every CUDA call is
// checked; failures become std::runtime_error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../ops.h"
#include "rmsnorm_linear_common.cuh"
#include "rmsnorm_linear_fast.cuh"
#include "rmsnorm_linear_sm80.cuh"
#include "rmsnorm_linear_sm90.cuh"

namespace llmtrain {
namespace rmslin {
namespace {

// ---- rstd: one block per row ----
template <typename T>
__global__ void rstd_kernel(const T* __restrict__ x, float* __restrict__ rstd, int64_t n, int64_t k, float eps) {
  const int64_t row = blockIdx.x;
  if (row >= n) return;
  const T* xr = x + row * k;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    const float v = to_f(xr[c]);
    ss += v * v;
  }
  ss = block_sum(ss);
  if (threadIdx.x == 0) rstd[row] = 1.f / sqrtf(ss / (float)k + eps);
}

// ---- SIMT tiled GEMM: C(i, j) = sum_l A(i, l) B(l, j), epilogue ep(i, j, acc) ----
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4, NT = 256;

template <class LA, class LB, class EP>
__global__ void __launch_bounds__(NT) gemm_simt(int64_t M, int64_t N, int64_t K, LA la, LB lb, EP ep) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  const int tid = threadIdx.x;
  const int64_t i0 = (int64_t)blockIdx.x * BM, j0 = (int64_t)blockIdx.y * BN;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);
  float acc[TM][TN] = {};
  for (int64_t l0 = 0; l0 < K; l0 += BK) {
#pragma unroll
    for (int r = 0; r < (BM * BK) / NT; ++r) {
      const int e = tid + r * NT;
      const int ii = e / BK, ll = e % BK;
      const int64_t i = i0 + ii, l = l0 + ll;
      As[ll][ii] = (i < M && l < K) ? la(i, l) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < (BN * BK) / NT; ++r) {
      const int e = tid + r * NT;
      const int jj = e / BK, ll = e % BK;
      const int64_t j = j0 + jj, l = l0 + ll;
      Bs[ll][jj] = (j < N && l < K) ? lb(l, j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int ll = 0; ll < BK; ++ll) {
      float a[TM], b[TN];
#pragma unroll
      for (int u = 0; u < TM; ++u) a[u] = As[ll][ty * TM + u];
#pragma unroll
      for (int v = 0; v < TN; ++v) b[v] = Bs[ll][tx * TN + v];
#pragma unroll
      for (int u = 0; u < TM; ++u)
#pragma unroll
        for (int v = 0; v < TN; ++v) acc[u][v] = fmaf(a[u], b[v], acc[u][v]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < TM; ++u)
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      const int64_t i = i0 + ty * TM + u, j = j0 + tx * TN + v;
      if (i < M && j < N) ep(i, j, acc[u][v]);
    }
}

template <class LA, class LB, class EP>
void launch_gemm(int64_t M, int64_t N, int64_t K, LA la, LB lb, EP ep, cudaStream_t s) {
  if (M <= 0 || N <= 0) return;
  const int64_t gy = (N + BN - 1) / BN;
  if (gy > 65535) throw std::runtime_error("rmsnorm_linear (CUDA): output dimension too large");
  dim3 grid((unsigned)((M + BM - 1) / BM), (unsigned)gy);
  gemm_simt<<<grid, NT, 0, s>>>(M, N, K, la, lb, ep);
  check_launch("gemm_simt");
}

// Column sums: out[c] = sum_i f(i, c) for c < cols, i < rows; written through store(c, value).
template <class F, class S>
__global__ void colsum_kernel(int64_t rows, int64_t cols, F f, S store) {
  __shared__ float part[8][33];
  const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < cols)
    for (int64_t i = threadIdx.y; i < rows; i += blockDim.y) s += f(i, c);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int r = 1; r < 8; ++r) s += part[r][threadIdx.x];
    if (c < cols) store(c, s);
  }
}

template <class F, class S>
void launch_colsum(int64_t rows, int64_t cols, F f, S store, cudaStream_t s) {
  if (cols <= 0) return;
  colsum_kernel<<<(unsigned)((cols + 31) / 32), dim3(32, 8), 0, s>>>(rows, cols, f, store);
  check_launch("colsum_kernel");
}

// dx from dxn (fp32): dx_i = r_i (dxn_i * g) - r_i^3 / k * x_i * sum_c(dxn_ic g_c x_ic). One block per row.
template <typename T>
__global__ void dx_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ rstd,
                          const float* __restrict__ dxn, T* __restrict__ dx, int64_t n, int64_t k) {
  const int64_t row = blockIdx.x;
  if (row >= n) return;
  const T* xr = x + row * k;
  const float* dr = dxn + row * k;
  float p = 0.f;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) p += dr[c] * to_f(g[c]) * to_f(xr[c]);
  p = block_sum(p);
  const float r = rstd[row];
  const float coef = r * r * r * p / (float)k;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x)
    dx[row * k + c] = from_f<T>(r * dr[c] * to_f(g[c]) - coef * to_f(xr[c]));
}

// Operand loaders and epilogues (functors: the build does not enable extended lambdas).
template <typename T> struct LoadXG {  // A(i, l) = x[i, l] g[l]
  const T *x, *g; int64_t k;
  __device__ float operator()(int64_t i, int64_t l) const { return to_f(x[i * k + l]) * to_f(g[l]); }
};
template <typename T> struct LoadRowMajorT {  // B(l, j) = p[j, l] with row length ld
  const T* p; int64_t ld;
  __device__ float operator()(int64_t l, int64_t j) const { return to_f(p[j * ld + l]); }
};
template <typename T> struct LoadRowMajor {  // A(i, l) = p[i, l] with row length ld
  const T* p; int64_t ld;
  __device__ float operator()(int64_t i, int64_t l) const { return to_f(p[i * ld + l]); }
};
template <typename T> struct LoadXn {  // B(i, c) = x[i, c] rstd[i] g[c]
  const T *x, *g; const float* rstd; int64_t k;
  __device__ float operator()(int64_t i, int64_t c) const { return to_f(x[i * k + c]) * rstd[i] * to_f(g[c]); }
};
template <typename T> struct EpFwd {
  const float* rstd; const T* bias; T* y; int64_t m;
  __device__ void operator()(int64_t i, int64_t j, float acc) const {
    float v = acc * rstd[i];
    if (bias) v += to_f(bias[j]);
    y[i * m + j] = from_f<T>(v);
  }
};
template <typename T> struct EpStore {
  T* p; int64_t ld;
  __device__ void operator()(int64_t i, int64_t j, float acc) const { p[i * ld + j] = from_f<T>(acc); }
};
struct Zero {
  __device__ float operator()(int64_t, int64_t) const { return 0.f; }
};
template <typename T> struct DgTerm {  // dxn[i, c] x[i, c] rstd[i]
  const float* dxn; const T* x; const float* rstd; int64_t k;
  __device__ float operator()(int64_t i, int64_t c) const { return dxn[i * k + c] * to_f(x[i * k + c]) * rstd[i]; }
};
template <typename T> struct StoreVec {
  T* p;
  __device__ void operator()(int64_t c, float v) const { p[c] = from_f<T>(v); }
};


// ---- fast path (16-bit, sm_90a GEMMs) ----
inline int num_sms() {
  static int cache[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) dev = 0;
  if (!cache[dev]) check(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return cache[dev];
}

// TMA and the 16-byte vector loads need 16-byte aligned bases (views into flat buffers may not be).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Kernel generations, read on every call so one process can A/B them.
// Default (measured on an H100, docs/perf.md 2026-11-23): the v2 forward (pre-pass + one GEMM: 215 us
// of kernels at 16384x2048->2048 against 272 us for the fused v3 one), the v3 backward
// (register-resident row pass: 102 us against 279 us) and the portable mma.sync GEMMs where the
// sm_90a ones cannot run (sm_80 / sm_86 / sm_89 / sm_120). LLMTRAIN_RMSLIN=v2 (or _LEGACY=1) gives
// the whole v2 path (SIMT GEMMs off sm_90a); LLMTRAIN_RMSLIN=v3 the fused one-GEMM forward too.
// LLMTRAIN_RMSLIN_FWD=v2|v3|ro and LLMTRAIN_RMSLIN_BWD=v2|v3 pick one side alone (ro: the fused
// forward's read-only variant, W diag(g) pre-pass, the GEMM mainloop only sums x^2).
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e && std::strcmp(e, value) == 0;
}
inline bool legacy() {
  const char* e = std::getenv("LLMTRAIN_RMSLIN_LEGACY");
  return (e && e[0] && e[0] != '0') || env_is("LLMTRAIN_RMSLIN", "v2");
}
inline bool v3_selected() { return !legacy() && env_is("LLMTRAIN_RMSLIN", "v3"); }
inline bool fused_read_only() { return !legacy() && env_is("LLMTRAIN_RMSLIN_FWD", "ro"); }
inline bool fwd_v2() {
  if (legacy() || env_is("LLMTRAIN_RMSLIN_FWD", "v2")) return true;
  if (env_is("LLMTRAIN_RMSLIN_FWD", "v3") || fused_read_only()) return false;
  return !v3_selected();
}
inline bool bwd_v2() {
  if (legacy() || env_is("LLMTRAIN_RMSLIN_BWD", "v2")) return true;
  return false;
}

template <typename T>
using RowBwdFn = void (*)(const T*, const T*, const float*, T*, T*, float*, int64_t, int64_t);
template <typename T> struct RowBwdV3 {
  RowBwdFn<T> fn = nullptr;
  int w = 1;
};
// W = 1 warp per row up to k = 2048 (J <= 8 chunks per lane, row sum by shuffles); beyond, W = 4 or 8
// warps with J = 4 (J = 8 with W > 1 spills at 255 registers); k > 8192 keeps the v2 kernel.
template <typename T> RowBwdV3<T> pick_row_bwd_v3(int64_t k) {
  const int64_t k8 = k / 8;
  if (k8 > 1024) return {};
  if (k8 > 512) return {fast::row_bwd_v3<T, 8, 4>, 8};
  if (k8 > 256) return {fast::row_bwd_v3<T, 4, 4>, 4};
  const int64_t j = (k8 + 31) / 32;
  if (j <= 1) return {fast::row_bwd_v3<T, 1, 1>, 1};
  if (j <= 2) return {fast::row_bwd_v3<T, 1, 2>, 1};
  if (j <= 4) return {fast::row_bwd_v3<T, 1, 4>, 1};
  return {fast::row_bwd_v3<T, 1, 8>, 1};
}

template <typename T> void forward_fast(const RmsLinFwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  const T* w = static_cast<const T*>(a.w);
  const bool fused = !fwd_v2() && std::is_same_v<T, __nv_bfloat16> && k > 0 && m > 0 &&
                     sm90_fwd_fused_available(a.dims.dtype);
  if (fused && !fused_read_only()) {
    // v3: one GEMM kernel computes rstd, folds g into the x tiles and scales the rows.
    return sm90_gemm_fwd_fused(a.dims.dtype, a.x, a.g, w, static_cast<float*>(a.rstd), a.bias, a.y, n, k, m,
                               (float)a.dims.eps, s);
  }
  DeviceBuffer<T> wg(m * k, s);
  const int sms = num_sms();
  if (fused) {
    // Read-only variant: wg = W diag(g) here, the GEMM mainloop only sums x^2.
    const int w_blocks = (int)std::max<int64_t>(1, std::min<int64_t>((m * k / 8 + 255) / 256, (int64_t)sms * 4));
    fast::prep_fwd<T><<<w_blocks, 256, 0, s>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.g), w,
                                               static_cast<float*>(a.rstd), wg.get(), n, k, m, (float)a.dims.eps, 0);
    check_launch("prep_fwd(wg)");
    sm90_gemm_fwd_fused(a.dims.dtype, a.x, nullptr, wg.get(), static_cast<float*>(a.rstd), a.bias, a.y, n, k, m,
                        (float)a.dims.eps, s);
    wg.release(s);
    return;
  }
  const int row_blocks = (int)std::min<int64_t>((n + 7) / 8, (int64_t)sms * 8);
  const int w_blocks = (int)std::max<int64_t>(1, std::min<int64_t>((m * k / 8 + 255) / 256, (int64_t)sms * 4));
  fast::prep_fwd<T><<<row_blocks + w_blocks, 256, 0, s>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.g), w,
                                                          static_cast<float*>(a.rstd), wg.get(), n, k, m,
                                                          (float)a.dims.eps, row_blocks);
  check_launch("prep_fwd");
  if (m > 0) sm90_gemm_fwd(a.dims.dtype, a.x, wg.get(), static_cast<const float*>(a.rstd), a.bias, a.y, n, k, m, s);
  wg.release(s);
}

// LLMTRAIN_RMSLIN_SM80=1: take the portable tensor-core path even where the sm_90a one could run (A/B, tests).
inline bool force_sm80() {
  const char* e = std::getenv("LLMTRAIN_RMSLIN_SM80");
  return e && e[0] && e[0] != '0';
}
// The portable tensor-core path: on unless the whole v2 path is asked for (its H100 run passed the
// full test grid, forced with LLMTRAIN_RMSLIN_SM80=1).
inline bool sm80_enabled() { return force_sm80() || !legacy(); }

// Portable tensor-core forward: rstd + xn pre-pass, then an mma.sync GEMM with the bias as a
// broadcast C operand.
template <typename T> void forward_tc(const RmsLinFwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  DeviceBuffer<T> xn(n * k, s);
  const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>((n + 7) / 8, (int64_t)num_sms() * 8));
  fast::prep_xn<T><<<blocks, 256, 0, s>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.g),
                                          static_cast<float*>(a.rstd), xn.get(), n, k, (float)a.dims.eps);
  check_launch("prep_xn");
  if (m > 0) sm80_gemm_fwd(a.dims.dtype, xn.get(), a.w, a.bias, a.y, n, k, m, s);
  xn.release(s);
}

// sm80 = true: the same schedule with the portable mma.sync GEMMs instead of the sm_90a ones.
template <typename T> void backward_fast(const RmsLinBwdArgs& a, bool sm80 = false) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  const int sms = num_sms();
  // dxn = dy W into dx.
  (sm80 ? sm80_gemm_dgrad : sm90_gemm_dgrad)(a.dims.dtype, a.dy, a.w, a.dx, n, k, m, s);
  // Row pass: dx, xn and dg partials.
  DeviceBuffer<T> xn(n * k, s);
  const RowBwdV3<T> v3 = bwd_v2() ? RowBwdV3<T>{} : pick_row_bwd_v3<T>(k);
  const int rows_per_block = v3.fn ? 8 / v3.w : 16;
  const int nb = (int)std::max<int64_t>(1, std::min<int64_t>((n + rows_per_block - 1) / rows_per_block, (int64_t)sms * 2));
  DeviceBuffer<float> part((size_t)nb * (size_t)std::max(k, m), s);
  if (v3.fn) {
    const size_t smem = (size_t)(k + 16) * sizeof(float);
    if (smem > 48 * 1024)
      check(cudaFuncSetAttribute(v3.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
            "cudaFuncSetAttribute(row_bwd_v3)");
    v3.fn<<<nb, 256, smem, s>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.g),
                                static_cast<const float*>(a.rstd), dx, xn.get(), part.get(), n, k);
    check_launch("row_bwd_v3");
  } else {
    const size_t smem = (size_t)k * sizeof(float);
    if (smem > 48 * 1024)
      check(cudaFuncSetAttribute(fast::row_bwd<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
            "cudaFuncSetAttribute(row_bwd)");
    fast::row_bwd<T><<<nb, 512, smem, s>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.g),
                                           static_cast<const float*>(a.rstd), dx, xn.get(), part.get(), n, k);
    check_launch("row_bwd");
  }
  fast::reduce_parts<T><<<(unsigned)((k + 255) / 256), 256, 0, s>>>(part.get(), static_cast<T*>(a.dg), nb, k);
  check_launch("reduce_parts(dg)");
  // dW = dy^T xn.
  (sm80 ? sm80_gemm_wgrad : sm90_gemm_wgrad)(a.dims.dtype, a.dy, xn.get(), a.dw, n, k, m, s);
  xn.release(s);
  if (a.dbias) {
    fast::colsum_part<T><<<nb, 256, 0, s>>>(dy, part.get(), n, m);
    check_launch("colsum_part(dbias)");
    fast::reduce_parts<T><<<(unsigned)((m + 255) / 256), 256, 0, s>>>(part.get(), static_cast<T*>(a.dbias), nb, m);
    check_launch("reduce_parts(dbias)");
  }
  part.release(s);
}

template <typename T> void forward(const RmsLinFwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* w = static_cast<const T*>(a.w);
  const T* bias = static_cast<const T*>(a.bias);
  float* rstd = static_cast<float*>(a.rstd);
  T* y = static_cast<T*>(a.y);
  if (n == 0) return;
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if constexpr (!std::is_same_v<T, float>) {
    if (!force_sm80() && aligned16({a.x, a.g, a.w, a.bias, a.y}) && sm90_usable(a.dims.dtype, k, m))
      return forward_fast<T>(a);
    if (sm80_enabled() && sm80_usable(a.dims.dtype, k, m, {a.x, a.g, a.w, a.bias, a.y})) return forward_tc<T>(a);
  }
  rstd_kernel<T><<<(unsigned)n, 256, 0, s>>>(x, rstd, n, k, (float)a.dims.eps);
  check_launch("rstd_kernel");
  launch_gemm(n, m, k, LoadXG<T>{x, g, k}, LoadRowMajorT<T>{w, k}, EpFwd<T>{rstd, bias, y, m}, s);
}

template <typename T> void backward(const RmsLinBwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* w = static_cast<const T*>(a.w);
  const T* dy = static_cast<const T*>(a.dy);
  const float* rstd = static_cast<const float*>(a.rstd);
  T* dx = static_cast<T*>(a.dx);
  T* dg = static_cast<T*>(a.dg);
  T* dw = static_cast<T*>(a.dw);
  T* db = static_cast<T*>(a.dbias);
  if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows");
  if constexpr (!std::is_same_v<T, float>) {
    if (n > 0 && m > 0 && k <= 32768 && !force_sm80() &&
        aligned16({a.x, a.g, a.w, a.dy, a.dx, a.dg, a.dw, a.dbias}) && sm90_usable(a.dims.dtype, k, m))
      return backward_fast<T>(a);
    if (n > 0 && m > 0 && k <= 32768 && sm80_enabled() && sm80_usable(a.dims.dtype, k, m, {a.x, a.g, a.w, a.dy, a.dx, a.dg, a.dw, a.dbias}))
      return backward_fast<T>(a, true);
  }
  // dW = dy^T xn: M = m, N = k, reduction over the n rows. A(o, i) = dy[i, o].
  launch_gemm(m, k, n, LoadRowMajorT<T>{dy, m}, LoadXn<T>{x, g, rstd, k}, EpStore<T>{dw, k}, s);
  if (db) launch_colsum(n, m, LoadRowMajor<T>{dy, m}, StoreVec<T>{db}, s);
  if (n == 0) {
    launch_colsum(0, k, Zero{}, StoreVec<T>{dg}, s);
    return;
  }
  DeviceBuffer<float> dxn(n * k, s);
  float* dxp = dxn.get();
  // dxn = dy W: M = n, N = k, reduction over m.
  launch_gemm(n, k, m, LoadRowMajor<T>{dy, m}, LoadRowMajor<T>{w, k}, EpStore<float>{dxp, k}, s);
  launch_colsum(n, k, DgTerm<T>{dxp, x, rstd, k}, StoreVec<T>{dg}, s);
  dx_kernel<T><<<(unsigned)n, 256, 0, s>>>(x, g, rstd, dxp, dx, n, k);
  check_launch("dx_kernel");
  dxn.release(s);
}

template <class Fn> void dispatch(DType d, Fn&& fn) {
  switch (d) {
    case DType::F32: fn((float*)nullptr); break;
    case DType::BF16: fn((__nv_bfloat16*)nullptr); break;
    case DType::F16: fn((__half*)nullptr); break;
    default: throw std::runtime_error("rmsnorm_linear (CUDA): unsupported dtype (float32, bfloat16, float16)");
  }
}

}  // namespace
}  // namespace rmslin

void rmsnorm_linear_fwd_cuda(const RmsLinFwdArgs& a) {
  rmslin::dispatch(a.dims.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rmslin::forward<T>(a);
  });
}

void rmsnorm_linear_bwd_cuda(const RmsLinBwdArgs& a) {
  rmslin::dispatch(a.dims.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rmslin::backward<T>(a);
  });
}

}  // namespace llmtrain
