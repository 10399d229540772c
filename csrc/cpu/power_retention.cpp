// Chunked gated power retention (deg 2) on the CPU: forward, backward and recurrent step.
//
// One task per (batch, KV head), run in parallel with OpenMP; the query heads that share the
// KV head (GQA) are processed together so the state is built once. The state S [D, d] and the
// sum of keys z [D] are held fused as one [D, d+1] matrix: the normaliser is the value GEMM's
// extra column (v_hat = [v, 1]). Accumulation is in float32 (float64 for float64 inputs).
//
// Per chunk, with g the within-chunk inclusive cumulative gate and Gt = g[last]:
//   num/den_i = sum_{j<=i in chunk} (q_i.k_j)^2 exp(g_i - g_j) v_hat_j + exp(g_i) phi(q_i)^T S_prev
//   S_next    = exp(Gt) S_prev + sum_j exp(Gt - g_j) phi(k_j) v_hat_j^T
// (q pre-multiplied by the scale). Backward recomputes chunk-start states, then walks chunks
// in reverse carrying dS. The gate gradient uses homogeneity: w_ij is of degree 2 in q_i and in
// k_j, so dG_i = (sum_heads q_i.dq_i - k_i.dk_i) / 2, plus <dS_T, S_T> at the last position.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "common.h"

