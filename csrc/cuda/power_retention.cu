// Chunked gated power retention (deg 2) on CUDA: forward, backward and decode step.
//
// Tensor cores through mma.sync m16n8k16 (bf16 operands, fp32 accumulation), so one source serves
// sm_80, sm_90 and sm_120. All inputs are converted to bf16 operands (fp32 and fp16 inputs too);
// accumulators, gates, the normaliser division and the user-visible states are fp32.
//
// Forward (C = chunk size, a multiple of 128; t needs no divisibility):
//   1. state_scan: per (128 features, b*hk), walk the chunks keeping S (fused [D, d+1]: values and
//      sum of keys) in registers; store the state entering each chunk to the workspace in bf16.
//      phi(k)^T is expanded from a transposed bf16 tile of k (one bf16x2 multiply per pair).
//   2. chunk_out: per (128 rows, q head, batch): phi(e^{g/2} s q) @ S_n (phi expanded in registers
//      from q, canonical layout, 8-wide b-blocks) plus the intra-chunk power attention; y = num/den.
// Backward: the forward scan again (states), chunk_out in ghat mode (ghat = dL/d[num, den]), a
// reverse scan for dS (gradient of the state leaving each chunk), then dq (per q head) and dk/dv
// (per KV head, summing the GQA heads) with intra-chunk and state parts, and a deterministic
// reverse cumsum for dlog_g (homogeneity: dG = (q.dq - k.dk)/2, + <dS_T, S_T> at the end).
// No atomics anywhere: repeated runs are bit-identical.
//
// v2 (LLMTRAIN_RETENTION_KERNEL=v2; v11, below, is the default): the sequential
// scans become (a) state_scan_kernel<LOCAL>, every chunk's own contribution at once (grid: feature
// tiles x chunks x b*hk), and (b) state_prefix_kernel, an element-wise walk over the chunks in
// fp32 that turns the contributions into the states in place; same for the reverse dS scan.
// dlog_g is chunk-local (dlogg_local_kernel): the in-chunk reverse cumsum of dG plus
// <dS_{n+1}, S_{n+1}> per chunk, computed by the prefix kernels, so errors do not accumulate with t.
//
// v3 (LLMTRAIN_RETENTION_KERNEL=v3): v2, plus the backward takes the forward's chunk states from
// the caller (RetentionBwdArgs::saved: the forward's workspace, kept alive by the autograd context)
// instead of recomputing them (one LOCAL scan + one prefix walk fewer); the decode step issues its
// state loads before the per-token prologue (step_kernel<.., PRE = true>).
//
// v4 (bitwise v3 and 16-19% faster on an H100): v3, with the per-chunk contributions computed by
// state_local_kernel (power_retention_local.cuh): one block per chunk stages the chunk's tokens
// once instead of once per 128 features (d <= 64 and nsrc * C <= 256; v3's kernel otherwise), and
// dq_kernel takes two triangle rows per state slab at d <= 64. Bitwise equal to v3.
//
// v5 (d = 64 fwd+bwd 8.3-9.1 ms on an H100, v4 9.7-10.6): v4 with dq_kernel and dkv_kernel compiled for two
// blocks per SM at d <= 64 (128 registers instead of ~170-190: one block of 8 warps per SM could not
// hide the latency of their MMA -> contraction chains). Same instructions' arithmetic: bitwise v4.
//
// v6 (session 4's default: d = 64 fwd+bwd 8.0-8.8 ms on an H100, forward 1.8-2.0): v5 with
// chunk_out_kernel compiled for three blocks per SM at d <= 64. Bitwise v5 (and v3).
//
// v7: v6 with the within-chunk gate cumsums computed once per (chunk, b * hk) by gate_cumsum_kernel
// into the workspace; the chunk kernels read them from there instead of each block scanning the
// chunk into shared memory. Chunks up to 8192 tokens then fit (v1 .. v6 cap them at 1024), and the
// Python default runs a short sequence (t <= SINGLE_CHUNK_MAX[d]) as a single chunk: the quadratic
// form, no states at all without an initial or final state.
//
// v8: v7 with the intra-chunk tiles (chunk_out: K and vhat; dq: K and V; dkv: q, dy and the row
// statistics) double-buffered and filled by cp.async one tile ahead, for bf16 inputs (other dtypes
// convert through registers as before). The same bits reach shared memory: bitwise v7.
//
// v9: v8, and a single chunk without states keeps the forward's fp32 y and 1 / den
// (in its workspace, kept by the caller like v3's states), so the backward computes its row
// statistics (1 / den, dy . y) with rowstat_kernel instead of chunk_out's ghat pass.
//
// v11: v10, and a forward whose workspace the caller keeps (kind 5) also writes the
// fp32 y and 1 / den after the chunk states, so every backward that has the saved buffer gets its
// row statistics and ghat from rowstat_kernel (a pass over dy and y) instead of chunk_out's ghat
// pass (the whole attention and state query again: ~11% of a chunked forward+backward at d = 64).
// Costs 260 bytes per token and head at d = 64 kept from forward to backward (chunk states: ~1.2 KB).
//
// v12: v11 with dq_kernel and dkv_kernel contracting the state part through
// u_contract_tiles (kernels.cuh): the same terms, with the triangle-row tiles unrolled per a / 8 so
// their MMA chains interleave, and the masks and row scales off the tiles right of the diagonal
// (ncu: v11's u_contract was ~75% of dq_kernel's instructions, HMMA 4.7% of them); the forward's
// state query likewise (phi_pair_tiles, bitwise). At d <= 64; d = 128 runs v11's kernels: unrolling
// its 16 triangle-row blocks (and the ghat pass) took the sm_90a build from 143 s to 361 s.
//
// v10: v9, with a single chunk without an initial state (forward) or without any
// state (backward, from the saved rows) run by the FlashAttention-style kernels of
// power_retention_flash.cuh: the gate factored through each 64-key tile below the diagonal, the
// normaliser from an MMA against ones, no state code. Other shapes run v9's kernels, and so does a
// sequence whose flash kernels need more shared memory than the device allows (their gate staging
// grows with t: d = 128 at 8K needs ~173 KB; sm_86/89/120 allow 99 KB per block, A100 163).
//
// v18: v12 with the chunked dq / dkv state parts on wgmma (power_retention_state_wgmma.cuh; d = 64, sm_90a).
// v20 (the default, session 17): v18, and the LOCAL scan stages up to 512 token rows (state_local_kernel
// <.., 512>, bitwise the fallback it replaces), so the Python default runs chunk 512 at d = 64 (docs/perf.md).
// v21 (opt-in): v20 with the forward's state query on wgmma (power_retention_query_wgmma.cuh).
//
// Workspace (allocated by the caller with torch, size from power_retention_workspace_bytes):
//   forward:  bf16 states [b*hk, N, D, d+8]
//   backward: states and state gradients (same size each), ghat [b, hq, t128, d+8] bf16,
//             q.dq [b, t, hq] and k.dk [b, t, hk] fp32, <dS_T, S_T> partials.
//   step:     per-tile partial outputs [b, t, hq, ceil(D/64), d+1] fp32.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "../ops.h"
#include "power_retention_kernels.cuh"
#include "power_retention_flash.cuh"
#include "power_retention_local.cuh"
#include "power_retention_wgmma.cuh"
#include "power_retention_state_wgmma.cuh"
#include "power_retention_query_wgmma.cuh"

