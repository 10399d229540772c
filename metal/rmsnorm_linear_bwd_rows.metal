// dx of the fused RMSNorm + Linear from dxn = dy W (float), one threadgroup per row:
//   dx_i = rstd_i (dxn_i * g) - rstd_i^3 / K * x_i * sum_c dxn_ic g_c x_ic
// x [N, K], g [K] (in_t), rstd [N], dxn [N, K] float -> dx [N, K] in_t.
threadgroup float part[RL_TG / 32];
threadgroup float dot_all;
const int tid = int(thread_position_in_threadgroup.x);
const int row = int(threadgroup_position_in_grid.y);
const size_t base = size_t(row) * RL_K;
float s = 0.0f;
for (int c = tid; c < RL_K; c += RL_TG) {
  s += dxn[base + c] * float(g[c]) * float(x[base + c]);
}
const float total = simd_sum(s);
if (int(thread_index_in_simdgroup) == 0) {
  part[int(simdgroup_index_in_threadgroup)] = total;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid == 0) {
  float sum = 0.0f;
  for (int w = 0; w < RL_TG / 32; ++w) {
    sum += part[w];
  }
  dot_all = sum;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float r = rstd[row];
const float coef = r * r * r / float(RL_K) * dot_all;
for (int c = tid; c < RL_K; c += RL_TG) {
  dx[base + c] = in_t(r * dxn[base + c] * float(g[c]) - coef * float(x[base + c]));
}