namespace llmtrain {
namespace {

using cpu::gemm_acc;
using cpu::load;
using cpu::store;
using cpu::transpose;
using cpu::dot;

constexpr double kSqrt2 = 1.4142135623730951;

// phi(x): x_a * x_b * (a == b ? 1 : sqrt 2) over the upper triangle, row-major.
template <typename A> void sym_features(A* out, const A* x, int64_t d) {
  int64_t m = 0;
  for (int64_t a = 0; a < d; ++a) {
    out[m++] = x[a] * x[a];
    const A xa = x[a] * A(kSqrt2);
    for (int64_t b = a + 1; b < d; ++b) out[m++] = xa * x[b];
  }
}

// dx += J_phi(x)^T u
template <typename A> void sym_features_backward(A* dx, const A* u, const A* x, int64_t d) {
  int64_t m = 0;
  for (int64_t a = 0; a < d; ++a) {
    A acc = A(2) * x[a] * u[m++];
    for (int64_t b = a + 1; b < d; ++b, ++m) {
      const A wu = A(kSqrt2) * u[m];
      acc += wu * x[b];
      dx[b] += wu * x[a];
    }
    dx[a] += acc;
  }
}

// Per-task scratch for one chunk of one KV head and its r query heads.
template <typename A> struct ChunkBuffers {
  int64_t r, C, d, D, e;
  std::vector<A> q, k, kT, vhat, vhatT, g, phi_q, phi_k, tmp;
  std::vector<A> score, decay, w, dw;  // one row of the intra-chunk attention
  ChunkBuffers(int64_t r_, int64_t C_, int64_t d_, int64_t D_)
      : r(r_), C(C_), d(d_), D(D_), e(d_ + 1),
        q(r_ * C_ * d_), k(C_ * d_), kT(d_ * C_), vhat(C_ * (d_ + 1)), vhatT((d_ + 1) * C_), g(C_),
        phi_q(r_ * C_ * D_), phi_k(C_ * D_), tmp(std::max(C_ * D_, r_ * C_ * D_)),
        score(C_), decay(C_), w(C_), dw(C_) {}

  // score[j] = q_i . k_j and decay[j] = exp(g_i - g_j) for j <= i (axpy form: vectorises).
  void attention_row(const A* qi, int64_t i, bool gated) {
    const int64_t n = i + 1;
    std::fill(score.begin(), score.begin() + n, A(0));
    for (int64_t x = 0; x < d; ++x) {
      const A qx = qi[x];
      const A* kx = kT.data() + x * C;
      for (int64_t j = 0; j < n; ++j) score[j] += qx * kx[j];
    }
    if (gated)
      for (int64_t j = 0; j < n; ++j) decay[j] = std::exp(g[i] - g[j]);
    else
      std::fill(decay.begin(), decay.begin() + n, A(1));
  }
};

template <typename A> struct Layout {
  const RetentionDims& m;
  int64_t r() const { return m.hq / m.hk; }
  // element offsets
  int64_t q_off(int64_t bi, int64_t ti, int64_t hqi) const { return ((bi * m.t + ti) * m.hq + hqi) * m.d; }
  int64_t kv_off(int64_t bi, int64_t ti, int64_t hki) const { return ((bi * m.t + ti) * m.hk + hki) * m.d; }
  int64_t g_off(int64_t bi, int64_t ti, int64_t hki) const { return (bi * m.t + ti) * m.hk + hki; }
};

// Load chunk [t0, t0+c) of one (batch, KV head): pre-scaled queries for the r heads, keys,
// v_hat = [v, 1], and the within-chunk inclusive cumulative gate.
template <typename A, typename T>
void load_chunk(ChunkBuffers<A>& B, const RetentionDims& m, const T* q, const T* k, const T* v,
                const A* log_g, int64_t bi, int64_t h, int64_t t0, int64_t c) {
  const Layout<A> L{m};
  const int64_t d = m.d, e = d + 1, r = L.r();
  const A scale = A(m.scale);
  for (int64_t j = 0; j < c; ++j) {
    const T* kp = k + L.kv_off(bi, t0 + j, h);
    const T* vp = v + L.kv_off(bi, t0 + j, h);
    for (int64_t x = 0; x < d; ++x) {
      B.k[j * d + x] = load<A>(kp + x);
      B.vhat[j * e + x] = load<A>(vp + x);
    }
    B.vhat[j * e + d] = A(1);
    for (int64_t rr = 0; rr < r; ++rr) {
      const T* qp = q + L.q_off(bi, t0 + j, h * r + rr);
      A* qd = B.q.data() + (rr * B.C + j) * d;
      for (int64_t x = 0; x < d; ++x) qd[x] = scale * load<A>(qp + x);
    }
  }
  for (int64_t x = 0; x < d; ++x)
    for (int64_t j = 0; j < c; ++j) B.kT[x * B.C + j] = B.k[j * d + x];
  for (int64_t x = 0; x < e; ++x)
    for (int64_t j = 0; j < c; ++j) B.vhatT[x * B.C + j] = B.vhat[j * e + x];
  A run = 0;
  for (int64_t j = 0; j < c; ++j) {
    if (log_g) run += log_g[L.g_off(bi, t0 + j, h)];
    B.g[j] = run;
  }
}

// Intra-chunk numerator/denominator plus the state query, for all r*c queries: acc [r*C][e].
// With S == nullptr (no state yet: first chunk, no initial state) the state query is skipped.
template <typename A>
void chunk_outputs(ChunkBuffers<A>& B, const A* S, int64_t c, bool gated, std::vector<A>& acc) {
  const int64_t d = B.d, e = B.e, D = B.D;
  std::fill(acc.begin(), acc.end(), A(0));
  for (int64_t rr = 0; rr < B.r; ++rr) {
    for (int64_t i = 0; i < c; ++i) {
      const A* qi = B.q.data() + (rr * B.C + i) * d;
      A* out = acc.data() + (rr * B.C + i) * e;
      B.attention_row(qi, i, gated);
      for (int64_t j = 0; j <= i; ++j) {
        const A w = B.score[j] * B.score[j] * B.decay[j];
        const A* vj = B.vhat.data() + j * e;
        for (int64_t x = 0; x < e; ++x) out[x] += w * vj[x];
      }
      if (!S) continue;
      A* pq = B.phi_q.data() + (rr * B.C + i) * D;
      sym_features(pq, qi, d);
      const A eg = std::exp(B.g[i]);
      for (int64_t x = 0; x < D; ++x) pq[x] *= eg;
    }
    // rows rr*C .. rr*C+c of phi_q (already gated) times S
    if (S) gemm_acc(acc.data() + rr * B.C * e, B.phi_q.data() + rr * B.C * D, S, c, D, e);
  }
}

// S <- exp(Gt) S + sum_j exp(Gt - g_j) phi(k_j) v_hat_j^T; phi_k keeps the decayed features.
template <typename A> void chunk_update_state(ChunkBuffers<A>& B, A* S, int64_t c) {
  const int64_t d = B.d, e = B.e, D = B.D;
  const A Gt = B.g[c - 1];
  for (int64_t j = 0; j < c; ++j) {
    A* pk = B.phi_k.data() + j * D;
    sym_features(pk, B.k.data() + j * d, d);
    const A w = std::exp(Gt - B.g[j]);
    for (int64_t x = 0; x < D; ++x) pk[x] *= w;
  }
  const A eG = std::exp(Gt);
  for (int64_t x = 0; x < D * e; ++x) S[x] *= eG;
  transpose(B.tmp.data(), B.phi_k.data(), c, D);  // [D][c]
  gemm_acc(S, B.tmp.data(), B.vhat.data(), D, c, e);
}

template <typename A>
void load_state(A* S, const A* s0, const A* z0, int64_t D, int64_t d) {
  const int64_t e = d + 1;
  for (int64_t x = 0; x < D; ++x) {
    for (int64_t c = 0; c < d; ++c) S[x * e + c] = s0 ? s0[x * d + c] : A(0);
    S[x * e + d] = z0 ? z0[x] : A(0);
  }
}

template <typename A> void save_state(A* s, A* z, const A* S, int64_t D, int64_t d) {
  const int64_t e = d + 1;
  for (int64_t x = 0; x < D; ++x) {
    if (s)
      for (int64_t c = 0; c < d; ++c) s[x * d + c] = S[x * e + c];
    if (z) z[x] = S[x * e + d];
  }
}

template <typename T, typename A> int64_t forward(const RetentionFwdArgs& a) {
  const RetentionDims& m = a.dims;
  const Layout<A> L{m};
  const int64_t r = L.r(), d = m.d, e = d + 1, D = m.D;
  const int64_t C = std::max<int64_t>(1, std::min<int64_t>(m.chunk, std::max<int64_t>(m.t, 1)));
  const T *q = static_cast<const T*>(a.q), *k = static_cast<const T*>(a.k), *v = static_cast<const T*>(a.v);
  const A* log_g = static_cast<const A*>(a.log_g);
  const bool want_state = a.s_out != nullptr;
  T* y = static_cast<T*>(a.y);
  int64_t nonfinite = 0;
  const int64_t tasks = m.b * m.hk;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : nonfinite)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t bi = task / m.hk, h = task % m.hk;
    ChunkBuffers<A> B(r, C, d, D);
    std::vector<A> S(D * e), acc(r * C * e);
    const int64_t soff = (bi * m.hk + h) * D;
    bool have_state = a.s0 != nullptr;  // S is all zeros until the first update otherwise
    load_state(S.data(), a.s0 ? static_cast<const A*>(a.s0) + soff * d : nullptr,
               a.z0 ? static_cast<const A*>(a.z0) + soff : nullptr, D, d);
    for (int64_t t0 = 0; t0 < m.t; t0 += C) {
      const int64_t c = std::min(C, m.t - t0);
      load_chunk(B, m, q, k, v, log_g, bi, h, t0, c);
      chunk_outputs(B, have_state ? S.data() : nullptr, c, log_g != nullptr, acc);
      for (int64_t rr = 0; rr < r; ++rr)
        for (int64_t i = 0; i < c; ++i) {
          const A* o = acc.data() + (rr * C + i) * e;
          T* yp = y + L.q_off(bi, t0 + i, h * r + rr);
          const A inv = A(1) / o[d];
          for (int64_t x = 0; x < d; ++x) {
            const A val = o[x] * inv;
            if (!std::isfinite(val)) ++nonfinite;
            store(yp + x, val);
          }
        }
      // the state after the last chunk is only needed when the caller asked for it
      if (t0 + c < m.t || want_state) {
        chunk_update_state(B, S.data(), c);
        have_state = true;
      }
    }
    if (want_state)
      save_state(static_cast<A*>(a.s_out) + soff * d, static_cast<A*>(a.z_out) + soff, S.data(), D, d);
  }
  return nonfinite;
}

