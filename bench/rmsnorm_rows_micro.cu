// Micro-benchmark of the RMSNorm + Linear row kernels alone (session 8): the forward pre-pass
// (rstd and W diag(g)) and the backward row pass (dx in place, xn, dg partials + finish_parts), the
// session-7 kernels (prep_fwd_rows, row_bwd_v3) against the session-8 ones (prep_fwd_s8, row_bwd_s8,
// also with its opt-in L2 prefetch of the next row, LLMTRAIN_RMSLIN_PREFETCH=1),
// with a device-to-device copy of the row pass's byte count as the bandwidth reference. Launches
// and grids as csrc/cuda/rmsnorm_linear.cu makes them (PDL off, fused reduction). Each timed launch
// starts from freshly restored inputs with L2 flushed (a 256 MB write), so the times are
// conservative: in the op, the dgrad GEMM has just written part of dx into L2. Also checks that s7
// and s8 agree bit for bit (rstd, wg, dx, xn always; dg where the two grids are the same).
//
// Build and run (repo root, sm_90a; no torch, no CUTLASS):
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc bench/rmsnorm_rows_micro.cu -o /tmp/rms_rows_micro && /tmp/rms_rows_micro
// Optional arguments: n k m reps (default: the model presets' k at n = 16384, m = k, 30 reps).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/rmsnorm_linear_fast.cuh"

using T = __nv_bfloat16;
using namespace llmtrain::rmslin;

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

__global__ void fill_kernel(T* p, int64_t count, unsigned seed, float scale, float offset) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16_rn(offset + scale * ((float)(h & 0xffffff) / 16777216.f - 0.5f));
  }
}
static void fill(T* p, int64_t count, unsigned seed, float scale, float offset) {
  fill_kernel<<<1024, 256>>>(p, count, seed, scale, offset);
  CK(cudaGetLastError());
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
};

static char* g_flush = nullptr;
static const size_t kFlush = 256ull << 20;

// Median time (us) of `launch` over reps, each after `setup` and an L2 flush (both untimed).
template <class Setup, class Launch> static double time_us(int reps, Setup setup, Launch launch) {
  Timer t;
  std::vector<float> ms;
  for (int i = 0; i < reps + 3; ++i) {
    setup();
    CK(cudaMemsetAsync(g_flush, i & 0xff, kFlush));
    CK(cudaEventRecord(t.a));
    launch();
    CK(cudaEventRecord(t.b));
    CK(cudaEventSynchronize(t.b));
    CK(cudaGetLastError());
    float v = 0.f;
    CK(cudaEventElapsedTime(&v, t.a, t.b));
    if (i >= 3) ms.push_back(v);
  }
  std::sort(ms.begin(), ms.end());
  return 1000.0 * ms[ms.size() / 2];
}

static bool same(const void* a, const void* b, size_t bytes) {
  std::vector<unsigned char> ha(bytes), hb(bytes);
  CK(cudaMemcpy(ha.data(), a, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hb.data(), b, bytes, cudaMemcpyDeviceToHost));
  return std::memcmp(ha.data(), hb.data(), bytes) == 0;
}

