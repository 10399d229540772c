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
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

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

// dst = float(src), grid-stride (the portable backward's dxn when the caller computed it in T).
template <typename T> __global__ void widen_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t count) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = static_cast<float>(src[i]);
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
// of kernels at 16384x2048->2048 against 272 us for the fused v3 one; since session 17 v6 for outputs up
// to kRegADefaultMaxM wide, bf16 on sm_90a), the v3 backward
// (register-resident row pass: 102 us against 279 us) and the portable mma.sync GEMMs where the
// sm_90a ones cannot run (sm_80 / sm_86 / sm_89 / sm_120). LLMTRAIN_RMSLIN=v2 (or _LEGACY=1) gives
// the whole v2 path (SIMT GEMMs off sm_90a); LLMTRAIN_RMSLIN=v3 the fused one-GEMM forward too.
// LLMTRAIN_RMSLIN_FWD=v2|v3|ro|v6|v6ro and LLMTRAIN_RMSLIN_BWD=v2|v3 pick one side alone (ro: the
// fused forward's read-only variant, W diag(g) pre-pass, the GEMM mainloop only sums x^2; v6: one
// GEMM whose A operand goes through registers, where the row sums and the g multiply happen; v6ro:
// v6 on a W diag(g) pre-pass).
// Session 7 switches: LLMTRAIN_RMSLIN_PDL=0|1 (default 0: programmatic dependent launch between the
// sm_90a path's kernels) and LLMTRAIN_RMSLIN_REDUCE=fused|kernel (default fused: the row pass's last
// blocks reduce the dg / dbias partials; kernel: a separate reduce_parts launch).
// Session 18: LLMTRAIN_RMSLIN_SWIZZLE=1|2|4|8 and LLMTRAIN_RMSLIN_RASTER=m|n set every CUTLASS GEMM's tile
// order (rmsnorm_linear_sm90_gemm.cuh: set_tile_order; the default forward swizzles by 8 from 32 N tiles).
// An unknown value of any switch is an error (a typo must not silently measure the default).
enum class Gen { Default, V2, V3, RO, V6, V6RO };
inline const char* env_value(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] ? e : nullptr;
}
// Parses a generation switch; allowed lists the accepted names (space-separated).
inline Gen parse_gen(const char* name, const char* allowed) {
  const char* e = env_value(name);
  if (!e) return Gen::Default;
  static const struct { const char* s; Gen g; } names[] = {{"v2", Gen::V2}, {"v3", Gen::V3}, {"ro", Gen::RO},
                                                           {"v6", Gen::V6}, {"v6ro", Gen::V6RO}};
  const std::string list = std::string(" ") + allowed + " ";
  for (const auto& n : names)
    if (std::strcmp(e, n.s) == 0 && list.find(std::string(" ") + n.s + " ") != std::string::npos) return n.g;
  throw std::runtime_error(std::string("rmsnorm_linear (CUDA): ") + name + "=" + e + " is not a kernel generation (" +
                           allowed + ")");
}
// A 0/1 switch: unset -> dflt, "0" / "1" -> false / true, anything else an error.
inline bool parse_flag(const char* name, bool dflt) {
  const char* e = env_value(name);
  if (!e) return dflt;
  if (std::strcmp(e, "0") == 0) return false;
  if (std::strcmp(e, "1") == 0) return true;
  throw std::runtime_error(std::string("rmsnorm_linear (CUDA): ") + name + "=" + e + " is not 0 or 1");
}
// A two-way switch: unset or `on` -> true, `off` -> false, anything else an error naming both.
inline bool parse_choice(const char* name, const char* on, const char* off, const char* what) {
  const char* e = env_value(name);
  if (!e || std::strcmp(e, on) == 0) return true;
  if (std::strcmp(e, off) == 0) return false;
  throw std::runtime_error(std::string("rmsnorm_linear (CUDA): ") + name + "=" + e + " is not a " + what + " (" +
                           off + " " + on + ")");
}
inline bool legacy() {
  return parse_flag("LLMTRAIN_RMSLIN_LEGACY", false) || parse_gen("LLMTRAIN_RMSLIN", "v2 v3") == Gen::V2;
}
// The default forward by output width m (session 17, H100, docs/perf.md): v6's one kernel against the
// pre-pass + GEMM, forward ms at 16384 x 2048 -> m: 0.217 / 0.233 (m = 2048), 0.336 / 0.340 (3072),
// 0.456 / 0.448 (4096); session 16: 0.653 / 0.609 (5632), 0.968 / 0.938 (8192). The pre-pass costs the
// same at every m while v6's longer GEMM grows with it, so narrow outputs take v6.
constexpr int64_t kRegADefaultMaxM = 3072;
inline Gen fwd_gen(int64_t k, int64_t m) {
  const Gen all = parse_gen("LLMTRAIN_RMSLIN", "v2 v3");
  const Gen side = parse_gen("LLMTRAIN_RMSLIN_FWD", "v2 v3 ro v6 v6ro");
  if (legacy()) return Gen::V2;
  if (side != Gen::Default) return side;
  if (all == Gen::V3) return Gen::V3;
  return m <= kRegADefaultMaxM && k <= kRegAMaxStagedK ? Gen::V6 : Gen::V2;
}
inline Gen bwd_gen() {
  const Gen side = parse_gen("LLMTRAIN_RMSLIN_BWD", "v2 v3");
  if (legacy()) return Gen::V2;
  return side == Gen::V2 ? Gen::V2 : Gen::V3;  // the default backward is v3
}
// PDL is opt-in: the H100 table of session 7 measured no gain from it (fwd+bwd 0.712 ms with, 0.709
// without), and v2's dg differed between runs with it on; stream order is the simpler guarantee.
inline bool pdl_enabled() { return parse_flag("LLMTRAIN_RMSLIN_PDL", false); }
// Session 8 (default): the row kernels prep_fwd_s8 (forward pre-pass) and row_bwd_s8 (backward row
// pass); LLMTRAIN_RMSLIN_ROWS=s7 gives session 7's prep_fwd_rows and row_bwd_v3 (A/B; same bits for
// y, rstd, dx, dW, dbias; dg the same bits where both grids have the same number of blocks).
inline bool rows_s8() { return parse_choice("LLMTRAIN_RMSLIN_ROWS", "s8", "s7", "row-kernel generation"); }
// LLMTRAIN_RMSLIN_PREFETCH=0|1 (default 0, session 8): the s8 row pass prefetches each row group's
// next row into L2 (sm_90a builds; a hint, same bits).
inline bool row_prefetch() { return parse_flag("LLMTRAIN_RMSLIN_PREFETCH", false); }
inline bool fused_reduce() {
  return parse_choice("LLMTRAIN_RMSLIN_REDUCE", "fused", "kernel", "reduction mode");
}

