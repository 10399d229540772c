// Hopper (sm_90a) GEMMs for RMSNorm + Linear, built from CUTLASS 3.x collectives (TMA + wgmma,
// warp-specialized, persistent). Declared here, defined in rmsnorm_linear_sm90_*.cu (one GEMM per
// file so they compile in parallel). Each launcher returns false when this build or this device
// cannot run it (no CuTe headers, no sm_90a code, unaligned sizes); the caller then takes the
// portable path. Errors while launching throw std::runtime_error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../tensor_view.h"

namespace llmtrain {
namespace rmslin {

// Whether the sm_90a GEMMs can serve this problem on the current device: built with CuTe for
// 90a, a compute-capability 9.0 device, 16-bit dtype, and k, m multiples of 8 (16-byte TMA rows).
bool sm90_usable(DType dtype, int64_t k, int64_t m);

// y[n, m] = rstd[i] * (x[n, k] . wg[m, k]^T) + bias[m]   (bias may be null)
// pdl: launch with programmatic dependent launch (the kernel waits for its stream predecessor before
// its first global load; built with CUTLASS_ENABLE_GDC_FOR_SM90, rmsnorm_linear_sm90_gemm.cuh).
void sm90_gemm_fwd(DType dtype, const void* x, const void* wg, const float* rstd, const void* bias, void* y,
                   int64_t n, int64_t k, int64_t m, cudaStream_t s, bool pdl = false);
// v3 forward in one kernel (bf16): y = (x diag(g) . w^T) * rstd[row] + bias, with rstd computed from
// the A tiles inside the GEMM mainloop and written to rstd[n]. See rmsnorm_linear_sm90_fused.cu.
// g == nullptr: w is already W diag(g) and the mainloop only sums x^2 (read-only variant).
bool sm90_fwd_fused_available(DType dtype);
void sm90_gemm_fwd_fused(DType dtype, const void* x, const void* g, const void* w, float* rstd, const void* bias,
                         void* y, int64_t n, int64_t k, int64_t m, float eps, cudaStream_t s);
// v6 forward in one kernel (bf16), the same contract with the x tiles taken into registers: the row
// sums and the g multiply happen there, the wgmma reads A from registers. g == nullptr: w is already
// W diag(g). See rmsnorm_linear_sm90_fwd_rs.cu. Availability as sm90_fwd_fused_available; with g,
// k <= kRegAMaxStagedK (g is staged in shared memory).
constexpr int64_t kRegAMaxStagedK = 8192;
void sm90_gemm_fwd_reg_a(DType dtype, const void* x, const void* g, const void* w, float* rstd, const void* bias,
                         void* y, int64_t n, int64_t k, int64_t m, float eps, cudaStream_t s);
// d[n, k] = dy[n, m] . w[m, k]
void sm90_gemm_dgrad(DType dtype, const void* dy, const void* w, void* d, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s, bool pdl = false);
// dw[m, k] = dy[n, m]^T . xn[n, k]
void sm90_gemm_wgrad(DType dtype, const void* dy, const void* xn, void* dw, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s, bool pdl = false);

}  // namespace rmslin
}  // namespace llmtrain
