// Chunk outputs of gated power retention (forward), one threadgroup per (chunk, batch * query head):
//   num_i = sum_{j<=i in chunk} (s q_i . k_j)^2 exp(g_i - g_j) [v_j, 1] + exp(g_i) phi(s q_i)^T [S, z]_n
//   y_i = num_i[:d] / num_i[d],  den_i = num_i[d] (saved for the backward).
// q [B, T, HQ, D], k, v [B, T, HK, D] (in_t); gc [B, T, HK] float: the within-chunk inclusive
// cumulative gate; states [B, HK, NC + 1, DF, E] float: the state entering each chunk (unused
// for chunk 0 when PR_FIRST_STATE is 0). Outputs y [B, T, HQ, D] (in_t), den [B, T, HQ] float.
// Phases, separated by barriers: stage the chunk's scaled q, k, v and gate; weights w_ij;
// normaliser per row; outputs per (row, column).
threadgroup float qs[PR_C * PR_D];
threadgroup float ks[PR_C * PR_D];
threadgroup float vs[PR_C * PR_D];
threadgroup float ws[PR_C * PR_C];
threadgroup float gs[PR_C];
threadgroup float dens[PR_C];

const int tid = int(thread_position_in_threadgroup.x);
const int n = int(threadgroup_position_in_grid.y);
const int bhq = int(threadgroup_position_in_grid.z);
const int bi = bhq / PR_HQ;
const int hq = bhq % PR_HQ;
const int h = hq / PR_R;
const int t0 = n * PR_C;
const int len = min(PR_C, PR_T - t0);
const bool use_state = PR_FIRST_STATE || n > 0;
const device float* S = states + (size_t(bi * PR_HK + h) * (PR_NC + 1) + n) * (PR_DF * PR_E);

for (int i = tid; i < PR_C * PR_D; i += PR_TG) {
  const int r = i / PR_D;
  const int col = i % PR_D;
  const bool in = r < len;
  const size_t kv = ((size_t(bi) * PR_T + t0 + r) * PR_HK + h) * PR_D + col;
  qs[i] = in ? PR_SCALE * float(q[((size_t(bi) * PR_T + t0 + r) * PR_HQ + hq) * PR_D + col]) : 0.0f;
  ks[i] = in ? float(k[kv]) : 0.0f;
  vs[i] = in ? float(v[kv]) : 0.0f;
}
for (int i = tid; i < PR_C; i += PR_TG) {
  gs[i] = (PR_GATED && i < len) ? gc[(size_t(bi) * PR_T + t0 + i) * PR_HK + h] : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

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
  ws[idx] = w;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int i = tid; i < len; i += PR_TG) {
  float den = 0.0f;
  for (int j = 0; j <= i; ++j) {
    den += ws[i * PR_C + j];
  }
  if (use_state) {
    float sd = 0.0f;
    int fi = 0;
    for (int a = 0; a < PR_D; ++a) {
      const float qa = qs[i * PR_D + a];
      sd += qa * qa * S[fi * PR_E + PR_D];
      fi += 1;
      const float qa2 = PR_SQRT2 * qa;
      for (int b = a + 1; b < PR_D; ++b) {
        sd += qa2 * qs[i * PR_D + b] * S[fi * PR_E + PR_D];
        fi += 1;
      }
    }
    den += (PR_GATED ? metal::exp(gs[i]) : 1.0f) * sd;
  }
  dens[i] = den;
  den_out[(size_t(bi) * PR_T + t0 + i) * PR_HQ + hq] = den;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int idx = tid; idx < PR_C * PR_D; idx += PR_TG) {
  const int i = idx / PR_D;
  const int col = idx % PR_D;
  if (i < len) {
    float num = 0.0f;
    for (int j = 0; j <= i; ++j) {
      num += ws[i * PR_C + j] * vs[j * PR_D + col];
    }
    if (use_state) {
      float sn = 0.0f;
      int fi = 0;
      for (int a = 0; a < PR_D; ++a) {
        const float qa = qs[i * PR_D + a];
        sn += qa * qa * S[fi * PR_E + col];
        fi += 1;
        const float qa2 = PR_SQRT2 * qa;
        for (int b = a + 1; b < PR_D; ++b) {
          sn += qa2 * qs[i * PR_D + b] * S[fi * PR_E + col];
          fi += 1;
        }
      }
      num += (PR_GATED ? metal::exp(gs[i]) : 1.0f) * sn;
    }
    y[((size_t(bi) * PR_T + t0 + i) * PR_HQ + hq) * PR_D + col] = in_t(num / dens[i]);
  }
}