namespace llmtrain {
namespace pr {
namespace {

constexpr int kScanFeat = 128;  // features per scan block

int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }

// Kernel generation, read per call so that one process can A/B them (bench, tests).
constexpr int kDefaultVersion = 20;
int kernel_version() {
  const char* e = std::getenv("LLMTRAIN_RETENTION_KERNEL");
  if (!e || !*e) return kDefaultVersion;
  if (!std::strcmp(e, "v1")) return 1;
  if (!std::strcmp(e, "v2")) return 2;
  if (!std::strcmp(e, "v3")) return 3;
  if (!std::strcmp(e, "v4")) return 4;
  if (!std::strcmp(e, "v5")) return 5;
  if (!std::strcmp(e, "v6")) return 6;
  if (!std::strcmp(e, "v7")) return 7;
  if (!std::strcmp(e, "v8")) return 8;
  if (!std::strcmp(e, "v9")) return 9;
  if (!std::strcmp(e, "v10")) return 10;
  if (!std::strcmp(e, "v11")) return 11;
  if (!std::strcmp(e, "v12")) return 12;
  if (!std::strcmp(e, "v18")) return 18;  // (v13 .. v17 name the one-chunk generations: LLMTRAIN_RETENTION_FLASH)
  if (!std::strcmp(e, "v20")) return 20;  // (v19: an experiment on a branch)
  if (!std::strcmp(e, "v21")) return 21;
  throw std::invalid_argument(
      std::string("power_retention (CUDA): LLMTRAIN_RETENTION_KERNEL must be v1 .. v12, v18, v20 or v21, got '") + e +
      "'");
}
int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// v14: the one-chunk flash kernels software-pipelined inside each warp (the next key tile's S GEMM
// issued before this tile's element-wise pass; power_retention_flash.cuh, kPipe), bitwise v12's
// results. H100, session 11 (docs/perf.md): the pipelined dq runs 1.08 ms against 1.24 at t = 2048,
// the pipelined forward 0.79 against 0.72. LLMTRAIN_RETENTION_FLASH picks, per call:
// v16 (session 13): v14, with the row statistics (1 / den, dy . y) from rowstat_rows_kernel (16-byte
// loads, several rows per thread) instead of rowstat_kernel, and the forward and dkv staging their
// key / query tiles in a 3-slot ring with one block barrier per tile instead of two (kRing; where
// its shared memory fits, else the 2-slot kernels: same bits).
// v17 (session 14): v16, with the one-chunk flash kernels (forward, dq, dkv) on Hopper's wgmma
// (power_retention_wgmma.cuh) where they run: d = 64, an sm_90 device, an sm_90a build (wgmma_usable).
//   v17 (the default, also when unset): v16 + the wgmma kernels;
//   v16: v14 + rowstat_rows_kernel + the rings;
//   v14: pipelined dq, v12 forward, rowstat_kernel;
//   v14-all: the pipelined forward as well (A/B);  v12: neither.
struct FlashPipe {
  bool fwd, dq, fast_rowstat, ring, wgmma;
};
FlashPipe flash_pipelined() {
  const char* e = std::getenv("LLMTRAIN_RETENTION_FLASH");
  if (!e || !*e || !std::strcmp(e, "v17")) return {false, true, true, true, true};
  if (!std::strcmp(e, "v16")) return {false, true, true, true, false};
  if (!std::strcmp(e, "v14")) return {false, true, false, false, false};
  if (!std::strcmp(e, "v14-all")) return {true, true, false, false, false};
  if (!std::strcmp(e, "v12")) return {false, false, false, false, false};
  throw std::runtime_error(std::string("power_retention (CUDA): LLMTRAIN_RETENTION_FLASH must be v17, v16, v14, "
                                       "v14-all or v12, got '") + e + "'");
}

struct Plan {
  int64_t b, t, hq, hk, d, D, E;
  int C, N, tpad, ntiles, nprefix;  // nprefix: blocks per b*hk of state_prefix_kernel
};

Plan make_plan(const RetentionDims& m) {
  (void)flash_pipelined();  // (an unknown LLMTRAIN_RETENTION_FLASH fails every call, not only the flash ones)
  Plan p{};
  p.b = m.b; p.t = m.t; p.hq = m.hq; p.hk = m.hk; p.d = m.d; p.D = m.D; p.E = m.d + 8;
  p.C = (int)retention_cuda_chunk(m.t, m.chunk, kernel_version() >= 7 ? 8192 : 1024);
  p.N = (int)std::max<int64_t>(1, div_up(m.t, p.C));
  p.tpad = (int)(div_up(std::max<int64_t>(m.t, 1), kBM) * kBM);
  p.ntiles = (int)div_up(p.D, kScanFeat);
  p.nprefix = (int)div_up(p.D * (p.E / 8), kPT);
  return p;
}

// Extra workspace of v2 (after v1's, so v1's layout is unchanged): fbuf, gtot, dlog_g partials.
int64_t v2_extra_bytes(const Plan& P) {
  return align256(P.b * P.hk * P.D * P.E * 4) + align256(P.b * P.hk * P.N * 4) +
         align256(P.b * P.hk * P.N * P.nprefix * 4);
}

// Carves the workspace; throws when it is missing or too small.
struct Carver {
  char* base;
  int64_t size, used = 0;
  template <typename X> X* take(int64_t count) {
    X* p = reinterpret_cast<X*>(base + used);
    used += align256(count * (int64_t)sizeof(X));
    if (used > size)
      throw std::runtime_error("power_retention (CUDA): workspace too small (" + std::to_string(size) +
                               " bytes given, at least " + std::to_string(used) + " needed)");
    return p;
  }
};

template <typename K> void set_smem(K kernel, size_t bytes) {
  PR_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

void check_aligned(const void* p, const char* name) {
  if (p && (reinterpret_cast<uintptr_t>(p) % 16) != 0)
    throw std::invalid_argument(std::string("power_retention (CUDA): ") + name +
                                " must be 16-byte aligned (pass a freshly allocated contiguous tensor)");
}

template <typename F> void dispatch(DType dt, int64_t d, F&& f) {
  auto with_d = [&](auto tag) {
    switch (d) {
      case 32: f(tag, std::integral_constant<int, 32>{}); break;
      case 64: f(tag, std::integral_constant<int, 64>{}); break;
      case 128: f(tag, std::integral_constant<int, 128>{}); break;
      default: throw std::invalid_argument("power_retention (CUDA): head dim must be 32, 64 or 128");
    }
  };
  switch (dt) {
    case DType::BF16: with_d((bf16*)nullptr); break;
    case DType::F16: with_d((__half*)nullptr); break;
    case DType::F32: with_d((float*)nullptr); break;
    default: throw std::invalid_argument("power_retention (CUDA): dtype must be float32, bfloat16 or float16");
  }
}

template <int d> struct Tune {
  static constexpr int OUT_G = d == 32 ? 4 : 2, OUT_NBUF = 2;
  static constexpr int DQ_G = 1, DQ_NBUF = 2;
  static constexpr int DKV_G = 2, DKV_NBUF = d == 128 ? 1 : 2;
};

template <int d, typename T, bool REV>
void launch_scan(const ScanArgs& a, const Plan& P, cudaStream_t st) {
  auto kern = state_scan_kernel<d, T, REV, false>;
  const size_t sm = scan_smem<d>(P.C);
  set_smem(kern, sm);
  kern<<<dim3(P.ntiles, (unsigned)(P.b * P.hk)), kThreads, sm, st>>>(a);
  check_launch("state_scan_kernel");
}

// The most dynamic shared memory a block of the current device may opt into.
size_t device_smem_optin() {
  int dev = 0, bytes = 0;
  PR_CHECK(cudaGetDevice(&dev));
  PR_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return (size_t)bytes;
}

template <int d, typename T, bool REV>
void launch_scan_local(ScanArgs a, const Plan& P, cudaStream_t st) {
  a.nwork = P.b * P.hk * P.N;
  const int64_t gy = std::min<int64_t>(a.nwork, 65535), gz = div_up(a.nwork, gy);
  const int nsrc = REV ? (int)(P.hq / P.hk) : 1;
  if constexpr (d <= 64) {
    const int ver = kernel_version();
    if (ver >= 20 && !local_fits(d, nsrc, P.C) && local_fits(d, nsrc, P.C, kLocalK512)) {
      // v20: 256 < nsrc * C <= 512 (chunk 384 / 512, or the reverse scan of chunk 256 under GQA
      // 2:1 and chunk 128 under 4:1): the 512-row variant (16 warps, ~140 KB of shared memory, one
      // block per SM), instead of state_scan_kernel<LOCAL> below. Same bits. Feature tiles split over
      // more blocks only when there are too few chunks: half v4's block target, each block being twice
      // as wide.
      // Devices whose opt-in shared memory is smaller (sm_86 / 89 / 120: ~99 KB) keep the fallback.
      constexpr size_t sm = local_smem<d, kLocalK512>();
      if (sm <= device_smem_optin()) {
        constexpr int kWarpTiles = (Cfg<d>::D + kLocalRows - 1) / kLocalRows;
        const int64_t most = div_up(kWarpTiles, kLocalK512 / 32);
        const int64_t split = std::max<int64_t>(1, std::min<int64_t>(most, div_up(264, a.nwork)));
        auto kern = state_local_kernel<d, T, REV, kLocalK512>;
        set_smem(kern, sm);
        kern<<<dim3((unsigned)split, (unsigned)gy, (unsigned)gz), kLocalK512, sm, st>>>(a);
        check_launch("state_local_kernel<512>");
        return;
      }
    }
    if (ver >= 4 && local_fits(d, nsrc, P.C)) {
      // v4: one block per chunk stages its tokens once. Split the feature tiles over more blocks
      // only when there are too few chunks to fill the GPU (~2 blocks per SM on 132 SMs).
      constexpr int kWarpTiles = (Cfg<d>::D + kLocalRows - 1) / kLocalRows;
      const int64_t most = div_up(kWarpTiles, kThreads / 32);
      const int64_t split = std::max<int64_t>(1, std::min<int64_t>(most, div_up(528, a.nwork)));
      auto kern = state_local_kernel<d, T, REV>;
      const size_t sm = local_smem<d>();
      set_smem(kern, sm);
      kern<<<dim3((unsigned)split, (unsigned)gy, (unsigned)gz), kThreads, sm, st>>>(a);
      check_launch("state_local_kernel");
      return;
    }
  }
  auto kern = state_scan_kernel<d, T, REV, true>;
  const size_t sm = scan_smem<d>(P.C);
  set_smem(kern, sm);
  kern<<<dim3(P.ntiles, (unsigned)gy, (unsigned)gz), kThreads, sm, st>>>(a);
  check_launch("state_scan_kernel<local>");
}

template <int d, bool REV>
void launch_prefix(PrefixArgs a, const Plan& P, cudaStream_t st) {
  a.N = P.N;
  a.D = P.D;
  state_prefix_kernel<d, REV><<<dim3(P.nprefix, (unsigned)(P.b * P.hk)), kPT, 0, st>>>(a);
  check_launch("state_prefix_kernel");
}

template <int d> bool state_wgmma_usable(size_t smem);

template <int d, typename T, bool GHAT>
void launch_out(const OutArgs& a, const Plan& P, cudaStream_t st) {
  using TU = Tune<d>;
  const int gbytes = gate_smem_bytes(P.C, a.gcum != nullptr);
  size_t sm = out_smem<d, TU::OUT_G, TU::OUT_NBUF>(gbytes);
  auto launch = [&](auto kern) {
    set_smem(kern, sm);
    kern<<<dim3(P.tpad / kBM, (unsigned)P.hq, (unsigned)P.b), kThreads, sm, st>>>(a);
    check_launch("chunk_out_kernel");
  };
  // v6: three blocks per SM at d <= 64 (75 KB of shared memory each; 80 registers instead of 122).
  // (if constexpr: the d = 128 instances would only be compiled, never launched)
  // v12: the state query's phi tiles unrolled per a / 8 (phi_pair_tiles; bitwise v11), for the
  // forward at d <= 64 (the ghat pass, which only the gated final-state gradient still runs, and
  // d = 128 keep phi_pair_gemm: same bits, and each unrolled instance costs compile time).
  // v21: the forward's state query on wgmma (power_retention_query_wgmma.cuh) for d = 64 on an sm_90
  // device of an sm_90a build; two blocks per SM, a ring of 3 slots (~56 KB; 4 slots measured no faster).
  const int ver = kernel_version();
  if constexpr (d == 64 && !GHAT) {
    if (ver >= 21 && state_wgmma_usable<d>(out_smem_wgmma<d>(gbytes, 3))) {
      sm = out_smem_wgmma<d>(gbytes, 3);
      return launch(chunk_out_kernel<d, T, GHAT, TU::OUT_G, TU::OUT_NBUF, 2, 3>);
    }
  }
  if constexpr (d <= 64) {
    if constexpr (!GHAT) {
      if (ver >= 12) return launch(chunk_out_kernel<d, T, GHAT, TU::OUT_G, TU::OUT_NBUF, 3, 2>);
    }
    if (ver >= 6) return launch(chunk_out_kernel<d, T, GHAT, TU::OUT_G, TU::OUT_NBUF, 3>);
  }
  launch(chunk_out_kernel<d, T, GHAT, TU::OUT_G, TU::OUT_NBUF>);
}

// v7: the within-chunk gate cumsums for every chunk kernel of this call, computed once (zeros
// when ungated). Older generations scan each chunk inside every block (null).
const float* gate_cumsums(Carver& ws, const float* log_g, const Plan& P, cudaStream_t st) {
  if (kernel_version() < 7) return nullptr;
  float* g = ws.take<float>(P.b * P.hk * P.t);
  if (log_g) {
    gate_cumsum_kernel<<<dim3((unsigned)P.N, (unsigned)(P.b * P.hk)), kThreads, 0, st>>>(log_g, g, P.t, P.hk, P.C);
    check_launch("gate_cumsum_kernel");
  } else {
    PR_CHECK(cudaMemsetAsync(g, 0, P.b * P.hk * P.t * sizeof(float), st));
  }
  return g;
}

// v10: the one-chunk flash kernels (2 blocks per SM at d <= 64, where they fit in 128 registers).
template <typename K> void launch_flash(K kern, size_t smem, unsigned rows, unsigned heads, const Plan& P,
                                        const FlashArgs& a, cudaStream_t st, const char* what) {
  set_smem(kern, smem);
  kern<<<dim3(rows, heads, (unsigned)P.b), kThreads, smem, st>>>(a);
  check_launch(what);
}
template <int d> constexpr int flash_minb() { return d <= 64 ? 2 : 1; }

// The shared memory a flash kernel may use: the device's opt-in limit, or less with
// LLMTRAIN_RETENTION_FLASH_SMEM=<bytes> (read per call), so that a GPU with more shared memory can
// exercise the fallback that sm_86/89/120 take for long one-chunk sequences (tests).
size_t max_smem_optin() {
  const size_t bytes = device_smem_optin();
  if (const char* e = std::getenv("LLMTRAIN_RETENTION_FLASH_SMEM"); e && *e) {
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (*end || v <= 0)
      throw std::invalid_argument(std::string("power_retention (CUDA): LLMTRAIN_RETENTION_FLASH_SMEM must be a "
                                              "positive number of bytes, got '") + e + "'");
    return std::min(bytes, (size_t)v);
  }
  return bytes;
}

// v17: the wgmma flash kernels run for d = 64 on an sm_90 device when the build has sm_90a code and
// their shared memory (smem bytes) fits.
template <int d> bool wgmma_usable(size_t smem) {
  return d == kWgD && flash_pipelined().wgmma && cuda_built_for_sm90a() && cuda_current_device_is_sm90() &&
         smem <= max_smem_optin();
}

// v18: the chunked backward's state parts on wgmma (power_retention_state_wgmma.cuh) for d = 64 on an
// sm_90 device of an sm_90a build, where their shared memory fits; else v12's.
template <int d> bool state_wgmma_usable(size_t smem) {
  return d == 64 && kernel_version() >= 18 && cuda_built_for_sm90a() && cuda_current_device_is_sm90() &&
         smem <= max_smem_optin();
}

FlashArgs flash_args(const Plan& P, const float* gcum, double scale) {
  FlashArgs f{};
  f.gcum = gcum;
  f.b = P.b; f.t = P.t; f.hq = P.hq; f.hk = P.hk; f.tpad = P.tpad;
  f.scale = (float)scale;
  return f;
}

template <typename T, int d> int64_t forward_impl(const RetentionFwdArgs& A) {
  const RetentionDims& m = A.dims;
  const Plan P = make_plan(m);
  cudaStream_t st = static_cast<cudaStream_t>(A.stream);
  const bool need_scan = P.N > 1 || A.s0 || A.s_out;
  Carver ws{static_cast<char*>(A.workspace), A.workspace_bytes};
  // v9, one chunk and no initial state: fp32 y and 1 / den for the backward, first in the
  // workspace (which the caller keeps as the saved buffer; see backward_impl)
  float* y32 = nullptr;
  float* inv_den = nullptr;
  const bool rows_first = kernel_version() >= 9 && P.N == 1 && !A.s0;
  if (rows_first) {
    y32 = ws.take<float>(P.b * P.t * P.hq * d);
    inv_den = ws.take<float>(P.b * P.hq * P.t);
  }
  bf16* Sws = need_scan ? ws.take<bf16>(P.b * P.hk * P.N * P.D * P.E) : nullptr;
  // v11: a workspace of kind 5 (the caller keeps it for the backward) holds the same rows after the
  // chunk states, so the chunked backward skips chunk_out's ghat pass as well
  if (!rows_first && kernel_version() >= 11 && need_scan &&
      A.workspace_bytes >= power_retention_workspace_bytes_cuda(m, 5)) {
    y32 = ws.take<float>(P.b * P.t * P.hq * d);
    inv_den = ws.take<float>(P.b * P.hq * P.t);
  }
  if (need_scan) {
    ScanArgs s{};
    s.x = A.k; s.yv = A.v; s.log_g = static_cast<const float*>(A.log_g);
    s.s_init = static_cast<const float*>(A.s0); s.z_init = static_cast<const float*>(A.z0);
    s.s_fin = static_cast<float*>(A.s_out); s.z_fin = static_cast<float*>(A.z_out);
    s.ws = Sws;
    s.b = P.b; s.t = P.t; s.hq = P.hq; s.hk = P.hk; s.C = P.C; s.N = P.N; s.tpad = P.tpad;
    s.scale = (float)m.scale; s.need_final = A.s_out != nullptr;
    if (kernel_version() >= 2) {
      float* fbuf = ws.take<float>(P.b * P.hk * P.D * P.E);
      float* gtot = ws.take<float>(P.b * P.hk * P.N);
      s.fbuf = A.s_out ? fbuf : nullptr;
      s.gtot = gtot;
      launch_scan_local<d, T, false>(s, P, st);
      PrefixArgs pa{};
      pa.ws = Sws; pa.fbuf = s.fbuf; pa.gtot = gtot;
      pa.s_init = s.s_init; pa.z_init = s.z_init; pa.s_fin = s.s_fin; pa.z_fin = s.z_fin;
      launch_prefix<d, false>(pa, P, st);
    } else {
      launch_scan<d, T, false>(s, P, st);
    }
  }
  // (a final state, if asked for, came from the scan)
  if (kernel_version() >= 10 && P.N == 1 && !A.s0 && flash_fwd_smem<d>(P.tpad) <= max_smem_optin()) {
    FlashArgs f = flash_args(P, gate_cumsums(ws, static_cast<const float*>(A.log_g), P, st), m.scale);
    f.q = A.q; f.k = A.k; f.v = A.v; f.y = A.y; f.y32 = y32; f.inv_den = inv_den;
    if (wgmma_usable<d>(flash_fwd_wgmma_smem(P.tpad)))
      launch_flash(flash_fwd_wgmma_kernel<T>, flash_fwd_wgmma_smem(P.tpad), (unsigned)(P.tpad / kFR), (unsigned)P.hq,
                   P, f, st, "flash_fwd_wgmma_kernel");
    else if (flash_pipelined().fwd)  // (v14's forward needs the same shared memory as v12's)
      launch_flash(flash_fwd_kernel<d, T, flash_minb<d>(), true>, flash_fwd_smem<d>(P.tpad), (unsigned)(P.tpad / kFR),
                   (unsigned)P.hq, P, f, st, "flash_fwd_kernel");
    else if (flash_pipelined().ring && flash_fwd_smem<d, true>(P.tpad) <= max_smem_optin())
      launch_flash(flash_fwd_kernel<d, T, flash_minb<d>(), false, true>, flash_fwd_smem<d, true>(P.tpad),
                   (unsigned)(P.tpad / kFR), (unsigned)P.hq, P, f, st, "flash_fwd_kernel");
    else
      launch_flash(flash_fwd_kernel<d, T, flash_minb<d>()>, flash_fwd_smem<d>(P.tpad), (unsigned)(P.tpad / kFR),
                   (unsigned)P.hq, P, f, st, "flash_fwd_kernel");
    return -1;
  }
  OutArgs o{};
  o.q = A.q; o.k = A.k; o.v = A.v; o.log_g = static_cast<const float*>(A.log_g); o.Sws = Sws; o.y = A.y;
  o.gcum = gate_cumsums(ws, o.log_g, P, st);
  o.gen = kernel_version();
  o.y32 = y32;
  o.inv_den = inv_den;
  o.b = P.b; o.t = P.t; o.hq = P.hq; o.hk = P.hk; o.C = P.C; o.N = P.N; o.tpad = P.tpad;
  o.scale = (float)m.scale; o.has_s0 = A.s0 != nullptr;
  launch_out<d, T, false>(o, P, st);
  return -1;
}

template <typename T, int d> void backward_impl(const RetentionBwdArgs& A) {
  using TU = Tune<d>;
  const RetentionDims& m = A.dims;
  const Plan P = make_plan(m);
  cudaStream_t st = static_cast<cudaStream_t>(A.stream);
  const bool gated = A.log_g != nullptr;
  const bool grad_final = A.ds_out || A.dz_out;
  const bool need_dot = gated && grad_final;
  const bool need_S = P.N > 1 || A.s0 || need_dot;
  const bool grad_initial = A.ds0 != nullptr;
  const bool need_dS = P.N > 1 || grad_final || grad_initial;
  Carver ws{static_cast<char*>(A.workspace), A.workspace_bytes};
  const int64_t nstate = P.b * P.hk * P.N * P.D * P.E;
  // v3: the forward's states, kept by the caller (its workspace starts with them). Not with
  // need_dot: <dS_T, S_T> comes from the recomputed walk's fp32 end value.
  const bool use_saved = A.saved != nullptr && need_S && !need_dot;
  if (use_saved && A.saved_bytes < nstate * 2)
    throw std::runtime_error("power_retention (CUDA): saved_states too small (" + std::to_string(A.saved_bytes) +
                             " bytes, the chunk states need " + std::to_string(nstate * 2) + ")");
  bf16* Sws = use_saved ? const_cast<bf16*>(static_cast<const bf16*>(A.saved))
                        : (need_S ? ws.take<bf16>(nstate) : nullptr);
  bf16* dSws = need_dS ? ws.take<bf16>(nstate) : nullptr;
  bf16* ghat = ws.take<bf16>(P.b * P.hq * P.tpad * P.E);
  float2* rowstat = ws.take<float2>(P.b * P.hq * P.tpad);
  float* dGq = gated ? ws.take<float>(P.b * P.t * P.hq) : nullptr;
  float* dGk = gated ? ws.take<float>(P.b * P.t * P.hk) : nullptr;
  float* dot = need_dot ? ws.take<float>(P.b * P.hk * P.ntiles) : nullptr;
  const float* log_g = static_cast<const float*>(A.log_g);
  const bool v2 = kernel_version() >= 2;  // v3: v2's kernels (+ saved states)
  float* fbuf = v2 ? ws.take<float>(P.b * P.hk * P.D * P.E) : nullptr;
  float* gtot = v2 ? ws.take<float>(P.b * P.hk * P.N) : nullptr;
  float* part = v2 ? ws.take<float>(P.b * P.hk * P.N * P.nprefix) : nullptr;
  const float* gcum = gate_cumsums(ws, log_g, P, st);
  const int gbytes = gate_smem_bytes(P.C, gcum != nullptr);

  if (need_S && !use_saved) {
    ScanArgs s{};
    s.x = A.k; s.yv = A.v; s.log_g = log_g;
    s.s_init = static_cast<const float*>(A.s0); s.z_init = static_cast<const float*>(A.z0);
    s.dot_s = need_dot ? static_cast<const float*>(A.ds_out) : nullptr;
    s.dot_z = need_dot ? static_cast<const float*>(A.dz_out) : nullptr;
    s.dot_out = dot; s.ws = Sws;
    s.b = P.b; s.t = P.t; s.hq = P.hq; s.hk = P.hk; s.C = P.C; s.N = P.N; s.tpad = P.tpad;
    s.scale = (float)m.scale; s.need_final = need_dot;
    if (v2) {
      s.fbuf = need_dot ? fbuf : nullptr;
      s.gtot = gtot;
      launch_scan_local<d, T, false>(s, P, st);
      PrefixArgs pa{};
      pa.ws = Sws; pa.fbuf = s.fbuf; pa.gtot = gtot; pa.s_init = s.s_init; pa.z_init = s.z_init;
      pa.dot_s = s.dot_s; pa.dot_z = s.dot_z; pa.part = part;  // <dS_T, S_T>: the last chunk's dlog_g term
      launch_prefix<d, false>(pa, P, st);
    } else {
      launch_scan<d, T, false>(s, P, st);
    }
  }
  OutArgs o{};
  o.q = A.q; o.k = A.k; o.v = A.v; o.dy = A.dy; o.log_g = log_g; o.Sws = Sws; o.ghat = ghat; o.rowstat = rowstat;
  o.gcum = gcum;
  o.gen = kernel_version();
  o.b = P.b; o.t = P.t; o.hq = P.hq; o.hk = P.hk; o.C = P.C; o.N = P.N; o.tpad = P.tpad;
  o.scale = (float)m.scale; o.has_s0 = A.s0 != nullptr;
  // The forward's fp32 y and 1 / den from its saved buffer give the row statistics (and, v11, ghat)
  // without chunk_out's ghat pass recomputing the attention. v9: one chunk, no state in or out, where
  // ghat itself is not needed (only state parts read it). v11: any saved buffer holding the rows
  // (kind 4, kind 0 of one chunk without initial state: rows first; kind 5: rows after the states).
  const float* y32 = nullptr;
  const float* inv_den = nullptr;
  if (A.saved && kernel_version() >= 9) {
    Carver sv{const_cast<char*>(static_cast<const char*>(A.saved)), A.saved_bytes};
    if (P.N == 1 && !A.s0) {
      if (!grad_final || kernel_version() >= 11) {
        y32 = sv.take<float>(P.b * P.t * P.hq * d);
        inv_den = sv.take<float>(P.b * P.hq * P.t);
      }
    } else if (kernel_version() >= 11 && A.saved_bytes >= power_retention_workspace_bytes_cuda(m, 5)) {
      // (the forward wrote the rows exactly when its workspace had this size: a smaller, kind-0 buffer
      // may still exceed states + rows, its v2 scratch and gate sums included, but holds no rows)
      sv.take<bf16>(nstate);
      y32 = sv.take<float>(P.b * P.t * P.hq * d);
      inv_den = sv.take<float>(P.b * P.hq * P.t);
    }
  }
  const bool rows_from_saved = y32 != nullptr;
  const bool no_states = P.N == 1 && !A.s0 && !grad_final;  // nothing reads ghat
  const bool flash = rows_from_saved && no_states && kernel_version() >= 10 &&
                     std::max(flash_dq_smem<d>(P.tpad), flash_dkv_smem<d>(P.tpad)) <= max_smem_optin();
  if (rows_from_saved) {
    const int64_t rows = P.b * P.hq * P.tpad;
    if (no_states && flash_pipelined().fast_rowstat) {  // v16 (no ghat to write)
      const dim3 grid((unsigned)(P.b * P.hq), (unsigned)div_up(P.tpad, rowstat_rows_per_block<d>()));
      rowstat_rows_kernel<d, T><<<grid, kThreads, 0, st>>>(static_cast<const T*>(A.dy), y32, inv_den, rowstat, P.t,
                                                          P.hq, P.tpad);
      check_launch("rowstat_rows_kernel");
    } else {
      rowstat_kernel<d, T><<<(unsigned)div_up(rows, kThreads / 32), kThreads, 0, st>>>(
          static_cast<const T*>(A.dy), y32, inv_den, rowstat, no_states ? nullptr : ghat, P.b, P.t, P.hq, P.tpad);
      check_launch("rowstat_kernel");
    }
  } else {
    launch_out<d, T, true>(o, P, st);
  }
  if (need_dS) {
    ScanArgs s{};
    s.x = A.q; s.ghat = ghat; s.log_g = log_g;
    s.s_init = static_cast<const float*>(A.ds_out); s.z_init = static_cast<const float*>(A.dz_out);
    s.s_fin = static_cast<float*>(A.ds0); s.z_fin = static_cast<float*>(A.dz0);
    s.ws = dSws;
    s.b = P.b; s.t = P.t; s.hq = P.hq; s.hk = P.hk; s.C = P.C; s.N = P.N; s.tpad = P.tpad;
    s.scale = (float)m.scale; s.need_final = grad_initial;
    if (v2) {
      s.fbuf = grad_initial ? fbuf : nullptr;  // fbuf is free again: the forward walk has finished
      s.gtot = gtot;
      launch_scan_local<d, T, true>(s, P, st);
      PrefixArgs pa{};
      pa.ws = dSws; pa.fbuf = s.fbuf; pa.gtot = gtot; pa.s_init = s.s_init; pa.z_init = s.z_init;
      pa.s_fin = s.s_fin; pa.z_fin = s.z_fin;
      pa.dot_ws = gated && P.N > 1 ? Sws : nullptr;  // <dS_{n+1}, S_{n+1}>, chunks 0..N-2
      pa.part = part;
      launch_prefix<d, true>(pa, P, st);
    } else {
      launch_scan<d, T, true>(s, P, st);
    }
  }
  if (flash) {
    FlashArgs f = flash_args(P, gcum, m.scale);
    f.q = A.q; f.k = A.k; f.v = A.v; f.dy = A.dy; f.rowstat = rowstat;
    f.dq = A.dq; f.dk = A.dk; f.dv = A.dv; f.dGq = dGq; f.dGk = dGk;
    // v14's dq keeps a third K / V tile in shared memory; where that does not fit, v12's dq (same bits)
    if (wgmma_usable<d>(flash_dq_wgmma_smem(P.tpad)))
      launch_flash(flash_dq_wgmma_kernel<T>, flash_dq_wgmma_smem(P.tpad), (unsigned)(P.tpad / kFR), (unsigned)P.hq,
                   P, f, st, "flash_dq_wgmma_kernel");
    else if (flash_pipelined().dq && flash_dq_smem<d, true>(P.tpad) <= max_smem_optin())
      launch_flash(flash_dq_kernel<d, T, flash_minb<d>(), true>, flash_dq_smem<d, true>(P.tpad),
                   (unsigned)(P.tpad / kFR), (unsigned)P.hq, P, f, st, "flash_dq_kernel");
    else
      launch_flash(flash_dq_kernel<d, T, flash_minb<d>()>, flash_dq_smem<d>(P.tpad), (unsigned)(P.tpad / kFR),
                   (unsigned)P.hq, P, f, st, "flash_dq_kernel");
    if (wgmma_usable<d>(flash_dkv_wgmma_smem(P.tpad)))
      launch_flash(flash_dkv_wgmma_kernel<T>, flash_dkv_wgmma_smem(P.tpad), (unsigned)(P.tpad / kFR), (unsigned)P.hk,
                   P, f, st, "flash_dkv_wgmma_kernel");
    else if (flash_pipelined().ring && flash_dkv_smem<d, true>(P.tpad) <= max_smem_optin())
      launch_flash(flash_dkv_kernel<d, T, flash_minb<d>(), true>, flash_dkv_smem<d, true>(P.tpad),
                   (unsigned)(P.tpad / kFR), (unsigned)P.hk, P, f, st, "flash_dkv_kernel");
    else
      launch_flash(flash_dkv_kernel<d, T, flash_minb<d>()>, flash_dkv_smem<d>(P.tpad), (unsigned)(P.tpad / kFR),
                   (unsigned)P.hk, P, f, st, "flash_dkv_kernel");
  } else {
    GradArgs g{};
    g.q = A.q; g.k = A.k; g.v = A.v; g.log_g = log_g; g.ghat = ghat; g.dy = A.dy; g.rowstat = rowstat;
    g.dq = A.dq; g.dk = A.dk; g.dv = A.dv;
    g.gcum = gcum;
    g.gen = kernel_version();
    g.b = P.b; g.t = P.t; g.hq = P.hq; g.hk = P.hk; g.C = P.C; g.N = P.N; g.tpad = P.tpad;
    g.scale = (float)m.scale;
    {
      GradArgs gq = g;
      gq.Sws = Sws; gq.dG = dGq; gq.has_s0 = A.s0 != nullptr;
      // v4: two triangle rows per state slab at d <= 64 (half the barriers; still 2 blocks per SM).
      // Only the slab loading changes: the same u_contract calls run in the same order (bitwise v3).
      auto launch_dq = [&](auto kern, size_t sm) {
        set_smem(kern, sm);
        kern<<<dim3(P.tpad / kBM, (unsigned)P.hq, (unsigned)P.b), kThreads, sm, st>>>(gq);
        check_launch("dq_kernel");
      };
      const int ver = kernel_version();
      bool done = false;
      if constexpr (d == 64) {
        if (state_wgmma_usable<d>(dq_smem_wgmma<d>(gbytes))) {
          launch_dq(dq_kernel<d, T, 2, TU::DQ_NBUF, 2, 3>, dq_smem_wgmma<d>(gbytes));
          done = true;
        }
      }
      if constexpr (d <= 64) {
        if (!done && ver >= 12) launch_dq(dq_kernel<d, T, 2, TU::DQ_NBUF, 2, 2>, dq_smem<d, 2, TU::DQ_NBUF>(gbytes));
        else if (!done && ver >= 5) launch_dq(dq_kernel<d, T, 2, TU::DQ_NBUF, 2>, dq_smem<d, 2, TU::DQ_NBUF>(gbytes));
        else if (!done && ver == 4) launch_dq(dq_kernel<d, T, 2, TU::DQ_NBUF>, dq_smem<d, 2, TU::DQ_NBUF>(gbytes));
        done = done || ver >= 4;
      }
      if (!done) launch_dq(dq_kernel<d, T, TU::DQ_G, TU::DQ_NBUF>, dq_smem<d, TU::DQ_G, TU::DQ_NBUF>(gbytes));
    }
    {
      GradArgs gk = g;
      gk.Sws = dSws; gk.dG = dGk; gk.has_s0 = grad_final;
      auto launch_dkv = [&](auto kern, size_t sm) {
        set_smem(kern, sm);
        kern<<<dim3(P.tpad / kBM, (unsigned)P.hk, (unsigned)P.b), kThreads, sm, st>>>(gk);
        check_launch("dkv_kernel");
      };
      const size_t dkv_sm = dkv_smem<d, TU::DKV_G, TU::DKV_NBUF>(gbytes);
      bool done = false;
      const int ver = kernel_version();
      if constexpr (d == 64) {
        if (state_wgmma_usable<d>(dkv_smem_wgmma<d>(gbytes))) {
          // No register bound (MINB = 1, session 18): 226 registers and one block per SM instead of two
          // blocks at 128 registers with ~0.9 KB of spills; 2.03 -> 1.98 ms at 64K, 1.96 -> 1.90 at 8K (H100).
          launch_dkv(dkv_kernel<d, T, TU::DKV_G, TU::DKV_NBUF, 1, 3>, dkv_smem_wgmma<d>(gbytes));
          done = true;
        }
      }
      if constexpr (d <= 64) {
        if (!done && ver >= 12) launch_dkv(dkv_kernel<d, T, TU::DKV_G, TU::DKV_NBUF, 2, 2>, dkv_sm);
        else if (!done && ver >= 5) launch_dkv(dkv_kernel<d, T, TU::DKV_G, TU::DKV_NBUF, 2>, dkv_sm);
        done = done || ver >= 5;
      }
      if (!done) launch_dkv(dkv_kernel<d, T, TU::DKV_G, TU::DKV_NBUF>, dkv_sm);
    }
  }
  if (gated && v2) {
    dlogg_local_kernel<<<dim3((unsigned)P.N, (unsigned)(P.b * P.hk)), kPT, 0, st>>>(
        dGq, dGk, part, P.nprefix, P.N > 1, need_dot, static_cast<float*>(A.dlog_g), P.t, P.hq, P.hk, P.C, P.N);
    check_launch("dlogg_local_kernel");
  } else if (gated) {
    dlogg_kernel<<<(unsigned)(P.b * P.hk), kScanThreads, 0, st>>>(dGq, dGk, dot, P.ntiles,
                                                                   static_cast<float*>(A.dlog_g), P.t, P.hq, P.hk);
    check_launch("dlogg_kernel");
  }
}

template <typename T, int d> int64_t step_impl(const RetentionStepArgs& A) {
  const RetentionDims& m = A.dims;
  cudaStream_t st = static_cast<cudaStream_t>(A.stream);
  const int64_t D = m.D, r = m.hq / m.hk;
  const int nft = (int)div_up(D, kStepFT);
  Carver ws{static_cast<char*>(A.workspace), A.workspace_bytes};
  float* part = ws.take<float>(m.b * m.t * m.hq * nft * (m.d + 1));
  StepArgs s{};
  s.q = A.q; s.k = A.k; s.v = A.v; s.log_g = static_cast<const float*>(A.log_g);
  s.S = static_cast<float*>(A.s); s.z = static_cast<float*>(A.z); s.part = part; s.y = A.y;
  s.b = m.b; s.t = m.t; s.hq = m.hq; s.hk = m.hk; s.scale = (float)m.scale; s.nft = nft;
  constexpr int RP = kThreads / (d / 4);
  const size_t sm = ((2 + r) * d + kStepFT + r * kStepFT + RP * (d + 1)) * 4 + kStepFT * 4;
  auto kern = kernel_version() >= 3 ? step_kernel<d, T, true> : step_kernel<d, T, false>;
  set_smem(kern, sm);
  kern<<<dim3(nft, (unsigned)(m.b * m.hk)), kThreads, sm, st>>>(s);
  check_launch("step_kernel");
  step_reduce_kernel<d, T><<<(unsigned)(m.b * m.t * m.hq), ((d + 1 + 31) / 32) * 32, 0, st>>>(
      part, nft, static_cast<T*>(A.y));
  check_launch("step_reduce_kernel");
  return -1;
}

}  // namespace
}  // namespace pr

int64_t power_retention_workspace_bytes_cuda(const RetentionDims& m, int which) {
  using namespace pr;
  const Plan P = make_plan(m);
  const int64_t nstate = align256(P.b * P.hk * P.N * P.D * P.E * 2);
  const int64_t gates = align256(P.b * P.hk * P.t * 4);  // v7's gate cumsums (carved last)
  // v9, one chunk: the forward's fp32 y and 1 / den (carved first)
  const int64_t rows = P.N == 1 ? align256(P.b * P.t * P.hq * P.d * 4) + align256(P.b * P.hq * P.t * 4) : 0;
  if (which == 0) return nstate + v2_extra_bytes(P) + gates + rows;
  if (which == 4) return rows + gates;  // one chunk, no state in or out: no chunk states at all
  if (which == 5)  // v11, a forward whose workspace is kept: the chunk states, then fp32 y and 1 / den
    return nstate + align256(P.b * P.t * P.hq * P.d * 4) + align256(P.b * P.hq * P.t * 4) + v2_extra_bytes(P) + gates;
  if (which == 1 || which == 3)  // 3: the chunk states come from the forward (saved_states)
    return (which == 1 ? 2 : 1) * nstate + v2_extra_bytes(P) + align256(P.b * P.hq * P.tpad * P.E * 2) + align256(P.b * P.hq * P.tpad * 8) +
           align256(P.b * P.t * P.hq * 4) + align256(P.b * P.t * P.hk * 4) + align256(P.b * P.hk * P.ntiles * 4) + gates;
  const int64_t nft = div_up(P.D, kStepFT);
  return align256(P.b * P.t * P.hq * nft * (P.d + 1) * 4);
}

int64_t power_retention_fwd_cuda(const RetentionFwdArgs& a) {
  using namespace pr;
  const RetentionDims& m = a.dims;
  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  for (auto [p, n] : {std::pair<const void*, const char*>{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.y, "y"}})
    check_aligned(p, n);
  if (m.b == 0) return 0;
  if (m.t == 0) {  // no tokens: the final state is the initial one
    const int64_t ns = m.b * m.hk * m.D * m.d * 4, nz = m.b * m.hk * m.D * 4;
    if (a.s_out) {
      if (a.s0) {
        PR_CHECK(cudaMemcpyAsync(a.s_out, a.s0, ns, cudaMemcpyDeviceToDevice, st));
        PR_CHECK(cudaMemcpyAsync(a.z_out, a.z0, nz, cudaMemcpyDeviceToDevice, st));
      } else {
        PR_CHECK(cudaMemsetAsync(a.s_out, 0, ns, st));
        PR_CHECK(cudaMemsetAsync(a.z_out, 0, nz, st));
      }
    }
    return 0;
  }
  int64_t res = -1;
  dispatch(m.dtype, m.d, [&](auto tag, auto dd) {
    using T = std::remove_pointer_t<decltype(tag)>;
    res = forward_impl<T, decltype(dd)::value>(a);
  });
  return res;
}

void power_retention_bwd_cuda(const RetentionBwdArgs& a) {
  using namespace pr;
  const RetentionDims& m = a.dims;
  cudaStream_t st = static_cast<cudaStream_t>(a.stream);
  for (auto [p, n] : {std::pair<const void*, const char*>{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.dy, "grad_y"},
                      {a.dq, "grad_q"}, {a.dk, "grad_k"}, {a.dv, "grad_v"}})
    check_aligned(p, n);
  if (m.b == 0) return;
  if (m.t == 0) {
    const int64_t ns = m.b * m.hk * m.D * m.d * 4, nz = m.b * m.hk * m.D * 4;
    if (a.ds0) {
      if (a.ds_out) PR_CHECK(cudaMemcpyAsync(a.ds0, a.ds_out, ns, cudaMemcpyDeviceToDevice, st));
      else PR_CHECK(cudaMemsetAsync(a.ds0, 0, ns, st));
      if (a.dz_out) PR_CHECK(cudaMemcpyAsync(a.dz0, a.dz_out, nz, cudaMemcpyDeviceToDevice, st));
      else PR_CHECK(cudaMemsetAsync(a.dz0, 0, nz, st));
    }
    return;
  }
  dispatch(m.dtype, m.d, [&](auto tag, auto dd) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_impl<T, decltype(dd)::value>(a);
  });
}

int64_t power_retention_step_cuda(const RetentionStepArgs& a) {
  using namespace pr;
  const RetentionDims& m = a.dims;
  for (auto [p, n] : {std::pair<const void*, const char*>{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.y, "y"},
                      {a.s, "state"}})
    check_aligned(p, n);
  if (m.b == 0 || m.t == 0) return 0;
  int64_t res = -1;
  dispatch(m.dtype, m.d, [&](auto tag, auto dd) {
    using T = std::remove_pointer_t<decltype(tag)>;
    res = step_impl<T, decltype(dd)::value>(a);
  });
  return res;
}

}  // namespace llmtrain
