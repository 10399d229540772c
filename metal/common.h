// Shared helpers for the llmtrain Metal kernels (passed to mx.fast.metal_kernel as the `header`,
// after the per-configuration #defines that llmtrain/mlx/ops/_kernels.py generates).
//
// Restricted dialect (so the same text also compiles as C++20 in tests/mlx/msl_harness and as
// C++ for OpenCL in the clang syntax check): no templates, threadgroup arrays are declared only
// at kernel scope as `threadgroup T name[N];`, threadgroup memory is never passed by pointer,
// simd_* reductions are called in uniform control flow, and barriers are reached by every thread.

// Index of the feature (a, b), a <= b, in the row-major upper triangle of a d x d matrix.
inline int pr_feature(int a, int b, int d) { return a * d - (a * (a - 1)) / 2 + (b - a); }

// Inverse of pr_feature: the pair (a, b) of feature f.
inline void pr_pair(int f, int d, thread int& a, thread int& b) {
  int row = 0;
  int start = 0;
  while (start + (d - row) <= f) {
    start += d - row;
    row += 1;
  }
  a = row;
  b = row + (f - start);
}

#define PR_SQRT2 1.41421356237309515f
