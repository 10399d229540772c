// Shared helpers for the RMSNorm + Linear CUDA kernels: dtype conversion, block reductions,
// error checking that throws (never aborts), and a stream-ordered scratch buffer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace llmtrain {
namespace rmslin {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): ") + what + ": " + cudaGetErrorString(e));
  }
}
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) part[wid] = v;
  __syncthreads();
  float t = lane < nw ? part[lane] : 0.f;
  return warp_sum(t);
}

// Keep freed blocks in the device's default stream-ordered pool (release threshold: unlimited), so
// repeated workspaces are reused instead of being mapped and unmapped on every call.
inline void keep_pool_memory() {
  static bool done[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return;
  }
  if (done[dev]) return;
  cudaMemPool_t pool;
  if (cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
    uint64_t threshold = ~0ull;
    cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
  }
  cudaGetLastError();
  done[dev] = true;
}

// Stream-ordered device scratch (cudaMallocAsync / cudaFreeAsync on the caller's stream).
template <typename T> class DeviceBuffer {
 public:
  DeviceBuffer(size_t count, cudaStream_t s) : s_(s) {
    keep_pool_memory();
    if (count) check(cudaMallocAsync(reinterpret_cast<void**>(&p_), count * sizeof(T), s), "cudaMallocAsync");
  }
  ~DeviceBuffer() {
    if (p_) cudaFreeAsync(p_, s_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  void release(cudaStream_t s) {
    if (p_) {
      cudaError_t e = cudaFreeAsync(p_, s);
      p_ = nullptr;
      check(e, "cudaFreeAsync");
    }
  }

 private:
  T* p_ = nullptr;
  cudaStream_t s_;
};

}  // namespace rmslin
}  // namespace llmtrain