// ---- per-stream ticket counters for finish_parts ----
// One zero-initialized counter per (device, stream): kernels on one stream run in order and each
// leaves its counter at 0, while two streams running the op at once must not share one. A static
// __device__ array needs no allocation. More streams than slots, or a stream being captured into a
// CUDA graph (the graph bakes in the slot, and two graphs captured on one stream may later be
// replayed concurrently on two streams): nullptr, and the caller launches reduce_parts instead.
constexpr int kTicketSlots = 256;
__device__ unsigned g_tickets[kTicketSlots];

unsigned* ticket_for(cudaStream_t s) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, int> slot;
  static unsigned* base[64] = {};
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(s, &cap), "cudaStreamIsCapturing");
  if (cap != cudaStreamCaptureStatusNone) return nullptr;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (!base[dev]) check(cudaGetSymbolAddress(reinterpret_cast<void**>(&base[dev]), g_tickets), "cudaGetSymbolAddress");
  auto it = slot.find({dev, s});
  if (it == slot.end()) {
    int used = 0;
    for (const auto& kv : slot) used += kv.first.first == dev;
    if (used >= kTicketSlots) return nullptr;
    it = slot.emplace(std::make_pair(dev, s), used).first;
  }
  return base[dev] + it->second;
}

// Launch with an optional PDL attribute (cudaLaunchKernelEx); kernels launched this way call
// fast::pdl_wait() before touching global memory.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl, const char* what,
            Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), what);
}