using RowFn = void (*)(const T*, const T*, const float*, T*, T*, float*, int64_t, int64_t, T*, unsigned*, int);
struct RowPick {
  RowFn fn;
  int w;
  size_t smem;
  int max_bpsm;
};
// The same picks as rmsnorm_linear.cu (pick_row_bwd_v3 / pick_row_bwd_s8), k <= 8192.
static RowPick pick_s7(int64_t k) {
  const int64_t k8 = k / 8, j = (k8 + 31) / 32;
  const size_t smem = (size_t)(k + 16) * sizeof(float);
  if (k8 > 512) return {fast::row_bwd_v3<T, 8, 4>, 8, smem, 2};
  if (k8 > 256) return {fast::row_bwd_v3<T, 4, 4>, 4, smem, 2};
  if (j <= 1) return {fast::row_bwd_v3<T, 1, 1>, 1, smem, 2};
  if (j <= 2) return {fast::row_bwd_v3<T, 1, 2>, 1, smem, 2};
  if (j <= 4) return {fast::row_bwd_v3<T, 1, 4>, 1, smem, 2};
  return {fast::row_bwd_v3<T, 1, 8>, 1, smem, 2};
}
template <bool PF> static RowPick pick_s8_pf(int64_t k) {
  const int64_t k8 = k / 8;
  RowPick r;
  if (k8 > 512) r = {fast::row_bwd_s8<T, 4, 8, PF>, 4, 0, 2};
  else if (k8 > 256) r = {fast::row_bwd_s8<T, 2, 8, PF>, 2, 0, 2};
  else if (k8 > 128) r = {fast::row_bwd_s8<T, 1, 8, PF>, 1, 0, 2};
  else if (k8 > 64) r = {fast::row_bwd_s8<T, 1, 4, PF>, 1, 0, 3};
  else if (k8 > 32) r = {fast::row_bwd_s8<T, 1, 2, PF>, 1, 0, 4};
  else r = {fast::row_bwd_s8<T, 1, 1, PF>, 1, 0, 4};
  r.smem = fast::row_bwd_s8_smem(k, r.w);
  return r;
}
static RowPick pick_s8(int64_t k, bool pf = false) { return pf ? pick_s8_pf<true>(k) : pick_s8_pf<false>(k); }
using PrepFn = void (*)(const T*, const T*, const T*, float*, T*, int64_t, int64_t, int64_t, float);
using PrepS8Fn = void (*)(const T*, const T*, const T*, float*, T*, int64_t, int64_t, int64_t, float, int);
static PrepFn pick_prep_s7(int64_t k) {
  const int64_t j = (k / 8 + 31) / 32;
  if (j <= 1) return fast::prep_fwd_rows<T, 1>;
  if (j <= 2) return fast::prep_fwd_rows<T, 2>;
  if (j <= 4) return fast::prep_fwd_rows<T, 4>;
  return fast::prep_fwd_rows<T, 8>;
}
static PrepS8Fn pick_prep_s8(int64_t k, int* rx) {
  const int64_t j = (k / 8 + 31) / 32;
  *rx = j <= 1 ? 8 : j <= 4 ? 4 : 2;
  if (j <= 1) return fast::prep_fwd_s8<T, 1, 8, false>;
  if (j <= 2) return fast::prep_fwd_s8<T, 2, 4, false>;
  if (j <= 4) return fast::prep_fwd_s8<T, 4, 4, false>;
  if (j <= 8) return fast::prep_fwd_s8<T, 8, 2, false>;
  return fast::prep_fwd_s8<T, 8, 2, true>;
}

static int occupancy(const void* fn, size_t smem) {
  int b = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, fn, 256, smem));
  return b;
}

