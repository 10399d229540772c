"""Which part of the RMSNorm + Linear forward+backward doubles? Distributions, not medians (CUDA only).

    python3 bench/rmsnorm_linear_parts.py [--shape 16384,2048,2048] [--rounds 6] [--iters 200]
        [--impls ours,eager] [--graph] [--json PATH] [--max-s SECONDS]
    On the device machine, after the build and the tests:
    RMS_PLAN=parts RMSNORM_LINEAR_S=240 RMS_PARTS_ARGS=--graph bash bench/device_session.sh rmsnorm_linear

docs/perf.md ("RMSNorm + Linear (CUDA)", session 8): at 16384 x 2048 -> 2048 bf16 on an H100 the
do_bench median of our forward+backward is bimodal across rounds (0.70 vs 1.0-1.4 ms; Liger and
torch.compile too, eager not) while the forward is steady. Each round here measures, with the same
inputs and the same implementations as bench/rmsnorm_linear_table.py (its helpers are imported):

1. per-iteration CUDA-event times (each iteration between its own pair of events, as do_bench does,
   with and without do_bench's L2 flush: zeroing a 256 MB buffer before each iteration), for the
   bare GEMM, forward, backward alone (the forward re-run before the start event, untimed) and
   forward+backward of each implementation; also the host time to enqueue each iteration;
2. a torch-profiler kernel list of forward+backward iterations (L2 flushed, as do_bench): per kernel,
   by its position in the forward or backward, the duration of every call, and per iteration the
   span from the first kernel's start to the last one's end against the sum of the kernels (the
   difference is launch gaps: host effects rather than kernel effects);
3. torch's caching-allocator counters (memory_stats: retries, cudaMalloc/cudaFree of segments,
   syncs of all streams) before and after each block, and the device's stream-ordered memory pool
   (the one our extension allocates from) through the driver API;
4. with --graph, forward+backward captured into one CUDA graph per implementation and its replays
   timed like the other cases (same kernels, no host launches, no allocator calls).
A do_bench median of each forward+backward opens every round (when triton is installed), so a
"slow" round of the table can be matched with the per-iteration and per-kernel numbers of that round.

Where our backward gets its workspace (csrc/cuda/rmsnorm_linear.cu, backward_fast; DeviceBuffer in
rmsnorm_linear_common.cuh): NOT from torch. dx, dg, dW come from torch's caching allocator
(python/llmtrain/ops/rmsnorm_linear/op.py); one scratch buffer -- xn [n, k] in the input dtype
(64 MiB at the 2048 shape), then the fp32 dg partials [nb, k] (and dbias partials [nb, m] with a bias),
nb = min(row blocks, 2-4 per SM) -- is taken with cudaMallocAsync on the caller's stream before the
dgrad GEMM and given back with cudaFreeAsync after the wgrad GEMM. The forward does the same for
wg = W diag(g) [m, k] (8 MiB). Both come from the device's current stream-ordered pool (the default
pool), whose release threshold the extension sets to "unlimited" on its first allocation
(keep_pool_memory), so freed blocks stay mapped and are reused; torch.cuda.memory_stats() does not
see them, the pool table below does. Under CUDA-graph capture the same calls become graph memory
nodes, and the row pass's fused dg reduction (a per-stream ticket) falls back to the separate
reduce_parts kernel.

Kernels of our default forward+backward, in launch order: forward prep_fwd_s8 (rstd, W diag(g)),
CUTLASS GEMM (y); backward CUTLASS dgrad GEMM (dy W into dx), row_bwd_s8 (dx, xn, dg), CUTLASS wgrad
GEMM (dy^T xn). The CUTLASS kernels share one template name, hence the positions in the kernel table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rmsnorm_linear_table as table  # noqa: E402  (inputs, eager, make_impls, ENV, the do_bench wrapper)

DEFAULT_SHAPE = table.SHAPES[0]  # 16384 x 2048 -> 2048: the shape whose fwd+bwd is bimodal
SLOW = 1.25  # an iteration this many times the block's fastest counts as slow (the "slow" column)
FLUSH_BYTES = 256_000_000  # do_bench's L2 flush buffer (triton: 256e6 // 4 int32s, zeroed per iteration)
# torch caching-allocator counters worth a delta: a retry frees cached blocks and calls cudaMalloc again
# after synchronizing; segments are cudaMalloc / cudaFree calls.
ALLOC_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "segment.all.allocated",
              "segment.all.freed", "num_sync_all_streams", "num_ooms")


# ---- statistics and tables (pure Python: tests/training/test_bench_rmsnorm_linear_parts.py) ----

def percentile(sorted_values, q):
    """Linear interpolation between the closest ranks (numpy's default), q in [0, 1]."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values):
    """n, min, p10, median, p90, max and the share of slow samples (> SLOW x min) of a list."""
    s = sorted(values)
    if not s:
        return {"n": 0, "min": None, "p10": None, "median": None, "p90": None, "max": None, "slow": None}
    return {"n": len(s), "min": s[0], "p10": percentile(s, 0.1), "median": percentile(s, 0.5),
            "p90": percentile(s, 0.9), "max": s[-1], "slow": sum(v > SLOW * s[0] for v in s) / len(s)}


def cell(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers, rows, digits=3):
    """A markdown table; floats with `digits` decimals, None as '-'."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stats_cells(values):
    """The summary of values as table cells: n, min, p10, median, p90, max, slow %."""
    st = summarize(values)
    slow = None if st["slow"] is None else f"{100 * st['slow']:.0f}%"
    return [st["n"], st["min"], st["p10"], st["median"], st["p90"], st["max"], slow]


STATS_HEADERS = ["n", "min", "p10", "median", "p90", "max", f">{SLOW}x min"]


# ---- kernel names and profiler traces (pure Python on lists of Kernel) ----

class Kernel:
    """One kernel (or memset/memcpy) from the profiler: name, start and duration in microseconds."""

    def __init__(self, name, start_us, dur_us):
        self.name, self.start_us, self.dur_us = name, start_us, dur_us

    @property
    def end_us(self):
        return self.start_us + self.dur_us


def short_name(name, width=48):
    """A readable label for a demangled kernel name: its function and the first template argument
    that names something (cutlass::device_kernel<GemmUniversal>, row_bwd_s8<__nv_bfloat16>)."""
    s = name.replace("(anonymous namespace)::", "")
    s = s[5:] if s.startswith("void ") else s
    depth = 0
    for i, c in enumerate(s):  # cut the parameter list: the first '(' outside template brackets
        depth += (c == "<") - (c == ">")
        if c == "(" and depth == 0:
            s = s[:i]
            break
    head, _, inner = s.partition("<")
    label = head.split("::")[-1] or head
    first = re.search(r"[A-Za-z_][\w:]*", inner)
    if first:
        label += "<" + first.group(0).split("::")[-1] + ">"
    return label[:width]


def is_boundary(name):
    """Our iteration markers: the L2 flush and the forward/backward marker are both zero_() of an
    int32 buffer (FillFunctor<int>); no implementation under test launches one."""
    return "FillFunctor<int>" in name


def split_iterations(kernels):
    """Kernels (sorted by start) of iterations launched as [flush] forward [marker] backward ->
    one dict per iteration: flush_us, fwd and bwd kernel lists. Anything before the first flush
    and an incomplete last iteration are dropped."""
    segments = []
    for k in kernels:
        if is_boundary(k.name):
            segments.append([k])
        elif segments:
            segments[-1].append(k)
    return [{"flush_us": a[0].dur_us, "fwd": a[1:], "bwd": b[1:]}
            for a, b in zip(segments[0::2], segments[1::2])]


def kernel_positions(iterations, phase):
    """Per kernel of a phase: (position, name, durations). By position when every iteration launched
    the same sequence (CUTLASS kernels share a name: the position tells dgrad from wgrad), else by
    name in order of first appearance (position '-')."""
    seqs = [[k.name for k in it[phase]] for it in iterations]
    if seqs and all(s == seqs[0] for s in seqs):
        return [(i, name, [it[phase][i].dur_us for it in iterations]) for i, name in enumerate(seqs[0])]
    by_name = {}
    for it in iterations:
        for k in it[phase]:
            by_name.setdefault(k.name, []).append(k.dur_us)
    return [("-", name, durs) for name, durs in by_name.items()]


def span_and_busy(kernels):
    """First start to last end, and the sum of durations (us): span - busy = the gaps between them."""
    if not kernels:
        return 0.0, 0.0
    return max(k.end_us for k in kernels) - min(k.start_us for k in kernels), sum(k.dur_us for k in kernels)


# ---- device side ----

impl_env = table.impl_env  # the table's environment for an implementation (ours_s7, ours_sepred, ...)


def autograd_parts(f, x, g, w, dy):
    """forward() -> y with the graph, backward(y) -> grads: the two halves of the table's fwd_bwd_fn."""
    xs, gs, ws = (t.detach().requires_grad_(True) for t in (x, g, w))
    return (lambda: f(xs, gs, ws)), (lambda y: torch.autograd.grad(y, (xs, gs, ws), dy))


def build_cases(impls, x, g, w, dy):
    """name -> (impl, prepare, run): run(prepare()) is timed; prepare (untimed) may be None."""
    cases = {"gemm": (None, None, table.gemm_fn(x, w))}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        for name, f in impls.items():
            if mode == "fwd":
                cases[f"fwd {name}"] = (name, None, table.fwd_fn(f, x, g, w))
            elif mode == "bwd":
                fwd, bwd = autograd_parts(f, x, g, w, dy)
                cases[f"bwd {name}"] = (name, fwd, bwd)
            else:
                cases[f"fwd+bwd {name}"] = (name, None, table.fwd_bwd_fn(f, x, g, w, dy))
    return cases


def capture_graph(run):
    """One CUDA graph of run() (warm-up on a side stream first, as torch's docs ask). Returns the graph
    and run()'s outputs, which must stay alive while it is replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    torch.cuda.synchronize()
    return graph, out


def time_each(run, prepare, iters, warmup, flush):
    """Per-iteration GPU times (ms, CUDA events around each run) and host enqueue times (ms). flush:
    zero the L2-sized buffer before each iteration, outside the events (as do_bench); prepare runs
    outside the events too (the backward case's forward)."""
    def once(start=None, end=None):
        if flush is not None:
            flush.zero_()
        state = prepare() if prepare else None
        if start is not None:
            start.record()
        t0 = time.perf_counter()
        run(state) if prepare else run()
        host = time.perf_counter() - t0
        if end is not None:
            end.record()
        return host

    for _ in range(warmup):
        once()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    host = [1e3 * once(s, e) for s, e in zip(starts, ends)]
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], host


def profile_fwd_bwd(f, x, g, w, dy, iters, flush, marker):
    """The device kernels of `iters` forward+backward iterations launched as flush, forward, marker,
    backward (do_bench's pattern plus one tiny marker kernel), split per iteration."""
    from torch.autograd import DeviceType

    fwd, bwd = autograd_parts(f, x, g, w, dy)
    for _ in range(3):
        bwd(fwd())
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            y = fwd()
            marker.zero_()
            bwd(y)
        torch.cuda.synchronize()
    kernels = [Kernel(e.name, e.time_range.start, e.time_range.end - e.time_range.start) for e in prof.events()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    return split_iterations(sorted(kernels, key=lambda k: k.start_us))


class MemPool:
    """The device's current stream-ordered memory pool (cudaMallocAsync's), read through the driver
    API: torch has no view of it. Every method returns None where the driver refuses."""
    ATTRS = {"release_threshold": 4, "reserved_current": 5, "reserved_high": 6, "used_current": 7,
             "used_high": 8}  # CUmemPool_attribute (cuda.h)

    def __init__(self, device_index):
        self.pool = None
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
            dev, pool = ctypes.c_int(), ctypes.c_void_p()
            if self.lib.cuDeviceGet(ctypes.byref(dev), device_index) == 0 and \
                    self.lib.cuDeviceGetMemPool(ctypes.byref(pool), dev) == 0:
                self.pool = pool
        except OSError:
            pass

    def state(self):
        if self.pool is None:
            return None
        out = {}
        for key, attr in self.ATTRS.items():
            val = ctypes.c_uint64()
            if self.lib.cuMemPoolGetAttribute(self.pool, attr, ctypes.byref(val)) != 0:
                return None
            out[key] = val.value
        return out

    def set_release_threshold(self, nbytes):
        val = ctypes.c_uint64(nbytes)
        return self.pool is not None and \
            self.lib.cuMemPoolSetAttribute(self.pool, self.ATTRS["release_threshold"], ctypes.byref(val)) == 0


def alloc_counters():
    stats = torch.cuda.memory_stats()
    return {key: stats.get(key, 0) for key in ALLOC_KEYS}


def measure_block(case, flush, pool, args):
    """One case, one L2 mode: times plus what the allocators did meanwhile."""
    impl, prepare, run = case
    before, pool_before = alloc_counters(), pool.state()
    with impl_env(impl) if impl else contextlib.nullcontext():
        gpu, host = time_each(run, prepare, args.iters, args.warmup, flush)
    after, pool_after = alloc_counters(), pool.state()
    return {"gpu_ms": gpu, "host_ms": host, "alloc": {k: after[k] - before[k] for k in ALLOC_KEYS},
            "pool_before": pool_before, "pool_after": pool_after}


def do_bench_ms(impl, run):
    """The table's do_bench median, or None without triton."""
    try:
        with impl_env(impl):
            return table.measure(run)
    except ImportError:
        return None


def run_round(impls, cases, tensors, flush, marker, pool, args):
    x, g, w, dy = tensors
    result = {"t_start": time.time(), "do_bench": {}, "blocks": {}, "kernels": {}}
    for name, f in impls.items():  # the table's number for this round, first
        result["do_bench"][name] = do_bench_ms(name, table.fwd_bwd_fn(f, x, g, w, dy))
    for case_name, case in cases.items():
        for mode, buf in (("flush", flush), ("noflush", None)):
            result["blocks"][f"{case_name}|{mode}"] = measure_block(case, buf, pool, args)
    for name, f in impls.items():
        with impl_env(name):
            its = profile_fwd_bwd(f, x, g, w, dy, args.profile_iters, flush, marker)
        result["kernels"][name] = kernel_summary(its)
    result["t_end"] = time.time()
    return result


def kernel_summary(iterations):
    """JSON-ready: per phase the kernels by position with every call's duration, spans and busy sums."""
    out = {"iterations": len(iterations), "flush_us": [it["flush_us"] for it in iterations]}
    for phase in ("fwd", "bwd"):
        out[phase] = [{"pos": pos, "name": name, "us": durs} for pos, name, durs in kernel_positions(iterations, phase)]
        spans = [span_and_busy(it[phase]) for it in iterations]
        out[f"{phase}_span_us"] = [s for s, _ in spans]
        out[f"{phase}_busy_us"] = [b for _, b in spans]
    return out


# ---- report ----

def case_keys(rounds):
    return list(rounds[0]["blocks"]) if rounds else []


def iteration_table(rounds):
    rows = []
    for key in case_keys(rounds):
        case, mode = key.split("|")
        gpu = [v for r in rounds for v in r["blocks"][key]["gpu_ms"]]
        host = summarize([v for r in rounds for v in r["blocks"][key]["host_ms"]])
        rows.append([case, "yes" if mode == "flush" else "no"] + stats_cells(gpu) + [host["median"], host["p90"]])
    return markdown_table(["case", "L2 flush"] + STATS_HEADERS + ["host median", "host p90"], rows)


def round_table(rounds):
    """Medians per round: a round-level mode shows as a column, a per-iteration one as p90 >> median."""
    heads = [f"r{i}" for i in range(len(rounds))]
    rows = [[f"do_bench fwd+bwd {name}", "yes"] + [r["do_bench"][name] for r in rounds]
            for name in rounds[0]["do_bench"]] if rounds else []
    for key in case_keys(rounds):
        case, mode = key.split("|")
        rows.append([case, "yes" if mode == "flush" else "no"] +
                    [summarize(r["blocks"][key]["gpu_ms"])["median"] for r in rounds])
    return markdown_table(["case", "L2 flush"] + heads, rows)


def kernel_table(rounds):
    rows = []
    for impl in rounds[0]["kernels"] if rounds else []:
        for phase in ("fwd", "bwd"):
            for j, k in enumerate(rounds[0]["kernels"][impl][phase]):
                same = [r["kernels"][impl][phase][j] for r in rounds
                        if j < len(r["kernels"][impl][phase]) and r["kernels"][impl][phase][j]["name"] == k["name"]]
                durs = [d for kk in same for d in kk["us"]]
                per_round = [summarize(kk["us"])["median"] for kk in same]
                rows.append([impl, phase, k["pos"], short_name(k["name"])] + stats_cells(durs) +
                            [" / ".join(cell(v, 1) for v in per_round)])
    return markdown_table(["impl", "phase", "#", "kernel"] + STATS_HEADERS + ["median per round"], rows, digits=1)


def gap_table(rounds):
    rows = []
    for impl in rounds[0]["kernels"] if rounds else []:
        for phase in ("fwd", "bwd"):
            span = [v for r in rounds for v in r["kernels"][impl][f"{phase}_span_us"]]
            busy = [v for r in rounds for v in r["kernels"][impl][f"{phase}_busy_us"]]
            gap = [s - b for s, b in zip(span, busy)]
            per_round = [summarize(r["kernels"][impl][f"{phase}_span_us"])["median"] for r in rounds]
            rows.append([impl, phase, summarize(busy)["median"], summarize(span)["median"],
                         summarize(gap)["p10"], summarize(gap)["median"], summarize(gap)["p90"],
                         " / ".join(cell(v, 1) for v in per_round)])
        flush = [v for r in rounds for v in r["kernels"][impl]["flush_us"]]
        rows.append([impl, "L2 flush (zero 256 MB)", summarize(flush)["median"], None, None, None, None,
                     " / ".join(cell(summarize(r["kernels"][impl]["flush_us"])["median"], 1) for r in rounds)])
    return markdown_table(["impl", "phase", "busy median", "span median", "gap p10", "gap median", "gap p90",
                           "span median per round"], rows, digits=1)


def alloc_table(rounds):
    """Blocks where torch's allocator or the stream-ordered pool did anything (else one line says so)."""
    mib = 1 / 2**20
    rows = []
    for i, r in enumerate(rounds):
        for key, block in r["blocks"].items():
            d = block["alloc"]
            pb, pa = block["pool_before"], block["pool_after"]
            pool_moved = pb and pa and (pb["reserved_current"] != pa["reserved_current"] or
                                        pb["reserved_high"] != pa["reserved_high"])
            if any(d.values()) or pool_moved:
                rows.append([i, key.replace("|", " ")] + [d[k] for k in ALLOC_KEYS] +
                            [f"{pb['reserved_current'] * mib:.0f} -> {pa['reserved_current'] * mib:.0f}"
                             if pb and pa else "-"])
    if not rows:
        return "no allocator activity in any timed block (no cudaMalloc, retry or pool growth)"
    return markdown_table(["round", "block"] + list(ALLOC_KEYS) + ["pool reserved MiB"], rows)


def pool_line(state):
    if state is None:
        return "stream-ordered pool: not readable through libcuda"
    mib = 1 / 2**20
    thr = state["release_threshold"]
    thr_s = "unlimited" if thr >= 2**63 else f"{thr * mib:.0f} MiB"
    return (f"stream-ordered pool: release threshold {thr_s}, reserved {state['reserved_current'] * mib:.0f} MiB "
            f"(high {state['reserved_high'] * mib:.0f}), used {state['used_current'] * mib:.0f} MiB "
            f"(high {state['used_high'] * mib:.0f})")


def report(meta, rounds, graph_errors):
    out = [f"# rmsnorm_linear_parts: {meta['shape']} bf16, {meta['device']}, torch {meta['torch']}; "
           f"{len(rounds)} rounds x {meta['iters']} iterations (warm-up {meta['warmup']}), "
           f"profiler {meta['profile_iters']} iterations per round; times in ms unless marked us",
           "", pool_line(meta["pool_end"])]
    out += [f"graph capture failed for {name}: {err}" for name, err in graph_errors.items()]
    out += ["", "## 1. Per-iteration CUDA-event times (ms), all rounds pooled; host = time to enqueue",
            "", iteration_table(rounds),
            "", "## 2. Median per round (ms): a mode that flips between rounds shows here",
            "", round_table(rounds),
            "", "## 3. Kernels per call (us), profiler, L2 flushed, forward+backward iterations",
            "", kernel_table(rounds),
            "", "## 4. Per iteration: kernel time (busy) vs first start to last end (span), us",
            "", gap_table(rounds),
            "", "## 5. Allocator activity during the timed blocks (deltas)",
            "", alloc_table(rounds)]
    return "\n".join(out)


def round_line(i, r, impls):
    def med(key):
        block = r["blocks"].get(key)
        return cell(summarize(block["gpu_ms"])["median"]) if block else "-"
    parts = [f"{name}: do_bench {cell(r['do_bench'][name])}, events {med(f'fwd+bwd {name}|flush')}, "
             f"bwd {med(f'bwd {name}|flush')}" for name in impls]
    clock = "-".join(time.strftime("%H:%M:%S", time.localtime(r[t])) for t in ("t_start", "t_end"))
    return f"# round {i} ({clock}, {r['t_end'] - r['t_start']:.1f} s): fwd+bwd " + "; ".join(parts)


# ---- main ----

def parse_shape(text):
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected N,K,M (three positive integers), got {text!r}")
    return dims


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=parse_shape, default=",".join(map(str, DEFAULT_SHAPE)),
                    help="rows,hidden,out (default %(default)s)")
    ap.add_argument("--impls", default="ours,eager",
                    help="implementations (rmsnorm_linear_table names: ours, ours_s7, ours_sepred, liger, "
                    "compiled, ...); eager is always measured")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=200, help="timed iterations per case and round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--profile-iters", type=int, default=50)
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays of forward+backward")
    ap.add_argument("--pool-release-threshold", type=int, metavar="BYTES",
                    help="set the stream-ordered pool's release threshold after the warm-up (A/B: 0 makes "
                    "every synchronization unmap the extension's free workspaces)")
    ap.add_argument("--max-s", type=float, default=0, help="start no new round after this many seconds "
                    "(0: no limit); the tables of the rounds done are printed")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    for name in ("rounds", "iters", "profile_iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def select_impls(names):
    impls = table.make_impls()
    keep = [n for n in names.split(",") if n] + ["eager"]
    unknown = sorted(set(keep) - set(impls))
    if unknown:
        raise SystemExit(f"rmsnorm_linear_parts.py: unknown implementations {unknown}; known: {sorted(impls)}")
    return {name: impls[name] for name in dict.fromkeys(keep)}


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("rmsnorm_linear_parts.py: needs a CUDA GPU (torch.cuda.is_available() is False); on the device "
              "machine: RMS_PLAN=parts bash bench/device_session.sh rmsnorm_linear", file=sys.stderr)
        return 1
    from llmtrain.ops import _native

    if not _native.has_cuda_kernels():
        print("rmsnorm_linear_parts.py: llmtrain._C has no CUDA kernels (build it for this GPU first): "
              "'ours' would be torch's fallback", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    impls = select_impls(args.impls)
    tensors = table.inputs(*args.shape)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int, device="cuda")
    marker = torch.zeros(1, dtype=torch.int, device="cuda")
    cases = build_cases(impls, *tensors)
    for name, (impl, prepare, run) in cases.items():  # first calls: compile, CUTLASS init, pool growth
        with impl_env(impl) if impl else contextlib.nullcontext():
            run(prepare()) if prepare else run()
    graphs, graph_errors = {}, {}
    if args.graph:
        for name, f in impls.items():
            try:
                with impl_env(name):
                    graphs[name] = capture_graph(table.fwd_bwd_fn(f, *tensors))
                cases[f"graph fwd+bwd {name}"] = (None, None, graphs[name][0].replay)
            except Exception as exc:  # the op or torch refusing capture is itself a result
                graph_errors[name] = f"{type(exc).__name__}: {exc}"
    torch.cuda.synchronize()
    pool = MemPool(torch.cuda.current_device())
    if args.pool_release_threshold is not None and not pool.set_release_threshold(args.pool_release_threshold):
        print("# could not set the pool's release threshold", file=sys.stderr)
    meta = {"shape": "{}x{}->{}".format(*args.shape), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
            "profile_iters": args.profile_iters, "impls": list(impls), "env": table.ENV,
            "pool_start": pool.state(), "graph_errors": graph_errors, "argv": sys.argv[1:]}
    print(f"# {meta['shape']} on {meta['device']}; setup {time.time() - t0:.1f} s; {pool_line(meta['pool_start'])}",
          flush=True)
    rounds = []
    for i in range(args.rounds):
        rounds.append(run_round(impls, cases, tensors, flush, marker, pool, args))
        print(round_line(i, rounds[-1], impls), flush=True)
        meta["pool_end"] = pool.state()
        if args.json:  # after every round: a timeout keeps the rounds done
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "rounds": rounds}, fh)
        last = rounds[-1]["t_end"] - rounds[-1]["t_start"]
        if args.max_s and time.time() - t0 + last > args.max_s:
            print(f"# stopping after {i + 1} rounds: --max-s {args.max_s:g}", flush=True)
            break
    print(report(meta, rounds, graph_errors), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
