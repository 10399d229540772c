#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace llmtrain {
namespace cpu {
namespace {

constexpr int64_t kMR = 4;     // rows per micro-tile
constexpr int64_t kNR = 16;    // columns per micro-tile (one packed panel)
constexpr int64_t kKC = 256;   // depth of a packed block (fits L1/L2 with the A rows)
constexpr int64_t kNC = 1024;  // columns of a packed block

typedef float v8f __attribute__((vector_size(32), aligned(4)));

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define LLMTRAIN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LLMTRAIN_CLONES
#endif

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// acc[mr][16] = sum_k A[r][k] * panel[k][16]; then C[r][0:nr] += acc.
LLMTRAIN_CLONES
void micro_kernel(float* C, int64_t ldc, const float* A, int64_t lda, const float* panel, int64_t kc, int64_t mr,
                  int64_t nr) {
  v8f acc[kMR][2];
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  if (mr == kMR) {
    const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    for (int64_t k = 0; k < kc; ++k) {
      const v8f b0 = load8(panel + k * kNR), b1 = load8(panel + k * kNR + 8);
      const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
      acc[0][0] += x0 * b0; acc[0][1] += x0 * b1;
      acc[1][0] += x1 * b0; acc[1][1] += x1 * b1;
      acc[2][0] += x2 * b0; acc[2][1] += x2 * b1;
      acc[3][0] += x3 * b0; acc[3][1] += x3 * b1;
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      const v8f b0 = load8(panel + k * kNR), b1 = load8(panel + k * kNR + 8);
      for (int64_t r = 0; r < mr; ++r) {
        const float x = A[r * lda + k];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
  }
  for (int64_t r = 0; r < mr; ++r) {
    float tmp[kNR];
    store8(tmp, acc[r][0]);
    store8(tmp + 8, acc[r][1]);
    float* c = C + r * ldc;
    for (int64_t j = 0; j < nr; ++j) c[j] += tmp[j];
  }
}

// Few rows (decoding): one dot product per output, no packing; parallel over outputs when large.
LLMTRAIN_CLONES
void dot_row(float* c, const float* a, const float* w, int64_t K) {
  v8f acc0 = v8f{0, 0, 0, 0, 0, 0, 0, 0}, acc1 = acc0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    acc0 += load8(a + k) * load8(w + k);
    acc1 += load8(a + k + 8) * load8(w + k + 8);
  }
  float tmp[8];
  store8(tmp, acc0 + acc1);
  float s = ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ((tmp[4] + tmp[5]) + (tmp[6] + tmp[7]));
  for (; k < K; ++k) s += a[k] * w[k];
  *c += s;
}

void gemv_bt(float* C, const float* A, const float* W, int64_t rows, int64_t K, int64_t n) {
#pragma omp parallel for schedule(static) if (n * K * rows > (1 << 22))
  for (int64_t o = 0; o < n; ++o)
    for (int64_t r = 0; r < rows; ++r) dot_row(C + r * n + o, A + r * K, W + o * K, K);
}

}  // namespace

void sgemm_acc(float* C, const float* A, const float* B, int64_t rows, int64_t K, int64_t n, bool b_transposed) {
  if (rows <= 0 || K <= 0 || n <= 0) return;
  if (b_transposed && rows < kMR) return gemv_bt(C, A, B, rows, K, n);
  const bool parallel = rows * K * n > (1 << 22);  // ~1 ms of work: below that, threads cost more
  const int64_t nc_max = std::min(kNC, (n + kNR - 1) / kNR * kNR);
  std::vector<float> packed(kKC * nc_max);
  for (int64_t n0 = 0; n0 < n; n0 += kNC) {
    const int64_t nc = std::min(kNC, n - n0);
    const int64_t panels = (nc + kNR - 1) / kNR;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      // Pack B[k0:k0+kc][n0:n0+nc] into panels [panel][k][16], zero-padded at the right edge.
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t p = 0; p < panels; ++p) {
        float* dst = packed.data() + p * kc * kNR;
        const int64_t c0 = n0 + p * kNR, w = std::min(kNR, n0 + nc - c0);
        for (int64_t k = 0; k < kc; ++k) {
          if (b_transposed)
            for (int64_t j = 0; j < w; ++j) dst[k * kNR + j] = B[(c0 + j) * K + k0 + k];
          else
            for (int64_t j = 0; j < w; ++j) dst[k * kNR + j] = B[(k0 + k) * n + c0 + j];
          for (int64_t j = w; j < kNR; ++j) dst[k * kNR + j] = 0.f;
        }
      }
      const int64_t row_tiles = (rows + kMR - 1) / kMR;
#pragma omp parallel for schedule(static) collapse(2) if (parallel)
      for (int64_t rt = 0; rt < row_tiles; ++rt) {
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t r0 = rt * kMR, mr = std::min(kMR, rows - r0);
          const int64_t c0 = n0 + p * kNR, nr = std::min(kNR, n0 + nc - c0);
          micro_kernel(C + r0 * n + c0, n, A + r0 * K + k0, K, packed.data() + p * kc * kNR, kc, mr, nr);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace llmtrain
