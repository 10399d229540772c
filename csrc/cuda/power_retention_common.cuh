// Shared device helpers of the CUDA power retention kernels (power_retention.cu): warp-level
// tensor-core primitives (ldmatrix, mma.sync m16n8k16 bf16 -> fp32, cp.async) that serve
// sm_80, sm_90 and sm_120 from one source, element conversion, and the within-chunk gate scan.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace llmtrain {
namespace pr {

using bf16 = __nv_bfloat16;

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("power_retention (CUDA): ") + what + ": " + cudaGetErrorString(e));
}
#define PR_CHECK(x) ::llmtrain::pr::check((x), #x)

constexpr int kBM = 128;       // rows per block of the chunk kernels: 8 warps x 16 rows
constexpr int kThreads = 256;  // threads per block of the chunk kernels
constexpr int kKB = 64;        // rows of the inner key / query tiles
constexpr float kSqrt2 = 1.41421356237309515f;
constexpr float kInvSqrt2 = 0.70710678118654757f;

// Canonical symmetric layout: feature f(a, b), a <= b, row-major over the upper triangle.
__host__ __device__ constexpr int feat_dim(int d) { return d * (d + 1) / 2; }
__host__ __device__ __forceinline__ int row_start(int a, int d) { return a * d - (a * (a - 1)) / 2; }
// Rows of the canonical layout spanned by G consecutive triangle rows (the largest, from a = 0).
__host__ __device__ constexpr int slab_rows(int d, int G) { return G * d - G * (G - 1) / 2; }

template <int d> struct Cfg {
  static constexpr int D = d * (d + 1) / 2;
  static constexpr int E = d + 8;   // fused state columns: [v (d), 1 (normaliser), 0 x 7]
  static constexpr int NT = E / 8;  // n8 tiles over E (odd)
  static constexpr int ND = d / 8;  // n8 tiles over d (even)
  static constexpr int LD = d + 8;  // smem row stride (elements) of [rows][d] bf16 tiles
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm2t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}

// c += a b, m16n8k16, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ uint32_t hmul2_bf16(uint32_t a, uint32_t b) {
  __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a), y = *reinterpret_cast<__nv_bfloat162*>(&b);
  __nv_bfloat162 z = __hmul2(x, y);
  return *reinterpret_cast<uint32_t*>(&z);
}
__device__ __forceinline__ uint32_t ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
// x rounded to the bf16 tensor-core operand the kernels compute with (exact for bf16 inputs)
__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ __forceinline__ void st8_bf16(bf16* p, const float (&v)[8]) {
  uint4 u;
  u.x = pack_bf16(v[0], v[1]);
  u.y = pack_bf16(v[2], v[3]);
  u.z = pack_bf16(v[4], v[5]);
  u.w = pack_bf16(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Global element I/O for the input dtypes (16-byte vectors of 8 elements; float: two).
template <typename T> struct IO;
template <> struct IO<bf16> {
  static __device__ __forceinline__ void load8(const bf16* p, float (&o)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = unpack_bf16(w[i]);
      o[2 * i] = f.x;
      o[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ float2 load2(const bf16* p) { return unpack_bf16(ld32(p)); }
  static __device__ __forceinline__ void store2(bf16* p, float x, float y) {
    *reinterpret_cast<uint32_t*>(p) = pack_bf16(x, y);
  }
};
template <> struct IO<__half> {
  static __device__ __forceinline__ void load8(const __half* p, float (&o)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      o[2 * i] = f.x;
      o[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ float2 load2(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  }
  static __device__ __forceinline__ void store2(__half* p, float x, float y) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
  }
};
template <> struct IO<float> {
  static __device__ __forceinline__ void load8(const float* p, float (&o)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
  }
  static __device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
  static __device__ __forceinline__ void store2(float* p, float x, float y) {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
  }
};

// gs[j] = sum_{u <= j} log_g[u * stride] for j < cnt (zeros when ungated). Deterministic: the
// first warp scans contiguous per-lane segments. Contains the barriers around it.
__device__ __forceinline__ void chunk_cumsum(float* gs, const float* lg, int64_t stride, int cnt) {
  for (int j = threadIdx.x; j < cnt; j += blockDim.x) gs[j] = lg ? lg[j * stride] : 0.f;
  __syncthreads();
  if (lg && threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int per = (cnt + 31) / 32, beg = min(lane * per, cnt), end = min(beg + per, cnt);
    float s = 0.f;
    for (int j = beg; j < end; ++j) s += gs[j];
    float incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    float run = incl - s;
    for (int j = beg; j < end; ++j) {
      run += gs[j];
      gs[j] = run;
    }
  }
  __syncthreads();
}

// Copy rows [r0, r1) (E bf16 each, contiguous) of a state slot into smem with cp.async.
template <int E>
__device__ __forceinline__ void load_rows_async(bf16* dst, const bf16* src, int r0, int r1) {
  constexpr int V = E / 8;
  const int n = (r1 - r0) * V;
  const bf16* s = src + (int64_t)r0 * E;
  for (int i = threadIdx.x; i < n; i += blockDim.x) cp_async16(dst + i * 8, s + (int64_t)i * 8);
}

}  // namespace pr
}  // namespace llmtrain
