// rstd_i = 1 / sqrt(mean_c x_ic^2 + eps), one threadgroup of RL_TG (a multiple of 32) threads per row:
// strided partial sums, simd_sum within each simdgroup, then a threadgroup pass.
// x [N, K] (in_t) -> rstd [N] float.
threadgroup float part[RL_TG / 32];
const int tid = int(thread_position_in_threadgroup.x);
const int row = int(threadgroup_position_in_grid.y);
float ss = 0.0f;
for (int c = tid; c < RL_K; c += RL_TG) {
  const float xv = float(x[size_t(row) * RL_K + c]);
  ss += xv * xv;
}
const float total = simd_sum(ss);
if (int(thread_index_in_simdgroup) == 0) {
  part[int(simdgroup_index_in_threadgroup)] = total;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid == 0) {
  float sum = 0.0f;
  for (int w = 0; w < RL_TG / 32; ++w) {
    sum += part[w];
  }
  rstd[row] = metal::rsqrt(sum / float(RL_K) + RL_EPS);
}