template <typename T, typename A> void backward(const RetentionBwdArgs& a) {
  const RetentionDims& m = a.dims;
  const Layout<A> L{m};
  const int64_t r = L.r(), d = m.d, e = d + 1, D = m.D;
  const int64_t C = std::max<int64_t>(1, std::min<int64_t>(m.chunk, std::max<int64_t>(m.t, 1)));
  const int64_t nchunks = (m.t + C - 1) / C;
  const T *q = static_cast<const T*>(a.q), *k = static_cast<const T*>(a.k), *v = static_cast<const T*>(a.v);
  const T* dy = static_cast<const T*>(a.dy);
  const A* log_g = static_cast<const A*>(a.log_g);
  const bool gated = log_g != nullptr;
  T *dq = static_cast<T*>(a.dq), *dk = static_cast<T*>(a.dk), *dv = static_cast<T*>(a.dv);
  A* dlog_g = static_cast<A*>(a.dlog_g);
  const A scale = A(m.scale);
  const bool grad_final = a.ds_out != nullptr || a.dz_out != nullptr;
  const bool grad_initial = a.ds0 != nullptr;
  const int64_t tasks = m.b * m.hk;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t bi = task / m.hk, h = task % m.hk;
    const int64_t soff = (bi * m.hk + h) * D;
    ChunkBuffers<A> B(r, C, d, D);
    // Pass 1: the state entering each chunk (and the final one when its gradient is given).
    const int64_t nstates = grad_final ? nchunks + 1 : nchunks;
    std::vector<A> states(std::max<int64_t>(nstates, 1) * D * e);
    const bool initial = a.s0 != nullptr;
    load_state(states.data(), initial ? static_cast<const A*>(a.s0) + soff * d : nullptr,
               initial ? static_cast<const A*>(a.z0) + soff : nullptr, D, d);
    for (int64_t n = 0; n + 1 < nstates; ++n) {
      const int64_t t0 = n * C, c = std::min(C, m.t - t0);
      std::copy(states.begin() + n * D * e, states.begin() + (n + 1) * D * e, states.begin() + (n + 1) * D * e);
      load_chunk(B, m, q, k, v, log_g, bi, h, t0, c);
      chunk_update_state(B, states.data() + (n + 1) * D * e, c);
    }
    // Pass 2: reverse over chunks carrying dS = dLoss/d(state leaving the chunk).
    std::vector<A> dS(D * e), dST(e * D), ST(e * D), acc(r * C * e), ghat(r * C * e);
    std::vector<A> dqs(r * C * d), dkc(C * d), dvhat(C * e), u(C * D), dG(m.t, A(0));
    bool dS_zero = !grad_final;
    if (grad_final) {
      const A* ds_out = a.ds_out ? static_cast<const A*>(a.ds_out) + soff * d : nullptr;
      const A* dz_out = a.dz_out ? static_cast<const A*>(a.dz_out) + soff : nullptr;
      load_state(dS.data(), ds_out, dz_out, D, d);
      if (m.t > 0 && gated) dG[m.t - 1] += dot(dS.data(), states.data() + nchunks * D * e, D * e);
    }
    for (int64_t n = nchunks - 1; n >= 0; --n) {
      const int64_t t0 = n * C, c = std::min(C, m.t - t0);
      const bool has_prev = n > 0 || initial;  // a non-zero state enters this chunk
      const A* Sprev = has_prev ? states.data() + n * D * e : nullptr;
      load_chunk(B, m, q, k, v, log_g, bi, h, t0, c);
      chunk_outputs(B, Sprev, c, gated, acc);  // with a state, also fills phi_q (gated by exp(g_i))
      // ghat_i = [dy_i / den_i, -(dy_i . y_i) / den_i]
      for (int64_t rr = 0; rr < r; ++rr)
        for (int64_t i = 0; i < c; ++i) {
          const A* o = acc.data() + (rr * C + i) * e;
          A* gh = ghat.data() + (rr * C + i) * e;
          const T* dyp = dy + L.q_off(bi, t0 + i, h * r + rr);
          const A inv = A(1) / o[d];
          A dyy = 0;
          for (int64_t x = 0; x < d; ++x) {
            const A g = load<A>(dyp + x);
            gh[x] = g * inv;
            dyy += g * o[x] * inv;
          }
          gh[d] = -dyy * inv;
        }
      std::fill(dqs.begin(), dqs.end(), A(0));
      std::fill(dkc.begin(), dkc.end(), A(0));
      std::fill(dvhat.begin(), dvhat.end(), A(0));
      // Intra-chunk gradients, one query row at a time: w_j = a_j^2 e_j, dw_j = ghat_i . v_hat_j.
      for (int64_t rr = 0; rr < r; ++rr)
        for (int64_t i = 0; i < c; ++i) {
          const A* qi = B.q.data() + (rr * C + i) * d;
          const A* gh = ghat.data() + (rr * C + i) * e;
          A* dqi = dqs.data() + (rr * C + i) * d;
          B.attention_row(qi, i, gated);
          const int64_t nj = i + 1;
          std::fill(B.dw.begin(), B.dw.begin() + nj, A(0));
          for (int64_t x = 0; x < e; ++x) {
            const A gx = gh[x];
            const A* vx = B.vhatT.data() + x * C;
            for (int64_t j = 0; j < nj; ++j) B.dw[j] += gx * vx[j];
          }
          for (int64_t j = 0; j < nj; ++j) {
            const A aij = B.score[j], ex = B.decay[j];
            B.w[j] = aij * aij * ex;
            B.dw[j] = A(2) * aij * ex * B.dw[j];  // now dLoss/d(q_i . k_j)
          }
          for (int64_t j = 0; j < nj; ++j) {
            const A da = B.dw[j];
            const A* kj = B.k.data() + j * d;
            A* dkj = dkc.data() + j * d;
            for (int64_t x = 0; x < d; ++x) {
              dqi[x] += da * kj[x];
              dkj[x] += da * qi[x];
            }
            const A wj = B.w[j];
            A* dvj = dvhat.data() + j * e;
            for (int64_t x = 0; x < e; ++x) dvj[x] += wj * gh[x];
          }
        }
      // State query: u_i = exp(g_i) S_prev ghat_i; dq_i += J_phi^T u_i.
      if (has_prev) {
        transpose(ST.data(), Sprev, D, e);
        for (int64_t rr = 0; rr < r; ++rr) {
          std::fill(u.begin(), u.begin() + c * D, A(0));
          gemm_acc(u.data(), ghat.data() + rr * C * e, ST.data(), c, e, D);
          for (int64_t i = 0; i < c; ++i) {
            const A eg = std::exp(B.g[i]);
            A* ui = u.data() + i * D;
            for (int64_t x = 0; x < D; ++x) ui[x] *= eg;
            sym_features_backward(dqs.data() + (rr * C + i) * d, ui, B.q.data() + (rr * C + i) * d, d);
          }
        }
      }
      const A Gt = B.g[c - 1];
      // State update: dphi_k_j = c_j dS v_hat_j, dv_hat_j += c_j phi(k_j)^T dS (c_j = exp(Gt - g_j)).
      if (!dS_zero) {
        for (int64_t j = 0; j < c; ++j) {
          A* pk = B.phi_k.data() + j * D;
          sym_features(pk, B.k.data() + j * d, d);
          const A w = std::exp(Gt - B.g[j]);
          for (int64_t x = 0; x < D; ++x) pk[x] *= w;  // decayed features
        }
        gemm_acc(dvhat.data(), B.phi_k.data(), dS.data(), c, D, e);
        transpose(dST.data(), dS.data(), D, e);
        std::fill(u.begin(), u.begin() + c * D, A(0));
        gemm_acc(u.data(), B.vhat.data(), dST.data(), c, e, D);
        for (int64_t j = 0; j < c; ++j) {
          const A w = std::exp(Gt - B.g[j]);
          A* uj = u.data() + j * D;
          for (int64_t x = 0; x < D; ++x) uj[x] *= w;
          sym_features_backward(dkc.data() + j * d, uj, B.k.data() + j * d, d);
        }
      }
      // dS_prev = exp(Gt) dS + sum_i exp(g_i) phi(q_i) ghat_i^T, needed by earlier chunks or the
      // initial-state gradient.
      if (n > 0 || grad_initial) {
        if (!has_prev)  // phi_q was not filled by chunk_outputs
          for (int64_t rr = 0; rr < r; ++rr)
            for (int64_t i = 0; i < c; ++i) {
              A* pq = B.phi_q.data() + (rr * C + i) * D;
              sym_features(pq, B.q.data() + (rr * C + i) * d, d);
              const A eg = std::exp(B.g[i]);
              for (int64_t x = 0; x < D; ++x) pq[x] *= eg;
            }
        const A eG = std::exp(Gt);
        if (dS_zero) std::fill(dS.begin(), dS.end(), A(0));
        else
          for (int64_t x = 0; x < D * e; ++x) dS[x] *= eG;
        for (int64_t rr = 0; rr < r; ++rr) {
          transpose(B.tmp.data(), B.phi_q.data() + rr * C * D, c, D);
          gemm_acc(dS.data(), B.tmp.data(), ghat.data() + rr * C * e, D, c, e);
        }
        dS_zero = false;
      }
      // Write gradients; dG_i from homogeneity (degree 2 in q_i and in k_i).
      for (int64_t i = 0; i < c; ++i) {
        A gq = 0;
        for (int64_t rr = 0; rr < r; ++rr) {
          const A* dqi = dqs.data() + (rr * C + i) * d;
          gq += dot(dqi, B.q.data() + (rr * C + i) * d, d);
          T* dqp = dq + L.q_off(bi, t0 + i, h * r + rr);
          for (int64_t x = 0; x < d; ++x) store(dqp + x, dqi[x] * scale);
        }
        const A* dki = dkc.data() + i * d;
        T* dkp = dk + L.kv_off(bi, t0 + i, h);
        T* dvp = dv + L.kv_off(bi, t0 + i, h);
        for (int64_t x = 0; x < d; ++x) {
          store(dkp + x, dki[x]);
          store(dvp + x, dvhat[i * e + x]);
        }
        dG[t0 + i] += (gq - dot(dki, B.k.data() + i * d, d)) / A(2);
      }
    }
    if (gated) {
      A run = 0;
      for (int64_t ti = m.t - 1; ti >= 0; --ti) {
        run += dG[ti];
        dlog_g[L.g_off(bi, ti, h)] = run;
      }
    }
    if (grad_initial) {
      if (dS_zero) std::fill(dS.begin(), dS.end(), A(0));  // t == 0 and no final-state gradient
      save_state(static_cast<A*>(a.ds0) + soff * d, static_cast<A*>(a.dz0) + soff, dS.data(), D, d);
    }
  }
}

