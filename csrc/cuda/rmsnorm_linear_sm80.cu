// Portable tensor-core GEMMs for RMSNorm + Linear (mma.sync through CUTLASS 2.x, sm_80 and newer:
// Ampere, Ada, Hopper without 90a code, Blackwell consumer sm_120). 16-bit dtypes, fp32 accumulation,
// 128x128x32 tiles with 4 stages (64 KiB of shared memory: fits the ~100 KiB parts too).
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "rmsnorm_linear_common.cuh"
#include "rmsnorm_linear_sm80.cuh"

#if defined(LLMTRAIN_WITH_CUTE)
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"
#endif

namespace llmtrain {
namespace rmslin {

bool sm80_usable(DType dtype, int64_t k, int64_t m, std::initializer_list<const void*> ptrs) {
#if defined(LLMTRAIN_WITH_CUTE)
  if (dtype != DType::BF16 && dtype != DType::F16) return false;
  if (k <= 0 || k % 8 != 0 || m % 8 != 0 || k > 0x7fffffff || m > 0x7fffffff) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;  // 16-byte vector loads
  if (const char* e = std::getenv("LLMTRAIN_RMSLIN_PORTABLE"))
    if (e[0] && e[0] != '0') return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  static int cc[64] = {};
  if (dev < 0 || dev >= 64) return false;
  if (!cc[dev]) {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    cc[dev] = major * 10 + minor;
  }
  return cc[dev] >= 80;
#else
  (void)dtype; (void)k; (void)m; (void)ptrs;
  return false;
#endif
}

#if defined(LLMTRAIN_WITH_CUTE)
namespace sm80 {

template <class Element, class LayoutA, class LayoutB>
using Gemm = cutlass::gemm::device::Gemm<
    Element, LayoutA, Element, LayoutB, Element, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp,
    cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
    cutlass::gemm::GemmShape<16, 8, 16>, cutlass::epilogue::thread::LinearCombination<Element, 8, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 4>;

// D[M, N] = A[M, K] B[K, N] (+ C with leading dimension ldc: 0 broadcasts one row, e.g. a bias).
template <class Element, class LayoutA, class LayoutB>
void run(int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, const void* c, int64_t ldc,
         void* d, int64_t ldd, cudaStream_t s, const char* what) {
  using G = Gemm<Element, LayoutA, LayoutB>;
  const Element* pc = static_cast<const Element*>(c ? c : d);
  typename G::Arguments args({M, N, K}, {static_cast<const Element*>(a), lda}, {static_cast<const Element*>(b), ldb},
                             {pc, c ? ldc : ldd}, {static_cast<Element*>(d), ldd}, {1.f, c ? 1.f : 0.f});
  G op;
  if (op.can_implement(args) != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): CUTLASS cannot run ") + what);
  if (op.initialize(args, nullptr, s) != cutlass::Status::kSuccess) {
    check_launch(what);
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): CUTLASS initialize failed for ") + what);
  }
  if (op.run(s) != cutlass::Status::kSuccess) {
    check_launch(what);
    throw std::runtime_error(std::string("rmsnorm_linear (CUDA): CUTLASS launch failed for ") + what);
  }
  check_launch(what);
}

using RM = cutlass::layout::RowMajor;
using CM = cutlass::layout::ColumnMajor;

template <class E> void fwd(const void* xn, const void* w, const void* bias, void* y, int64_t n, int64_t k, int64_t m,
                            cudaStream_t s) {
  // y[n, m] = xn[n, k] . W^T (W [m, k] row-major = column-major [k, m]) + bias
  run<E, RM, CM>((int)n, (int)m, (int)k, xn, k, w, k, bias, 0, y, m, s, "sm80 forward GEMM");
}
template <class E> void dgrad(const void* dy, const void* w, void* d, int64_t n, int64_t k, int64_t m, cudaStream_t s) {
  run<E, RM, RM>((int)n, (int)k, (int)m, dy, m, w, k, nullptr, 0, d, k, s, "sm80 backward data GEMM");
}
template <class E> void wgrad(const void* dy, const void* xn, void* dw, int64_t n, int64_t k, int64_t m,
                              cudaStream_t s) {
  // dw[m, k] = dy^T (column-major [m, n], ld m) . xn[n, k]
  run<E, CM, RM>((int)m, (int)k, (int)n, dy, m, xn, k, nullptr, 0, dw, k, s, "sm80 backward weight GEMM");
}

}  // namespace sm80
#endif

#if defined(LLMTRAIN_WITH_CUTE)
#define LLMTRAIN_SM80_DISPATCH(fn, ...)                                            \
  do {                                                                             \
    if (n > 0x7fffffff) throw std::runtime_error("rmsnorm_linear (CUDA): too many rows"); \
    if (dtype == DType::BF16) return sm80::fn<cutlass::bfloat16_t>(__VA_ARGS__);   \
    if (dtype == DType::F16) return sm80::fn<cutlass::half_t>(__VA_ARGS__);        \
  } while (0)
#else
#define LLMTRAIN_SM80_DISPATCH(fn, ...) (void)0
#endif

void sm80_gemm_fwd(DType dtype, const void* xn, const void* w, const void* bias, void* y, int64_t n, int64_t k,
                   int64_t m, cudaStream_t s) {
  LLMTRAIN_SM80_DISPATCH(fwd, xn, w, bias, y, n, k, m, s);
  throw std::runtime_error("rmsnorm_linear (CUDA): sm80 GEMM not built for this dtype");
}
void sm80_gemm_dgrad(DType dtype, const void* dy, const void* w, void* d, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s) {
  LLMTRAIN_SM80_DISPATCH(dgrad, dy, w, d, n, k, m, s);
  throw std::runtime_error("rmsnorm_linear (CUDA): sm80 GEMM not built for this dtype");
}
void sm80_gemm_wgrad(DType dtype, const void* dy, const void* xn, void* dw, int64_t n, int64_t k, int64_t m,
                     cudaStream_t s) {
  LLMTRAIN_SM80_DISPATCH(wgrad, dy, xn, dw, n, k, m, s);
  throw std::runtime_error("rmsnorm_linear (CUDA): sm80 GEMM not built for this dtype");
}

}  // namespace rmslin
}  // namespace llmtrain
