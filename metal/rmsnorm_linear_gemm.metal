// The three GEMMs of the fused RMSNorm + Linear, out[r, c] = sum_l A(r, l) B(l, c), on 16 x 16
// output tiles (one threadgroup of 16 x 16 threads each), with the norm applied while staging:
//   RL_MODE 0 (forward): y[n, m] = sum_k (x[n, k] rstd[n] g[k]) w[m, k] (+ bias[m])   -> in_t
//   RL_MODE 1 (dxn):     dxn[n, k] = sum_m dy[n, m] w[m, k]                           -> float
//   RL_MODE 2 (dW):      dw[m, k] = sum_n dy[n, m] (x[n, k] rstd[n] g[k])            -> in_t
// RL_ROWS, RL_COLS, RL_INNER are the output rows, output columns and the summed length.
threadgroup float as[16 * 16];
threadgroup float bs[16 * 16];
const int tx = int(thread_position_in_threadgroup.x);
const int ty = int(thread_position_in_threadgroup.y);
const int col = int(threadgroup_position_in_grid.x) * 16 + tx;
const int row = int(threadgroup_position_in_grid.y) * 16 + ty;
float acc = 0.0f;
for (int l0 = 0; l0 < RL_INNER; l0 += 16) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // as[ty][tx] = A(row, l0 + tx);  bs[ty][tx] = B(l0 + ty, col)
  const int la = l0 + tx;
  const int lb = l0 + ty;
  float av = 0.0f;
  float bv = 0.0f;
#if RL_MODE == 0
  if (row < RL_ROWS && la < RL_INNER) av = float(x[size_t(row) * RL_K + la]) * rstd[row] * float(g[la]);
  if (col < RL_COLS && lb < RL_INNER) bv = float(w[size_t(col) * RL_K + lb]);
#elif RL_MODE == 1
  if (row < RL_ROWS && la < RL_INNER) av = float(dy[size_t(row) * RL_M + la]);
  if (col < RL_COLS && lb < RL_INNER) bv = float(w[size_t(lb) * RL_K + col]);
#else
  if (row < RL_ROWS && la < RL_INNER) av = float(dy[size_t(la) * RL_M + row]);
  if (col < RL_COLS && lb < RL_INNER) bv = float(x[size_t(lb) * RL_K + col]) * rstd[lb] * float(g[col]);
#endif
  as[ty * 16 + tx] = av;
  bs[ty * 16 + tx] = bv;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int l = 0; l < 16; ++l) {
    acc += as[ty * 16 + l] * bs[l * 16 + tx];
  }
}
if (row < RL_ROWS && col < RL_COLS) {
#if RL_MODE == 0
#if RL_HAS_BIAS
  acc += float(bias[col]);
#endif
  out[size_t(row) * RL_COLS + col] = in_t(acc);
#elif RL_MODE == 1
  out[size_t(row) * RL_COLS + col] = acc;
#else
  out[size_t(row) * RL_COLS + col] = in_t(acc);
#endif
}
