// Portable tensor-core (mma.sync, sm_80+) GEMMs for RMSNorm + Linear; defined in rmsnorm_linear_sm80.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../tensor_view.h"

namespace llmtrain {
namespace rmslin {

// Built with the CUTLASS headers, compute capability >= 8.0, 16-bit dtype, k and m multiples of 8 and
// every pointer 16-byte aligned; LLMTRAIN_RMSLIN_PORTABLE=1 turns it off (SIMT fallback).
bool sm80_usable(DType dtype, int64_t k, int64_t m, std::initializer_list<const void*> ptrs);
// y[n, m] = xn[n, k] . w[m, k]^T + bias[m] (bias may be null)
void sm80_gemm_fwd(DType dtype, const void* xn, const void* w, const void* bias, void* y, int64_t n, int64_t k,
                   int64_t m, cudaStream_t s);
// d[n, k] = dy[n, m] . w[m, k]
void sm80_gemm_dgrad(DType dtype, const void* dy, const void* w, void* d, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s);
// dw[m, k] = dy[n, m]^T . xn[n, k]
void sm80_gemm_wgrad(DType dtype, const void* dy, const void* xn, void* dw, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s);

}  // namespace rmslin
}  // namespace llmtrain
