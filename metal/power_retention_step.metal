// Recurrent decode step of gated power retention: per token t (usually one),
//   [S, z] <- exp(log_g_t) [S, z] + phi(k_t) [v_t, 1]^T;   numden_t = phi(s q_t)^T [S, z] per query head.
// One threadgroup per (state column c, batch * kv head); its PR_TG threads own features
// f = tid, tid + PR_TG, ... of column c, update them in place in s_out, and reduce
// phi(q)_f S[f, c] over f with simd_sum and a threadgroup pass. The caller divides
// numden[..., :D] by numden[..., D].
// q [B, T, HQ, D], k, v [B, T, HK, D] (in_t), lg [B, T, HK] float, s_in [B, HK, DF, E] float.
// Outputs s_out [B, HK, DF, E] float, numden [B, T, HQ, E] float.
threadgroup float xs[PR_D];
threadgroup float part[PR_TG / 32];

const int tid = int(thread_position_in_threadgroup.x);
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int c = int(threadgroup_position_in_grid.y);
const int bh = int(threadgroup_position_in_grid.z);
const int bi = bh / PR_HK;
const int h = bh % PR_HK;
const size_t sbase = size_t(bh) * PR_DF * PR_E;

for (int t = 0; t < PR_T; ++t) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const size_t kv = ((size_t(bi) * PR_T + t) * PR_HK + h) * PR_D;
  for (int x = tid; x < PR_D; x += PR_TG) {
    xs[x] = float(k[kv + x]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float decay = PR_GATED ? metal::exp(lg[(size_t(bi) * PR_T + t) * PR_HK + h]) : 1.0f;
  const float vc = c < PR_D ? float(v[kv + c]) : 1.0f;
  {
    int a = 0;
    int b = 0;
    pr_pair(min(tid, PR_DF - 1), PR_D, a, b);
    for (int f = tid; f < PR_DF; f += PR_TG) {
      const size_t o = sbase + size_t(f) * PR_E + c;
      const float prev = t == 0 ? s_in[o] : s_out[o];
      s_out[o] = decay * prev + (a == b ? 1.0f : PR_SQRT2) * xs[a] * xs[b] * vc;
      b += PR_TG;
      while (b >= PR_D && a < PR_D - 1) {
        a += 1;
        b = b - PR_D + a;
      }
    }
  }
  for (int rr = 0; rr < PR_R; ++rr) {
    const int hq = h * PR_R + rr;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int x = tid; x < PR_D; x += PR_TG) {
      xs[x] = PR_SCALE * float(q[((size_t(bi) * PR_T + t) * PR_HQ + hq) * PR_D + x]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float partial = 0.0f;
    int a = 0;
    int b = 0;
    pr_pair(min(tid, PR_DF - 1), PR_D, a, b);
    for (int f = tid; f < PR_DF; f += PR_TG) {
      partial += (a == b ? 1.0f : PR_SQRT2) * xs[a] * xs[b] * s_out[sbase + size_t(f) * PR_E + c];
      b += PR_TG;
      while (b >= PR_D && a < PR_D - 1) {
        a += 1;
        b = b - PR_D + a;
      }
    }
    const float total = simd_sum(partial);
    if (lane == 0) {
      part[sg] = total;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
      float sum = 0.0f;
      for (int w = 0; w < PR_TG / 32; ++w) {
        sum += part[w];
      }
      numden[((size_t(bi) * PR_T + t) * PR_HQ + hq) * PR_E + c] = sum;
    }
  }
}
