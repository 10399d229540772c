// C[rows][n] += A[rows][K] * B[K][n] (row-major, contiguous) for float: packed B panels and a
// 4x16 register-blocked micro-kernel written with GCC/Clang vector extensions. On x86-64 Linux
// it is compiled twice (x86-64-v3 with AVX2/FMA, and baseline) and the CPU picks at load time.
#pragma once

#include <cstdint>

namespace llmtrain {
namespace cpu {

// b_transposed: B is stored as [n][K] (e.g. a Linear weight), so C += A * B^T without a copy.
void sgemm_acc(float* C, const float* A, const float* B, int64_t rows, int64_t K, int64_t n,
               bool b_transposed = false);

}  // namespace cpu
}  // namespace llmtrain
