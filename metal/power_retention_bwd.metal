// Chunk gradients of gated power retention, one threadgroup per (chunk, batch * kv head); the
// PR_R query heads of the kv head (GQA) are looped so dk and dv are summed without atomics.
// With s q pre-scaled, ghat_i = [dy_i / den_i, -(dy_i . y_i) / den_i] (E values, computed by the
// caller), a_ij = s q_i . k_j, e_ij = exp(g_i - g_j), w_ij = a_ij^2 e_ij:
//   dw_ij = ghat_i . vhat_j,  da_ij = 2 a_ij e_ij dw_ij
//   dq_i = s (sum_j da_ij k_j + J_phi(s q_i)^T u_i),  u_i = exp(g_i) [S, z]_n ghat_i
//   dk_j = sum_i da_ij s q_i + J_phi(k_j)^T (c_j dS vhat_j),  c_j = exp(Gt - g_j)
//   dv_j = sum_i w_ij ghat_i[:d] + c_j phi(k_j)^T dS[:, :d]
// where dS = dLoss/d(state leaving the chunk) = dstates[n + 1]. Each (row, column) entry of
// dk and dv is owned by one thread for the whole kernel, which accumulates it in device memory.
// q [B, T, HQ, D], k, v [B, T, HK, D] (in_t); gc [B, T, HK], gh [B, T, HQ, E],
// states / dstates [B, HK, NC + 1, DF, E] float. Outputs dq [B, T, HQ, D], dk, dv [B, T, HK, D] float.
threadgroup float qs[PR_C * PR_D];
threadgroup float ks[PR_C * PR_D];
threadgroup float ghs[PR_C * PR_E];
threadgroup float ms[PR_C * PR_C];
threadgroup float gs[PR_C];

const int tid = int(thread_position_in_threadgroup.x);
const int n = int(threadgroup_position_in_grid.y);
const int bh = int(threadgroup_position_in_grid.z);
const int bi = bh / PR_HK;
const int h = bh % PR_HK;
const int t0 = n * PR_C;
const int len = min(PR_C, PR_T - t0);
const bool use_state = PR_FIRST_STATE || n > 0;
const bool use_dstate = PR_FINAL_DS || n + 1 < PR_NC;
const size_t state_base = size_t(bi * PR_HK + h) * (PR_NC + 1);
const device float* S = states + (state_base + n) * (PR_DF * PR_E);
const device float* dS = dstates + (state_base + n + 1) * (PR_DF * PR_E);

for (int i = tid; i < PR_C * PR_D; i += PR_TG) {
  const int r = i / PR_D;
  const int col = i % PR_D;
  ks[i] = r < len ? float(k[((size_t(bi) * PR_T + t0 + r) * PR_HK + h) * PR_D + col]) : 0.0f;
  if (r < len) {
    dk[((size_t(bi) * PR_T + t0 + r) * PR_HK + h) * PR_D + col] = 0.0f;
    dv[((size_t(bi) * PR_T + t0 + r) * PR_HK + h) * PR_D + col] = 0.0f;
  }
}
for (int i = tid; i < PR_C; i += PR_TG) {
  gs[i] = (PR_GATED && i < len) ? gc[(size_t(bi) * PR_T + t0 + i) * PR_HK + h] : 0.0f;
}