// cudaFuncSetAttribute once per (device, kernel, size) instead of on every call.
inline void ensure_dynamic_smem(const void* fn, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> done;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = done[{dev, fn}];
  if (have >= bytes) return;
  check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
  have = bytes;
}

// Resident blocks per SM of a kernel (cached per device, kernel and dynamic shared memory size: the
// session-8 row pass's depends on k): sizes persistent grids.
inline int blocks_per_sm(const void* fn, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<std::pair<int, const void*>, std::pair<int, size_t>>, int> cache;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(std::make_pair(dev, fn), std::make_pair(threads, smem));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int b = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, fn, threads, smem), "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  b = std::max(b, 1);
  cache[key] = b;
  return b;
}

// Largest dynamic shared memory a block may opt into on the current device (cached per device).
inline size_t max_smem_optin() {
  static int cache[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) dev = 0;
  if (!cache[dev])
    check(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  return (size_t)cache[dev];
}

// Finalizer blocks for finish_parts over cols columns: about 128 columns (32 float4 lanes) each, at
// most 32, and few enough to wait on the rest without starving them (sms / 2; a GPU runs >= 1 block
// of these kernels per SM).
inline int finalizers(int64_t cols, int nb, int sms) {
  const int64_t f = std::min<int64_t>({(cols + 127) / 128, (int64_t)32, (int64_t)nb, (int64_t)std::max(1, sms / 2)});
  return (int)std::max<int64_t>(1, f);
}

template <typename T>
using RowBwdFn = void (*)(const T*, const T*, const float*, T*, T*, float*, int64_t, int64_t, T*, unsigned*, int);
template <typename T> struct RowBwdV3 {
  RowBwdFn<T> fn = nullptr;
  int w = 1;
  size_t smem = 0;  // dynamic shared memory
  int max_bpsm = 2;  // blocks per SM the grid is sized for (at most; the occupancy query may say fewer)
};
// W = 1 warp per row up to k = 2048 (J <= 8 chunks per lane, row sum by shuffles); beyond, W = 4 or 8
// warps with J = 4 (J = 8 with W > 1 spills at 255 registers); k > 8192 keeps the v2 kernel.
template <typename T> RowBwdV3<T> pick_row_bwd_v3(int64_t k) {
  const int64_t k8 = k / 8;
  if (k8 > 1024) return {};
  const size_t smem = (size_t)(k + 16) * sizeof(float);
  if (k8 > 512) return {fast::row_bwd_v3<T, 8, 4>, 8, smem};
  if (k8 > 256) return {fast::row_bwd_v3<T, 4, 4>, 4, smem};
  const int64_t j = (k8 + 31) / 32;
  if (j <= 1) return {fast::row_bwd_v3<T, 1, 1>, 1, smem};
  if (j <= 2) return {fast::row_bwd_v3<T, 1, 2>, 1, smem};
  if (j <= 4) return {fast::row_bwd_v3<T, 1, 4>, 1, smem};
  return {fast::row_bwd_v3<T, 1, 8>, 1, smem};
}
// Session 8: W warps per row with J = 8 chunks per lane above k = 2048 (W = 2, 4, 8 up to k = 16384;
// beyond, the v2 kernel), one warp per row below. The grid is sized for 2 blocks per SM at J = 8 (the
// session-7 grid, so dg keeps v3's bits), 3 at J = 4 and 4 below (short rows: more rows in flight). Where the
// shared memory does not fit (the largest k on GPUs with ~100 KB per SM), the v3 pick.
template <typename T, bool PF> RowBwdV3<T> pick_row_bwd_s8_pf(int64_t k) {
  const int64_t k8 = k / 8;
  RowBwdV3<T> r;
  if (k8 > 2048) return pick_row_bwd_v3<T>(k);
  if (k8 > 1024) r = {fast::row_bwd_s8<T, 8, 8, PF>, 8, 0, 2};
  else if (k8 > 512) r = {fast::row_bwd_s8<T, 4, 8, PF>, 4, 0, 2};
  else if (k8 > 256) r = {fast::row_bwd_s8<T, 2, 8, PF>, 2, 0, 2};
  else if (k8 > 128) r = {fast::row_bwd_s8<T, 1, 8, PF>, 1, 0, 2};
  else if (k8 > 64) r = {fast::row_bwd_s8<T, 1, 4, PF>, 1, 0, 3};
  else if (k8 > 32) r = {fast::row_bwd_s8<T, 1, 2, PF>, 1, 0, 4};
  else r = {fast::row_bwd_s8<T, 1, 1, PF>, 1, 0, 4};
  r.smem = fast::row_bwd_s8_smem(k, r.w);
  // finish_parts adds ~4 KB of static shared memory.
  if (r.smem + 8 * 1024 > max_smem_optin()) return pick_row_bwd_v3<T>(k);
  return r;
}
template <typename T> RowBwdV3<T> pick_row_bwd_s8(int64_t k, bool prefetch) {
  return prefetch ? pick_row_bwd_s8_pf<T, true>(k) : pick_row_bwd_s8_pf<T, false>(k);
}

template <typename T>
using PrepFn = void (*)(const T*, const T*, const T*, float*, T*, int64_t, int64_t, int64_t, float);
// J 16-byte chunks per lane per pass: the whole row in one pass up to k = 2048, passes of 8 beyond.
template <typename T> PrepFn<T> pick_prep_rows(int64_t k) {
  const int64_t j = (k / 8 + 31) / 32;
  if (j <= 1) return fast::prep_fwd_rows<T, 1>;
  if (j <= 2) return fast::prep_fwd_rows<T, 2>;
  if (j <= 4) return fast::prep_fwd_rows<T, 4>;
  return fast::prep_fwd_rows<T, 8>;
}
template <typename T>
using PrepS8Fn = void (*)(const T*, const T*, const T*, float*, T*, int64_t, int64_t, int64_t, float, int);
template <typename T> struct PrepS8 {
  PrepS8Fn<T> fn;
  int rx;  // rows of x per warp
};
// Session 8: the same J, and RX rows of x per warp: 8, 4, 4, 2 for J = 1, 2, 4, 8 (16 loads per lane
// in flight from k = 1024 up; RX = 8 at J = 2 spills).
template <typename T> PrepS8<T> pick_prep_s8(int64_t k) {
  const int64_t j = (k / 8 + 31) / 32;
  if (j <= 1) return {fast::prep_fwd_s8<T, 1, 8, false>, 8};
  if (j <= 2) return {fast::prep_fwd_s8<T, 2, 4, false>, 4};
  if (j <= 4) return {fast::prep_fwd_s8<T, 4, 4, false>, 4};
  if (j <= 8) return {fast::prep_fwd_s8<T, 8, 2, false>, 2};
  return {fast::prep_fwd_s8<T, 8, 2, true>, 2};
}

template <typename T> void forward_fast(const RmsLinFwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  const T* w = static_cast<const T*>(a.w);
  const Gen gen = fwd_gen(k, m);
  const bool in_gemm = gen == Gen::V3 || gen == Gen::RO || gen == Gen::V6 || gen == Gen::V6RO;
  const bool fused = in_gemm && std::is_same_v<T, __nv_bfloat16> && k > 0 && m > 0 &&
                     sm90_fwd_fused_available(a.dims.dtype);
  const bool reg_a = gen == Gen::V6 || gen == Gen::V6RO;
  if (fused && gen == Gen::V3) {
    // v3: one GEMM kernel computes rstd, folds g into the x tiles and scales the rows.
    return sm90_gemm_fwd_fused(a.dims.dtype, a.x, a.g, w, static_cast<float*>(a.rstd), a.bias, a.y, n, k, m,
                               (float)a.dims.eps, s);
  }
  if (fused && gen == Gen::V6 && k <= kRegAMaxStagedK) {
    // v6: the same in one kernel, with the x tiles in registers (no pre-pass, no W diag(g)); larger
    // k (g does not fit the shared memory left) takes v6ro below.
    return sm90_gemm_fwd_reg_a(a.dims.dtype, a.x, a.g, w, static_cast<float*>(a.rstd), a.bias, a.y, n, k, m,
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
    (reg_a ? sm90_gemm_fwd_reg_a : sm90_gemm_fwd_fused)(a.dims.dtype, a.x, nullptr, wg.get(),
                                                        static_cast<float*>(a.rstd), a.bias, a.y, n, k, m,
                                                        (float)a.dims.eps, s);
    wg.release(s);
    return;
  }
  // Pre-pass (rstd and wg in one launch, a warp per row of x or of W, persistent grid) then the GEMM,
  // launched with PDL so that its prologue overlaps the pre-pass's tail (k = 0: no PDL, the GEMM's
  // consumers would have no mainloop to order their stores after the wait).
  const bool pdl = pdl_enabled() && k > 0;
  if (rows_s8()) {
    // One warp per row of W (those blocks first), RX rows of x per warp after them; no persistence.
    const PrepS8<T> prep = pick_prep_s8<T>(k);
    const int64_t w_blocks = (m + 7) / 8;
    const int64_t x_blocks = (n + 8 * prep.rx - 1) / (8 * prep.rx);
    if (w_blocks + x_blocks > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): pre-pass grid too large");
    launch(prep.fn, dim3((unsigned)(w_blocks + x_blocks)), dim3(256), 0, s, pdl, "prep_fwd_s8",
           static_cast<const T*>(a.x), static_cast<const T*>(a.g), w, static_cast<float*>(a.rstd), wg.get(), n, k, m,
           (float)a.dims.eps, (int)w_blocks);
  } else {
    const PrepFn<T> prep = pick_prep_rows<T>(k);
    const int64_t warps = (int64_t)sms * blocks_per_sm(reinterpret_cast<const void*>(prep), 256, 0) * 8;
    const int blocks = (int)std::max<int64_t>(1, (std::min<int64_t>(warps, n + m) + 7) / 8);
    launch(prep, dim3(blocks), dim3(256), 0, s, pdl, "prep_fwd_rows", static_cast<const T*>(a.x),
           static_cast<const T*>(a.g), w, static_cast<float*>(a.rstd), wg.get(), n, k, m, (float)a.dims.eps);
  }
  if (m > 0)
    sm90_gemm_fwd(a.dims.dtype, a.x, wg.get(), static_cast<const float*>(a.rstd), a.bias, a.y, n, k, m, s, pdl);
  wg.release(s);
}

// LLMTRAIN_RMSLIN_SM80=1: take the portable tensor-core path even where the sm_90a one could run (A/B, tests).
inline bool force_sm80() { return parse_flag("LLMTRAIN_RMSLIN_SM80", false); }
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
// Session 7: one workspace (xn, then the fp32 partials) allocated before the first kernel and freed
// after the last, so nothing stream-ordered sits between the kernels (PDL pairs adjacent launches);
// on the sm_90a path every kernel is launched with PDL; the dg (and dbias) partials are reduced by
// the last blocks of the kernel that wrote them (finish_parts), reduce_parts only as the fallback.
template <typename T> void backward_fast(const RmsLinBwdArgs& a, bool sm80 = false) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  const int sms = num_sms();
  const bool pdl = !sm80 && pdl_enabled();
  const RowBwdV3<T> v3 = bwd_gen() == Gen::V2 ? RowBwdV3<T>{} : rows_s8() ? pick_row_bwd_s8<T>(k, !sm80 && row_prefetch()) : pick_row_bwd_v3<T>(k);
  const int rows_per_block = v3.fn ? 8 / v3.w : 16;
  // Persistent grid: 2 blocks per SM (v2, v3; the s8 kernel at J = 8), up to 4 for the short-row s8
  // kernels where they fit (one wave: every block resident, which finish_parts' wait relies on).
  int bpsm = 2;
  if (v3.fn && v3.max_bpsm > 2) {
    ensure_dynamic_smem(reinterpret_cast<const void*>(v3.fn), v3.smem, "cudaFuncSetAttribute(row pass)");
    bpsm = std::max(2, std::min(v3.max_bpsm, blocks_per_sm(reinterpret_cast<const void*>(v3.fn), 256, v3.smem)));
  }
  const int nb = (int)std::max<int64_t>(1, std::min<int64_t>((n + rows_per_block - 1) / rows_per_block, (int64_t)sms * bpsm));
  // xn [n, k] (T), then the dg partials [nb, k] and the dbias partials [nb, m] (fp32), each at a
  // 256-byte aligned offset. Two regions, not one reused: with PDL the dbias pass may start while an
  // earlier reader of the dg partials (reduce_parts on the v2 path) is still running, and a shared
  // region made v2's dg differ between runs (H100, session 7).
  const size_t xn_bytes = ((size_t)n * (size_t)k * sizeof(T) + 255) / 256 * 256;
  const size_t dg_bytes = ((size_t)nb * (size_t)k * sizeof(float) + 255) / 256 * 256;
  DeviceBuffer<uint8_t> ws(xn_bytes + dg_bytes + (a.dbias ? (size_t)nb * (size_t)m * sizeof(float) : 0), s);
  T* xn = reinterpret_cast<T*>(ws.get());
  float* part = reinterpret_cast<float*>(ws.get() + xn_bytes);
  float* part_b = reinterpret_cast<float*>(ws.get() + xn_bytes + dg_bytes);
  unsigned* ticket = fused_reduce() ? ticket_for(s) : nullptr;
  // dxn = dy W into dx (unless the caller computed it there).
  if (a.dxn_given) {
  } else if (sm80)
    sm80_gemm_dgrad(a.dims.dtype, a.dy, a.w, a.dx, n, k, m, s);
  else
    sm90_gemm_dgrad(a.dims.dtype, a.dy, a.w, a.dx, n, k, m, s, pdl);
  // Row pass: dx, xn and dg partials (and dg itself with a ticket).
  bool dg_done = false;
  if (v3.fn) {
    const size_t smem = v3.smem;
    ensure_dynamic_smem(reinterpret_cast<const void*>(v3.fn), smem, "cudaFuncSetAttribute(row pass)");
    launch(v3.fn, dim3(nb), dim3(256), smem, s, pdl, "row pass", static_cast<const T*>(a.x),
           static_cast<const T*>(a.g), static_cast<const float*>(a.rstd), dx, xn, part, n, k, static_cast<T*>(a.dg),
           ticket, finalizers(k, nb, sms));
    dg_done = ticket != nullptr;
  } else {
    const size_t smem = (size_t)k * sizeof(float);
    ensure_dynamic_smem(reinterpret_cast<const void*>(fast::row_bwd<T>), smem, "cudaFuncSetAttribute(row_bwd)");
    fast::row_bwd<T><<<nb, 512, smem, s>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.g),
                                           static_cast<const float*>(a.rstd), dx, xn, part, n, k);
    check_launch("row_bwd");
  }
  if (!dg_done)
    launch(fast::reduce_parts<T>, dim3(fast::reduce_parts_blocks(k)), dim3(32, 8), 0, s, pdl, "reduce_parts(dg)",
           static_cast<const float*>(part), static_cast<T*>(a.dg), nb, k);
  // dW = dy^T xn.
  if (sm80)
    sm80_gemm_wgrad(a.dims.dtype, a.dy, xn, a.dw, n, k, m, s);
  else
    sm90_gemm_wgrad(a.dims.dtype, a.dy, xn, a.dw, n, k, m, s, pdl);
  if (a.dbias) {
    launch(fast::colsum_part<T>, dim3(nb), dim3(256), 0, s, pdl, "colsum_part(dbias)", dy, part_b, n, m,
           static_cast<T*>(a.dbias), ticket, finalizers(m, nb, sms));
    if (!ticket)
      launch(fast::reduce_parts<T>, dim3(fast::reduce_parts_blocks(m)), dim3(32, 8), 0, s, pdl,
             "reduce_parts(dbias)", static_cast<const float*>(part_b), static_cast<T*>(a.dbias), nb, m);
  }
  ws.release(s);
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
  // dxn = dy W: M = n, N = k, reduction over m (or widened from dx where the caller computed it).
  if (a.dxn_given) {
    widen_kernel<T><<<(unsigned)std::max<int64_t>(1, std::min<int64_t>((n * k + 255) / 256, 65535)), 256, 0, s>>>(
        static_cast<const T*>(a.dx), dxp, n * k);
    check_launch("widen_kernel");
  } else
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