template <typename T, typename A> int64_t step(const RetentionStepArgs& a) {
  const RetentionDims& m = a.dims;
  const Layout<A> L{m};
  const int64_t r = L.r(), d = m.d, D = m.D;
  const T *q = static_cast<const T*>(a.q), *k = static_cast<const T*>(a.k), *v = static_cast<const T*>(a.v);
  const A* log_g = static_cast<const A*>(a.log_g);
  T* y = static_cast<T*>(a.y);
  const A scale = A(m.scale);
  int64_t nonfinite = 0;
  const int64_t tasks = m.b * m.hk;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : nonfinite)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t bi = task / m.hk, h = task % m.hk;
    A* S = static_cast<A*>(a.s) + (bi * m.hk + h) * D * d;
    A* z = static_cast<A*>(a.z) + (bi * m.hk + h) * D;
    std::vector<A> x(d), vv(d), phi(D), num(d);
    for (int64_t ti = 0; ti < m.t; ++ti) {
      const A decay = log_g ? std::exp(log_g[L.g_off(bi, ti, h)]) : A(1);
      for (int64_t c = 0; c < d; ++c) {
        x[c] = load<A>(k + L.kv_off(bi, ti, h) + c);
        vv[c] = load<A>(v + L.kv_off(bi, ti, h) + c);
      }
      sym_features(phi.data(), x.data(), d);
      for (int64_t f = 0; f < D; ++f) {
        A* Sf = S + f * d;
        for (int64_t c = 0; c < d; ++c) Sf[c] = decay * Sf[c] + phi[f] * vv[c];
        z[f] = decay * z[f] + phi[f];
      }
      for (int64_t rr = 0; rr < r; ++rr) {
        const T* qp = q + L.q_off(bi, ti, h * r + rr);
        for (int64_t c = 0; c < d; ++c) x[c] = scale * load<A>(qp + c);
        sym_features(phi.data(), x.data(), d);
        std::fill(num.begin(), num.end(), A(0));
        A den = 0;
        for (int64_t f = 0; f < D; ++f) {
          const A pf = phi[f];
          const A* Sf = S + f * d;
          for (int64_t c = 0; c < d; ++c) num[c] += pf * Sf[c];
          den += pf * z[f];
        }
        T* yp = y + L.q_off(bi, ti, h * r + rr);
        for (int64_t c = 0; c < d; ++c) {
          const A val = num[c] / den;
          if (!std::isfinite(val)) ++nonfinite;
          store(yp + c, val);
        }
      }
    }
  }
  return nonfinite;
}

}  // namespace

int64_t power_retention_fwd_cpu(const RetentionFwdArgs& a) {
  return cpu::dispatch_storage(a.dims.dtype, [&](auto* tag) -> int64_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) return forward<T, double>(a);
    else return forward<T, float>(a);
  });
}

void power_retention_bwd_cpu(const RetentionBwdArgs& a) {
  cpu::dispatch_storage(a.dims.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) backward<T, double>(a);
    else backward<T, float>(a);
  });
}

int64_t power_retention_step_cpu(const RetentionStepArgs& a) {
  return cpu::dispatch_storage(a.dims.dtype, [&](auto* tag) -> int64_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, double>) return step<T, double>(a);
    else return step<T, float>(a);
  });
}

}  // namespace llmtrain
