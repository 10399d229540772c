// Fused RMSNorm + Linear on the CPU: y = (x * rstd * g) W^T + bias, rstd = 1/sqrt(mean(x^2) + eps).
// Forward keeps rstd per row for the backward. Accumulation in float32 (float64 for float64).
#include <cmath>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "common.h"
#include "gemm.h"

namespace llmtrain {
namespace {

// out += coef * B: the packed micro-kernel for float, the plain tiled loop otherwise.
inline void gemm(float* out, const float* coef, const float* B, int64_t rows, int64_t K, int64_t n) {
  cpu::sgemm_acc(out, coef, B, rows, K, n);
}
inline void gemm(double* out, const double* coef, const double* B, int64_t rows, int64_t K, int64_t n) {
  cpu::gemm_acc_tiled(out, coef, B, rows, K, n);
}

using cpu::load;
using cpu::store;

template <typename T, typename A> void forward(const RmsLinFwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  const T *x = static_cast<const T*>(a.x), *g = static_cast<const T*>(a.g), *w = static_cast<const T*>(a.w);
  const T* bias = static_cast<const T*>(a.bias);
  A* rstd = static_cast<A*>(a.rstd);
  T* y = static_cast<T*>(a.y);
  const bool parallel = n * k * m > (1 << 22);  // small calls (decoding) stay on one thread
  std::vector<A> xn(n * k), out(n * m, A(0));
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < n; ++i) {
    A ss = 0;
    for (int64_t c = 0; c < k; ++c) {
      const A v = load<A>(x + i * k + c);
      ss += v * v;
    }
    const A r = A(1) / std::sqrt(ss / A(k) + A(a.dims.eps));
    rstd[i] = r;
    for (int64_t c = 0; c < k; ++c) xn[i * k + c] = load<A>(x + i * k + c) * r * load<A>(g + c);
  }
  if (bias)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < m; ++o) out[i * m + o] = load<A>(bias + o);
  if constexpr (std::is_same_v<T, float>) {
    cpu::sgemm_acc(out.data(), xn.data(), w, n, k, m, /*b_transposed=*/true);  // W read in place
  } else {
    std::vector<A> wt(k * m);
    for (int64_t o = 0; o < m; ++o)
      for (int64_t c = 0; c < k; ++c) wt[c * m + o] = load<A>(w + o * k + c);
    gemm(out.data(), xn.data(), wt.data(), n, k, m);
  }
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < n * m; ++i) store(y + i, out[i]);
}

template <typename T, typename A> void backward(const RmsLinBwdArgs& a) {
  const int64_t n = a.dims.n, k = a.dims.k, m = a.dims.m;
  const T *x = static_cast<const T*>(a.x), *g = static_cast<const T*>(a.g), *w = static_cast<const T*>(a.w);
  const T* dy = static_cast<const T*>(a.dy);
  const A* rstd = static_cast<const A*>(a.rstd);
  std::vector<A> dyA(n * m), dyT(m * n), wA(m * k), xn(n * k), dxn(n * k, A(0)), dW(m * k, A(0));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < m; ++o) {
      const A v = load<A>(dy + i * m + o);
      dyA[i * m + o] = v;
      dyT[o * n + i] = v;
    }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m * k; ++i) wA[i] = load<A>(w + i);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < k; ++c) xn[i * k + c] = load<A>(x + i * k + c) * rstd[i] * load<A>(g + c);
  gemm(dxn.data(), dyA.data(), wA.data(), n, m, k);  // dxn = dy W
  gemm(dW.data(), dyT.data(), xn.data(), m, n, k);   // dW = dy^T xn
  T* dw = static_cast<T*>(a.dw);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m * k; ++i) store(dw + i, dW[i]);
  if (a.dbias) {
    T* db = static_cast<T*>(a.dbias);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < m; ++o) {
      A s = 0;
      for (int64_t i = 0; i < n; ++i) s += dyT[o * n + i];
      store(db + o, s);
    }
  }
  // dg_c = sum_i dxn_ic x_ic rstd_i; dx_i = rstd_i (dxn_i * g) - rstd_i^3 / k * x_i * sum_c(dxn_ic g_c x_ic)
  std::vector<A> dgA(k, A(0)), gA(k);
  for (int64_t c = 0; c < k; ++c) gA[c] = load<A>(g + c);
  T* dx = static_cast<T*>(a.dx);
#pragma omp parallel
  {
    std::vector<A> part(k, A(0));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const A r = rstd[i];
      A proj = 0;
      for (int64_t c = 0; c < k; ++c) {
        const A xv = load<A>(x + i * k + c);
        part[c] += dxn[i * k + c] * xv * r;
        proj += dxn[i * k + c] * gA[c] * xv;
      }
      const A coef = r * r * r * proj / A(k);
      for (int64_t c = 0; c < k; ++c)
        store(dx + i * k + c, r * dxn[i * k + c] * gA[c] - coef * load<A>(x + i * k + c));
    }
#pragma omp critical
    for (int64_t c = 0; c < k; ++c) dgA[c] += part[c];
  }
  T* dg = static_cast<T*>(a.dg);
  for (int64_t c = 0; c < k; ++c) store(dg + c, dgA[c]);
}

}  // namespace

void rmsnorm_linear_fwd_cpu(const RmsLinFwdArgs& a) {
  cpu::dispatch_storage(a.dims.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) forward<T, double>(a);
    else forward<T, float>(a);
  });
}

void rmsnorm_linear_bwd_cpu(const RmsLinBwdArgs& a) {
  cpu::dispatch_storage(a.dims.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) backward<T, double>(a);
    else backward<T, float>(a);
  });
}

}  // namespace llmtrain