for (int rr = 0; rr < PR_R; ++rr) {
  const int hq = h * PR_R + rr;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < PR_C * PR_D; i += PR_TG) {
    const int r = i / PR_D;
    const int col = i % PR_D;
    qs[i] = r < len ? PR_SCALE * float(q[((size_t(bi) * PR_T + t0 + r) * PR_HQ + hq) * PR_D + col]) : 0.0f;
  }
  for (int i = tid; i < PR_C * PR_E; i += PR_TG) {
    const int r = i / PR_E;
    const int col = i % PR_E;
    ghs[i] = r < len ? gh[((size_t(bi) * PR_T + t0 + r) * PR_HQ + hq) * PR_E + col] : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // da_ij
  for (int idx = tid; idx < PR_C * PR_C; idx += PR_TG) {
    const int i = idx / PR_C;
    const int j = idx % PR_C;
    float da = 0.0f;
    if (j <= i && i < len) {
      float a = 0.0f;
      for (int x = 0; x < PR_D; ++x) {
        a += qs[i * PR_D + x] * ks[j * PR_D + x];
      }
      const device in_t* vj = v + ((size_t(bi) * PR_T + t0 + j) * PR_HK + h) * PR_D;
      float dw = ghs[i * PR_E + PR_D];
      for (int x = 0; x < PR_D; ++x) {
        dw += ghs[i * PR_E + x] * float(vj[x]);
      }
      da = 2.0f * a * dw;
      if (PR_GATED) {
        da *= metal::exp(gs[i] - gs[j]);
      }
    }
    ms[idx] = da;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // dq (intra-chunk and state query) and the intra-chunk part of dk
  for (int idx = tid; idx < PR_C * PR_D; idx += PR_TG) {
    const int i = idx / PR_D;
    const int x = idx % PR_D;
    if (i < len) {
      float acc = 0.0f;
      for (int j = 0; j <= i; ++j) {
        acc += ms[i * PR_C + j] * ks[j * PR_D + x];
      }
      if (use_state) {
        float js = 0.0f;
        for (int b = 0; b < PR_D; ++b) {
          const int lo = min(x, b);
          const int hi = max(x, b);
          const device float* Sf = S + pr_feature(lo, hi, PR_D) * PR_E;
          float u = 0.0f;
          for (int col = 0; col < PR_E; ++col) {
            u += Sf[col] * ghs[i * PR_E + col];
          }
          js += (b == x ? 2.0f : PR_SQRT2) * qs[i * PR_D + b] * u;
        }
        acc += (PR_GATED ? metal::exp(gs[i]) : 1.0f) * js;
      }
      dq[((size_t(bi) * PR_T + t0 + i) * PR_HQ + hq) * PR_D + x] = PR_SCALE * acc;
      // row i of dk in the same (row, column) ownership: dk_i += sum_{r >= i} da_ri q_r
      float dki = 0.0f;
      for (int r = i; r < len; ++r) {
        dki += ms[r * PR_C + i] * qs[r * PR_D + x];
      }
      dk[((size_t(bi) * PR_T + t0 + i) * PR_HK + h) * PR_D + x] += dki;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // w_ij, then dv_j += sum_i w_ij ghat_i[:d]
  for (int idx = tid; idx < PR_C * PR_C; idx += PR_TG) {
    const int i = idx / PR_C;
    const int j = idx % PR_C;
    float w = 0.0f;
    if (j <= i && i < len) {
      float a = 0.0f;
      for (int x = 0; x < PR_D; ++x) {
        a += qs[i * PR_D + x] * ks[j * PR_D + x];
      }
      w = a * a;
      if (PR_GATED) {
        w *= metal::exp(gs[i] - gs[j]);
      }
    }
    ms[idx] = w;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int idx = tid; idx < PR_C * PR_D; idx += PR_TG) {
    const int j = idx / PR_D;
    const int x = idx % PR_D;
    if (j < len) {
      float acc = 0.0f;
      for (int i = j; i < len; ++i) {
        acc += ms[i * PR_C + j] * ghs[i * PR_E + x];
      }
      dv[((size_t(bi) * PR_T + t0 + j) * PR_HK + h) * PR_D + x] += acc;
    }
  }
}

// State update: stage v in qs (free now), then dk and dv from dS.
if (use_dstate) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < PR_C * PR_D; i += PR_TG) {
    const int r = i / PR_D;
    const int col = i % PR_D;
    qs[i] = r < len ? float(v[((size_t(bi) * PR_T + t0 + r) * PR_HK + h) * PR_D + col]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float Gt = gs[len - 1];
  for (int idx = tid; idx < PR_C * PR_D; idx += PR_TG) {
    const int j = idx / PR_D;
    const int x = idx % PR_D;
    if (j < len) {
      const float cj = PR_GATED ? metal::exp(Gt - gs[j]) : 1.0f;
      // dv_j[x] += c_j phi(k_j) . dS[:, x]
      float sv = 0.0f;
      int fi = 0;
      for (int a = 0; a < PR_D; ++a) {
        const float ka = ks[j * PR_D + a];
        sv += ka * ka * dS[fi * PR_E + x];
        fi += 1;
        const float ka2 = PR_SQRT2 * ka;
        for (int b = a + 1; b < PR_D; ++b) {
          sv += ka2 * ks[j * PR_D + b] * dS[fi * PR_E + x];
          fi += 1;
        }
      }
      // dk_j[x] += (J_phi(k_j)^T u)_x,  u_f = c_j dS[f] . vhat_j
      float js = 0.0f;
      for (int b = 0; b < PR_D; ++b) {
        const device float* dSf = dS + pr_feature(min(x, b), max(x, b), PR_D) * PR_E;
        float u = dSf[PR_D];
        for (int col = 0; col < PR_D; ++col) {
          u += dSf[col] * qs[j * PR_D + col];
        }
        js += (b == x ? 2.0f : PR_SQRT2) * ks[j * PR_D + b] * u;
      }
      const size_t o = ((size_t(bi) * PR_T + t0 + j) * PR_HK + h) * PR_D + x;
      dv[o] += cj * sv;
      dk[o] += cj * js;
    }
  }
}