static void run(int64_t n, int64_t k, int64_t m, int reps, int sms) {
  const float eps = 1e-6f;
  const size_t nk = (size_t)n * k, mk = (size_t)m * k;
  T *x, *g, *w, *wg[2], *dxn, *dx[3], *xn[3], *dg[3];
  float *rstd[2], *part[3];
  unsigned* ticket;
  CK(cudaMalloc(&x, nk * 2));
  CK(cudaMalloc(&g, k * 2));
  CK(cudaMalloc(&w, mk * 2));
  CK(cudaMalloc(&dxn, nk * 2));
  for (int i = 0; i < 3; ++i) {
    if (i < 2) CK(cudaMalloc(&wg[i], mk * 2));
    if (i < 2) CK(cudaMalloc(&rstd[i], n * 4));
    CK(cudaMalloc(&dx[i], nk * 2));
    CK(cudaMalloc(&xn[i], nk * 2));
    CK(cudaMalloc(&dg[i], k * 2));
    CK(cudaMalloc(&part[i], (size_t)4 * sms * k * 4));
  }
  CK(cudaMalloc(&ticket, 4));
  CK(cudaMemset(ticket, 0, 4));
  fill(x, nk, 1, 4.f, 0.3f);
  fill(g, k, 2, 0.6f, 1.f);
  fill(w, mk, 3, 0.1f, 0.f);
  fill(dxn, nk, 4, 2.f, 0.f);
  CK(cudaDeviceSynchronize());

  std::printf("\n## n=%lld k=%lld m=%lld (bf16), %d SMs, median of %d launches, L2 flushed before each\n",
              (long long)n, (long long)k, (long long)m, sms, reps);
  std::printf("| kernel | us | MB moved | TB/s | blocks x threads | blocks/SM |\n|---|---|---|---|---|---|\n");
  auto row = [&](const char* name, double us, double bytes, long long blocks, int bpsm) {
    std::printf("| %s | %.1f | %.1f | %.2f | %lld x 256 | %d |\n", name, us, bytes / 1e6, bytes / us / 1e6, blocks, bpsm);
  };

  // Reference: a device-to-device copy moving the row pass's bytes (2 n k reads, 2 n k writes).
  {
    const double us = time_us(reps, [] {}, [&] { CK(cudaMemcpyAsync(xn[0], dxn, nk * 2, cudaMemcpyDeviceToDevice));
                                               CK(cudaMemcpyAsync(xn[1], x, nk * 2, cudaMemcpyDeviceToDevice)); });
    row("D2D copy (2 x n k bf16)", us, 4.0 * nk * 2, 0, 0);
  }

  // Forward pre-pass.
  const double prep_bytes = (double)nk * 2 + 2.0 * mk * 2 + (double)n * 4;
  {
    const PrepFn fn = pick_prep_s7(k);
    const int bpsm = occupancy((const void*)fn, 0);
    const long long blocks = std::max<long long>(1, (std::min<long long>((long long)sms * bpsm * 8, n + m) + 7) / 8);
    const double us = time_us(reps, [] {}, [&] {
      fn<<<(unsigned)blocks, 256>>>(x, g, w, rstd[0], wg[0], n, k, m, eps);
    });
    row("prep s7 (prep_fwd_rows)", us, prep_bytes, blocks, bpsm);
  }
  {
    int rx = 0;
    const PrepS8Fn fn = pick_prep_s8(k, &rx);
    const int bpsm = occupancy((const void*)fn, 0);
    const long long wb = (m + 7) / 8, xb = (n + 8 * rx - 1) / (8 * rx);
    const double us = time_us(reps, [] {}, [&] {
      fn<<<(unsigned)(wb + xb), 256>>>(x, g, w, rstd[1], wg[1], n, k, m, eps, (int)wb);
    });
    row("prep s8 (prep_fwd_s8)", us, prep_bytes, wb + xb, bpsm);
    // The x rows alone and the W rows alone (where the time goes).
    const double ux = time_us(reps, [] {}, [&] {
      fn<<<(unsigned)xb, 256>>>(x, g, w, rstd[1], wg[1], n, k, 0, eps, 0);
    });
    row("  s8, x rows only (rstd)", ux, (double)nk * 2 + n * 4.0, xb, bpsm);
    const double uw = time_us(reps, [] {}, [&] {
      fn<<<(unsigned)wb, 256>>>(x, g, w, rstd[1], wg[1], 0, k, m, eps, (int)wb);
    });
    row("  s8, W rows only (wg)", uw, 2.0 * mk * 2, wb, bpsm);
  }
  std::printf("bitwise s7 == s8: rstd %s, wg %s\n", same(rstd[0], rstd[1], n * 4) ? "yes" : "NO",
              same(wg[0], wg[1], mk * 2) ? "yes" : "NO");

  // Backward row pass (fused dg reduction, as in the op).
  const double row_bytes = 4.0 * nk * 2 + (double)n * 4;
  int nbs[3];
  for (int v = 0; v < 3; ++v) {
    const RowPick p = v == 0 ? pick_s7(k) : pick_s8(k, v == 2);
    CK(cudaFuncSetAttribute((const void*)p.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem));
    const int occ = occupancy((const void*)p.fn, p.smem);
    const int bpsm = p.max_bpsm > 2 ? std::max(2, std::min(p.max_bpsm, occ)) : 2;
    const int rpb = 8 / p.w;
    const int nb = (int)std::max<int64_t>(1, std::min<int64_t>((n + rpb - 1) / rpb, (int64_t)sms * bpsm));
    nbs[v] = nb;
    const int fin = (int)std::max<int64_t>(1, std::min<int64_t>({(k + 127) / 128, (int64_t)32, (int64_t)nb, (int64_t)std::max(1, sms / 2)}));
    const double us = time_us(
        reps, [&] { CK(cudaMemcpyAsync(dx[v], dxn, nk * 2, cudaMemcpyDeviceToDevice)); },
        [&] {
          p.fn<<<nb, 256, p.smem>>>(x, g, rstd[0], dx[v], xn[v], part[v], n, k, dg[v], ticket, fin);
        });
    char name[96];
    std::snprintf(name, sizeof name, "row pass %s (%s<W=%d>)", v == 0 ? "s7" : v == 1 ? "s8" : "s8 + L2 prefetch",
                  v == 0 ? "row_bwd_v3" : "row_bwd_s8", p.w);
    row(name, us, row_bytes + (double)nb * k * 4, nb, occ);
  }
  std::printf("bitwise s7 == s8: dx %s, xn %s, dg %s%s\n", same(dx[0], dx[1], nk * 2) ? "yes" : "NO",
              same(xn[0], xn[1], nk * 2) ? "yes" : "NO", same(dg[0], dg[1], k * 2) ? "yes" : "no",
              nbs[0] == nbs[1] && k <= 2048 ? "" : " (grids or row sums differ: bits may differ)");
  std::printf("bitwise s8 == s8 + prefetch: dx %s, xn %s, dg %s\n", same(dx[1], dx[2], nk * 2) ? "yes" : "NO",
              same(xn[1], xn[2], nk * 2) ? "yes" : "NO", same(dg[1], dg[2], k * 2) ? "yes" : "NO");
  // Run to run: the s8 row pass twice more.
  {
    const RowPick p = pick_s8(k);
    const int fin = (int)std::max<int64_t>(1, std::min<int64_t>({(k + 127) / 128, (int64_t)32, (int64_t)nbs[1], (int64_t)std::max(1, sms / 2)}));
    CK(cudaMemcpy(dx[0], dxn, nk * 2, cudaMemcpyDeviceToDevice));
    p.fn<<<nbs[1], 256, p.smem>>>(x, g, rstd[0], dx[0], xn[0], part[0], n, k, dg[0], ticket, fin);
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    std::printf("bitwise s8 run-to-run: dx %s, xn %s, dg %s\n", same(dx[0], dx[1], nk * 2) ? "yes" : "NO",
                same(xn[0], xn[1], nk * 2) ? "yes" : "NO", same(dg[0], dg[1], k * 2) ? "yes" : "NO");
  }
  CK(cudaFree(x));
  CK(cudaFree(g));
  CK(cudaFree(w));
  CK(cudaFree(dxn));
  for (int i = 0; i < 3; ++i) {
    if (i < 2) CK(cudaFree(wg[i]));
    if (i < 2) CK(cudaFree(rstd[i]));
    CK(cudaFree(dx[i]));
    CK(cudaFree(xn[i]));
    CK(cudaFree(dg[i]));
    CK(cudaFree(part[i]));
  }
  CK(cudaFree(ticket));
}

int main(int argc, char** argv) {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  CK(cudaMalloc(&g_flush, kFlush));
  const int reps = argc > 4 ? std::atoi(argv[4]) : 30;
  if (argc > 3) {
    run(std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), reps, sms);
  } else {
    run(16384, 2048, 2048, reps, sms);  // the issue's shape first
    run(16384, 768, 768, reps, sms);    // small
    run(16384, 1024, 1024, reps, sms);  // medium
    run(16384, 4096, 4096, reps, sms);  // 7b
  }
  return 0;
}
