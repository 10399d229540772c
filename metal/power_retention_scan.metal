// Chunk-boundary states of gated power retention, by a scan over time.
//
// Forward (PR_REVERSE 0), per (batch, kv head) and fused-state entry (f, c) of [S, z] [DF, E]:
//   S <- exp(log_g_t) S + phi_f(k_t) vhat_t[c],   out[n] = S entering chunk n, out[NC] = final.
// Reverse (PR_REVERSE 1), the gradient of the state, with ghat the cotangent of [num, den]:
//   D <- exp(log_g_t) (D + sum_heads phi_f(s q_t) ghat_t[c]),  out[NC] = dS_final (the init),
//   out[n] = dLoss/d(state entering chunk n), so out[0] is the initial-state gradient.
// x [B, T, PR_HX, D] (k forward, q reverse), y [B, T, PR_HX, E] float (vhat / ghat),
// lg [B, T, HK] float, init [B, HK, DF, E] float; out [B, HK, NC + 1, DF, E] float.
// Threadgroup: PR_TG entries of one (batch, kv head); tokens are staged PR_TT at a time in
// threadgroup memory (every thread helps load, then all read).
threadgroup float xs[PR_TT * PR_R * PR_D];
threadgroup float ys[PR_TT * PR_R * PR_E];
threadgroup float decay[PR_TT];

const int tid = int(thread_position_in_threadgroup.x);
const int entry = int(threadgroup_position_in_grid.x) * PR_TG + tid;
const int bh = int(threadgroup_position_in_grid.y);
const int bi = bh / PR_HK;
const int h = bh % PR_HK;
const bool valid = entry < PR_DF * PR_E;
const int f = valid ? entry / PR_E : 0;
const int c = valid ? entry % PR_E : 0;
int fa = 0;
int fb = 0;
pr_pair(f, PR_D, fa, fb);
const float fw = (fa == fb ? 1.0f : PR_SQRT2) * PR_XSCALE2;

const int state_size = PR_DF * PR_E;
device float* outp = out + size_t(bh) * (PR_NC + 1) * state_size;
float s = valid ? init[size_t(bh) * state_size + entry] : 0.0f;
if (PR_REVERSE && valid) {
  outp[size_t(PR_NC) * state_size + entry] = s;
}

const int ntiles = (PR_T + PR_TT - 1) / PR_TT;
for (int tile = 0; tile < ntiles; ++tile) {
  const int t0 = PR_REVERSE ? (ntiles - 1 - tile) * PR_TT : tile * PR_TT;
  const int len = min(PR_TT, PR_T - t0);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < PR_TT * PR_R * PR_D; i += PR_TG) {
    const int j = i / (PR_R * PR_D);
    const int rx = i % (PR_R * PR_D);
    const int rr = rx / PR_D;
    const int col = rx % PR_D;
    xs[i] = j < len ? float(x[((size_t(bi) * PR_T + t0 + j) * PR_HX + h * PR_R + rr) * PR_D + col]) : 0.0f;
  }
  for (int i = tid; i < PR_TT * PR_R * PR_E; i += PR_TG) {
    const int j = i / (PR_R * PR_E);
    const int rx = i % (PR_R * PR_E);
    const int rr = rx / PR_E;
    const int col = rx % PR_E;
    ys[i] = j < len ? y[((size_t(bi) * PR_T + t0 + j) * PR_HX + h * PR_R + rr) * PR_E + col] : 0.0f;
  }
  for (int j = tid; j < PR_TT; j += PR_TG) {
    decay[j] = (PR_GATED && j < len) ? metal::exp(lg[(size_t(bi) * PR_T + t0 + j) * PR_HK + h]) : 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int step = 0; step < len; ++step) {
    const int j = PR_REVERSE ? len - 1 - step : step;
    const int t = t0 + j;
    float u = 0.0f;
    for (int rr = 0; rr < PR_R; ++rr) {
      const int xo = (j * PR_R + rr) * PR_D;
      u += xs[xo + fa] * xs[xo + fb] * ys[(j * PR_R + rr) * PR_E + c];
    }
    u *= fw;
    if (PR_REVERSE) {
      s = decay[j] * (s + u);
      if (t % PR_C == 0 && valid) {
        outp[size_t(t / PR_C) * state_size + entry] = s;
      }
    } else {
      if (t % PR_C == 0 && valid) {
        outp[size_t(t / PR_C) * state_size + entry] = s;
      }
      s = decay[j] * s + u;
    }
  }
}
if (!PR_REVERSE && valid) {
  outp[size_t(PR_NC) * state_size + entry] = s;
}
