// Kernel entry points shared by the CPU and CUDA implementations. The bindings validate
// every argument and fill these structs; kernels trust them. Pointers are raw device or
// host pointers; optional ones are null. All tensors are contiguous row-major.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tensor_view.h"

namespace llmtrain {

// Symmetric power feature size: D = C(d + deg - 1, deg).
inline int64_t sym_power_dim(int64_t d, int deg) { return deg == 1 ? d : d * (d + 1) / 2; }

// ---- Power retention (deg 2) ----
// q [b, t, hq, d]; k, v [b, t, hk, d]; log_g [b, t, hk]; state S [b, hk, D, d]; sum of keys z [b, hk, D].
// "acc" tensors (log_g, states, their gradients) are float64 when q is float64, else float32.
struct RetentionDims {
  int64_t b, t, hq, hk, d, D;
  int deg;
  double scale;
  int64_t chunk;
  DType dtype;  // of q, k, v, y and their gradients
};

struct RetentionFwdArgs {
  RetentionDims dims;
  const void *q, *k, *v;
  const void* log_g;            // optional
  const void *s0, *z0;          // optional initial state
  void* y;
  void *s_out, *z_out;          // optional final state (skipped when null)
  void* stream;                 // cudaStream_t for CUDA, unused on CPU
  void* workspace = nullptr;    // CUDA: caller-allocated scratch (power_retention_workspace_bytes)
  int64_t workspace_bytes = 0;
};

struct RetentionBwdArgs {
  RetentionDims dims;
  const void *q, *k, *v;
  const void* log_g;            // optional
  const void *s0, *z0;          // optional
  const void* dy;
  const void *ds_out, *dz_out;  // optional gradients of the final state
  void *dq, *dk, *dv;
  void* dlog_g;                 // written when log_g is given
  void *ds0, *dz0;              // written when s0 is given
  void* stream;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  // CUDA (v3): the forward's workspace kept by the caller (its bf16 chunk states come first), so
  // the backward skips recomputing the states; null = recompute. Workspace then sized with which=3.
  const void* saved = nullptr;
  int64_t saved_bytes = 0;
};

// Recurrent step over t tokens: advances (S, z) in place and writes y.
struct RetentionStepArgs {
  RetentionDims dims;
  const void *q, *k, *v;
  const void* log_g;
  void *s, *z;
  void* y;
  void* stream;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// Chunk size the CUDA kernels use for a requested one: a multiple of 128 in [128, max_chunk], and
// no longer than the sequence (rounded up to 128), so short sequences run as a single chunk (the
// quadratic form: no states at all without an initial or final state). max_chunk: 1024 for kernel
// generations v1 .. v6 (their blocks keep C gates in shared memory), 8192 from v7 on.
inline int64_t retention_cuda_chunk(int64_t t, int64_t chunk, int64_t max_chunk) {
  const int64_t c = std::min<int64_t>(std::max<int64_t>((chunk + 127) / 128 * 128, 128), max_chunk);
  return std::min<int64_t>(c, std::max<int64_t>((t + 127) / 128 * 128, 128));
}

// Return the number of non-finite values written to y (0 on success).
int64_t power_retention_fwd_cpu(const RetentionFwdArgs& a);
void power_retention_bwd_cpu(const RetentionBwdArgs& a);
int64_t power_retention_step_cpu(const RetentionStepArgs& a);

// ---- RMSNorm + Linear: y = (x * rstd * g) @ W^T + bias ----
// x [n, k], g [k], W [m, k], bias [m], y [n, m], rstd [n] (acc dtype).
struct RmsLinDims {
  int64_t n, k, m;
  double eps;
  DType dtype;
};

struct RmsLinFwdArgs {
  RmsLinDims dims;
  const void *x, *g, *w, *bias;  // bias optional
  void* y;
  void* rstd;
  void* stream;
};

struct RmsLinBwdArgs {
  RmsLinDims dims;
  const void *x, *g, *w, *rstd, *dy;
  void *dx, *dg, *dw, *dbias;  // dbias optional
  void* stream;
  // CUDA only: dx already holds dxn = dy W (in x's dtype, e.g. from cuBLAS); skip that GEMM.
  bool dxn_given = false;
};

void rmsnorm_linear_fwd_cpu(const RmsLinFwdArgs& a);
void rmsnorm_linear_bwd_cpu(const RmsLinBwdArgs& a);

#ifdef LLMTRAIN_WITH_CUDA
int64_t power_retention_fwd_cuda(const RetentionFwdArgs& a);
void power_retention_bwd_cuda(const RetentionBwdArgs& a);
int64_t power_retention_step_cuda(const RetentionStepArgs& a);
// Workspace bytes for which = 0 (forward), 1 (backward), 2 (step), 3 (backward given the forward's
// saved states), 4 (forward of one chunk without initial or final state); m.chunk as requested.
int64_t power_retention_workspace_bytes_cuda(const RetentionDims& m, int which);
void rmsnorm_linear_fwd_cuda(const RmsLinFwdArgs& a);
void rmsnorm_linear_bwd_cuda(const RmsLinBwdArgs& a);
// Device count and names for `llmtrain info`; never throws (0 devices when no driver).
int cuda_device_count();
const char* cuda_device_name(int i);
// Hopper's wgmma paths: the extension was built with sm_90a code, and the current device is sm_90.
bool cuda_built_for_sm90a();
bool cuda_current_device_is_sm90();
#endif

}  // namespace llmtrain
