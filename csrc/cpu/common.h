// Element conversions and small dense loops shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../tensor_view.h"

namespace llmtrain {
namespace cpu {

// Storage types as they sit in memory; bf16 and fp16 are raw 16-bit words.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float to_float(bf16_t h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_t from_float_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

inline float to_float(f16_t h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline f16_t from_float_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};   // NaN
  if (absu >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // overflow to inf
  if (absu < 0x38800000u) {                                          // subnormal or zero
    if (absu < 0x33000000u) return f16_t{uint16_t(sign)};
    uint32_t e = absu >> 23;
    uint32_t man = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t half_man = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return f16_t{uint16_t(sign | half_man)};
  }
  uint32_t h = ((absu >> 13) - ((127 - 15) << 10));
  uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return f16_t{uint16_t(sign | h)};
}

template <typename A> inline A load(const float* p) { return A(*p); }
template <typename A> inline A load(const double* p) { return A(*p); }
template <typename A> inline A load(const bf16_t* p) { return A(to_float(*p)); }
template <typename A> inline A load(const f16_t* p) { return A(to_float(*p)); }

template <typename A> inline void store(float* p, A x) { *p = float(x); }
template <typename A> inline void store(double* p, A x) { *p = double(x); }
template <typename A> inline void store(bf16_t* p, A x) { *p = from_float_bf16(float(x)); }
template <typename A> inline void store(f16_t* p, A x) { *p = from_float_f16(float(x)); }

// Call f with a typed null pointer standing for the storage type of `dtype`.
template <typename F> auto dispatch_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(static_cast<float*>(nullptr));
    case DType::F64: return f(static_cast<double*>(nullptr));
    case DType::BF16: return f(static_cast<bf16_t*>(nullptr));
    case DType::F16: return f(static_cast<f16_t*>(nullptr));
    default: fail("unsupported dtype");
  }
}

// Dense loops on row-major matrices; each inner loop is a contiguous axpy so that the
// compiler vectorises it without reassociating a reduction.

// out[i][:n] += sum_m coef[i][m] * B[m][:n]        (coef [rows][K], B [K][n], out [rows][n])
template <typename A>
inline void gemm_acc(A* out, const A* coef, const A* B, int64_t rows, int64_t K, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    A* o0 = out + (i + 0) * n; A* o1 = out + (i + 1) * n;
    A* o2 = out + (i + 2) * n; A* o3 = out + (i + 3) * n;
    const A* c0 = coef + (i + 0) * K; const A* c1 = coef + (i + 1) * K;
    const A* c2 = coef + (i + 2) * K; const A* c3 = coef + (i + 3) * K;
    for (int64_t m = 0; m < K; ++m) {
      const A* b = B + m * n;
      const A x0 = c0[m], x1 = c1[m], x2 = c2[m], x3 = c3[m];
      for (int64_t c = 0; c < n; ++c) {
        const A bv = b[c];
        o0[c] += x0 * bv; o1[c] += x1 * bv; o2[c] += x2 * bv; o3[c] += x3 * bv;
      }
    }
  }
  for (; i < rows; ++i) {
    A* o = out + i * n;
    const A* ci = coef + i * K;
    for (int64_t m = 0; m < K; ++m) {
      const A* b = B + m * n;
      const A x = ci[m];
      for (int64_t c = 0; c < n; ++c) o[c] += x * b[c];
    }
  }
}

// out[r][c] = in[c][r]
template <typename A>
inline void transpose(A* out, const A* in, int64_t rows_in, int64_t cols_in) {
  for (int64_t r = 0; r < rows_in; ++r)
    for (int64_t c = 0; c < cols_in; ++c) out[c * rows_in + r] = in[r * cols_in + c];
}

template <typename A> inline A dot(const A* a, const A* b, int64_t n) {
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace cpu
}  // namespace llmtrain

namespace llmtrain {
namespace cpu {

// out[rows][n] += coef[rows][K] * B[K][n], tiled so that a tile of B stays in cache while
// blocks of rows stream through it; row blocks run in parallel.
template <typename A>
inline void gemm_acc_tiled(A* out, const A* coef, const A* B, int64_t rows, int64_t K, int64_t n) {
  constexpr int64_t kRowBlock = 16, kKBlock = 128, kNBlock = 512;
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static)
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    const int64_t r0 = rb * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
    for (int64_t n0 = 0; n0 < n; n0 += kNBlock) {
      const int64_t nn = std::min(kNBlock, n - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
        const int64_t kk = std::min(kKBlock, K - k0);
        // A (rows x kk) block of coef times a (kk x nn) block of B
        int64_t i = r0;
        for (; i + 4 <= r1; i += 4) {
          A* o0 = out + (i + 0) * n + n0; A* o1 = out + (i + 1) * n + n0;
          A* o2 = out + (i + 2) * n + n0; A* o3 = out + (i + 3) * n + n0;
          for (int64_t m = k0; m < k0 + kk; ++m) {
            const A* b = B + m * n + n0;
            const A x0 = coef[(i + 0) * K + m], x1 = coef[(i + 1) * K + m];
            const A x2 = coef[(i + 2) * K + m], x3 = coef[(i + 3) * K + m];
            for (int64_t c = 0; c < nn; ++c) {
              const A bv = b[c];
              o0[c] += x0 * bv; o1[c] += x1 * bv; o2[c] += x2 * bv; o3[c] += x3 * bv;
            }
          }
        }
        for (; i < r1; ++i) {
          A* o = out + i * n + n0;
          for (int64_t m = k0; m < k0 + kk; ++m) {
            const A* b = B + m * n + n0;
            const A x = coef[i * K + m];
            for (int64_t c = 0; c < nn; ++c) o[c] += x * b[c];
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace llmtrain
