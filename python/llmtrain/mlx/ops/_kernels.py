"""Metal kernel plumbing: source loading, per-configuration kernel specs, and the executor.

A ``KernelSpec`` is everything ``mx.fast.metal_kernel`` needs for one launch configuration: the
body file in ``metal/``, the generated ``#define`` header (every shape is a compile-time constant,
and each configuration gets its own kernel name), input and output names, grid, threadgroup,
output shapes and dtypes. ``run(spec, inputs)`` hands it to the current executor: MLX's Metal JIT
by default; tests swap in the CPU execution harness (tests/mlx/msl_harness) with
``set_executor`` so the whole Metal path (kernels and the MLX glue around them) runs on Linux.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

MSL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}
THREADGROUP_BYTES = 32768  # the threadgroup memory every Apple GPU offers

_backend_override: Optional[str] = None
_executor: Optional[Callable] = None


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------


def backend() -> str:
    """'metal' (Metal kernels) or 'mlx' (pure MLX ops) for the ops called now."""
    choice = _backend_override or os.environ.get("LLMTRAIN_MLX_KERNELS", "").strip().lower() or None
    if choice not in (None, "metal", "mlx"):
        raise ValueError(f"LLMTRAIN_MLX_KERNELS must be 'metal' or 'mlx', got {choice!r}")
    if choice is None:
        return "metal" if mx.metal.is_available() else "mlx"
    return choice


def set_backend(name: Optional[str]) -> None:
    """Force 'metal' or 'mlx' (None: automatic, Metal when available)."""
    global _backend_override
    if name not in (None, "metal", "mlx"):
        raise ValueError(f"backend must be 'metal', 'mlx' or None, got {name!r}")
    _backend_override = name


def set_executor(fn: Optional[Callable]) -> Optional[Callable]:
    """Replace the kernel executor (``fn(spec, inputs) -> list[mx.array]``); returns the old one.
    None restores MLX's Metal JIT."""
    global _executor
    old, _executor = _executor, fn
    return old


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def metal_dir() -> Path:
    """The installed ``llmtrain/metal/`` when present (wheel), else the repository's ``metal/``."""
    pkg = Path(__file__).resolve().parents[2]  # .../llmtrain
    for cand in (pkg / "metal", pkg.parents[1] / "metal"):
        if (cand / "common.h").is_file():
            return cand
    raise FileNotFoundError(f"llmtrain Metal sources not found (looked in {pkg / 'metal'} and {pkg.parents[1] / 'metal'})")


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    return (metal_dir() / name).read_text()


def float_literal(x: float) -> str:
    """An exact float literal for MSL / C++ (hex float, float suffix)."""
    return float(mx.array(x, dtype=mx.float32).item()).hex() + "f"


@dataclass(frozen=True)
class KernelSpec:
    name: str
    body: str
    input_names: tuple
    output_names: tuple
    defines: tuple  # ((name, value), ...)
    in_dtype: mx.Dtype
    grid: tuple
    threadgroup: tuple
    output_shapes: tuple
    output_dtypes: tuple

    @property
    def header(self) -> str:
        lines = [f"#define {k} {v}" for k, v in self.defines]
        lines.append(f"typedef {MSL_TYPES[self.in_dtype]} in_t;")
        return "\n".join(lines) + "\n" + read_source("common.h")

    @property
    def source(self) -> str:
        return read_source(self.body)


def _name(prefix: str, defines: Sequence, dtype) -> str:
    tag = "_".join(str(v).replace(".", "p").replace("-", "m").replace("+", "") for _, v in defines)
    return f"llmtrain_{prefix}_{MSL_TYPES[dtype]}_{tag}"


@functools.lru_cache(maxsize=256)
def _metal_kernel(name, input_names, output_names, source, header):
    return mx.fast.metal_kernel(name=name, input_names=list(input_names), output_names=list(output_names),
                                source=source, header=header, ensure_row_contiguous=True)


def metal_run(spec: KernelSpec, inputs: Sequence[mx.array], *, stream=None, verbose: bool = False):
    kernel = _metal_kernel(spec.name, spec.input_names, spec.output_names, spec.source, spec.header)
    kw = {"stream": stream} if stream is not None else {}
    return kernel(inputs=list(inputs), grid=spec.grid, threadgroup=spec.threadgroup,
                  output_shapes=[list(s) for s in spec.output_shapes], output_dtypes=list(spec.output_dtypes),
                  verbose=verbose, **kw)


def run(spec: KernelSpec, inputs: Sequence[mx.array]):
    if len(inputs) != len(spec.input_names):
        raise ValueError(f"{spec.name}: {len(inputs)} inputs for {len(spec.input_names)} names")
    return (_executor or metal_run)(spec, list(inputs))


# ---------------------------------------------------------------------------------------------
# Power retention specs
# ---------------------------------------------------------------------------------------------


def _fwd_bytes(C, D):
    return 4 * C * (3 * D + C + 2)


def _bwd_bytes(C, D):
    return 4 * C * (2 * D + (D + 1) + C + 1)


def metal_chunk(t: int, d: int, hint: Optional[int] = None) -> int:
    """Chunk of the Metal kernels: the largest power of two <= min(hint, 64, t rounded up) whose
    forward and backward threadgroup tiles fit in 32 KiB (d=64: 32; d=128: 16)."""
    cap = 64 if hint is None else max(1, min(64, hint))
    cap = min(cap, max(1, 1 << (max(t, 1) - 1).bit_length()))
    c = 1
    while c * 2 <= cap and max(_fwd_bytes(c * 2, d), _bwd_bytes(c * 2, d)) <= THREADGROUP_BYTES:
        c *= 2
    if max(_fwd_bytes(c, d), _bwd_bytes(c, d)) > THREADGROUP_BYTES:
        raise ValueError(f"power_retention (Metal): head dim {d} is too large for the kernels' tiles")
    return c


def retention_scan_spec(*, B, T, HK, HX, D, C, reverse, gated, xscale, dtype) -> KernelSpec:
    DF, E, R = D * (D + 1) // 2, D + 1, HX // HK
    NC = (T + C - 1) // C
    TG = 256
    TT = max(1, min(16, 6144 // (R * (D + E))))
    defines = (("PR_B", B), ("PR_T", T), ("PR_HK", HK), ("PR_HX", HX), ("PR_R", R), ("PR_D", D), ("PR_E", E),
               ("PR_DF", DF), ("PR_C", C), ("PR_NC", NC), ("PR_TG", TG), ("PR_TT", TT),
               ("PR_REVERSE", int(reverse)), ("PR_GATED", int(gated)), ("PR_XSCALE2", float_literal(xscale * xscale)))
    groups = (DF * E + TG - 1) // TG
    return KernelSpec(_name("pr_scan", defines, dtype), "power_retention_scan.metal", ("x", "y", "lg", "init"), ("out",),
                      defines, dtype, (groups * TG, B * HK, 1), (TG, 1, 1),
                      ((B, HK, NC + 1, DF, E),), (mx.float32,))


def retention_fwd_spec(*, B, T, HQ, HK, D, C, gated, first_state, scale, dtype) -> KernelSpec:
    DF, E, R = D * (D + 1) // 2, D + 1, HQ // HK
    NC = (T + C - 1) // C
    TG = 128
    defines = (("PR_B", B), ("PR_T", T), ("PR_HQ", HQ), ("PR_HK", HK), ("PR_R", R), ("PR_D", D), ("PR_E", E),
               ("PR_DF", DF), ("PR_C", C), ("PR_NC", NC), ("PR_TG", TG), ("PR_GATED", int(gated)),
               ("PR_FIRST_STATE", int(first_state)), ("PR_SCALE", float_literal(scale)))
    return KernelSpec(_name("pr_fwd", defines, dtype), "power_retention_fwd.metal", ("q", "k", "v", "gc", "states"),
                      ("y", "den_out"), defines, dtype, (TG, NC, B * HQ), (TG, 1, 1),
                      ((B, T, HQ, D), (B, T, HQ)), (dtype, mx.float32))


def retention_bwd_spec(*, B, T, HQ, HK, D, C, gated, first_state, final_ds, scale, dtype) -> KernelSpec:
    DF, E, R = D * (D + 1) // 2, D + 1, HQ // HK
    NC = (T + C - 1) // C
    TG = 128
    defines = (("PR_B", B), ("PR_T", T), ("PR_HQ", HQ), ("PR_HK", HK), ("PR_R", R), ("PR_D", D), ("PR_E", E),
               ("PR_DF", DF), ("PR_C", C), ("PR_NC", NC), ("PR_TG", TG), ("PR_GATED", int(gated)),
               ("PR_FIRST_STATE", int(first_state)), ("PR_FINAL_DS", int(final_ds)), ("PR_SCALE", float_literal(scale)))
    return KernelSpec(_name("pr_bwd", defines, dtype), "power_retention_bwd.metal",
                      ("q", "k", "v", "gc", "gh", "states", "dstates"), ("dq", "dk", "dv"), defines, dtype,
                      (TG, NC, B * HK), (TG, 1, 1), ((B, T, HQ, D), (B, T, HK, D), (B, T, HK, D)),
                      (mx.float32, mx.float32, mx.float32))


def retention_step_spec(*, B, T, HQ, HK, D, gated, scale, dtype) -> KernelSpec:
    DF, E, R = D * (D + 1) // 2, D + 1, HQ // HK
    TG = 256
    defines = (("PR_B", B), ("PR_T", T), ("PR_HQ", HQ), ("PR_HK", HK), ("PR_R", R), ("PR_D", D), ("PR_E", E),
               ("PR_DF", DF), ("PR_TG", TG), ("PR_GATED", int(gated)), ("PR_SCALE", float_literal(scale)))
    return KernelSpec(_name("pr_step", defines, dtype), "power_retention_step.metal", ("q", "k", "v", "lg", "s_in"),
                      ("s_out", "numden"), defines, dtype, (TG, E, B * HK), (TG, 1, 1),
                      ((B, HK, DF, E), (B, T, HQ, E)), (mx.float32, mx.float32))


# ---------------------------------------------------------------------------------------------
# RMSNorm + Linear specs
# ---------------------------------------------------------------------------------------------


def rms_rstd_spec(*, N, K, eps, dtype) -> KernelSpec:
    TG = 128 if K >= 128 else 32
    defines = (("RL_N", N), ("RL_K", K), ("RL_TG", TG), ("RL_EPS", float_literal(eps)))
    return KernelSpec(_name("rl_rstd", defines, dtype), "rmsnorm_rstd.metal", ("x",), ("rstd",), defines, dtype,
                      (TG, N, 1), (TG, 1, 1), ((N,),), (mx.float32,))


def rms_gemm_spec(*, mode, N, K, M, has_bias, dtype) -> KernelSpec:
    rows, cols, inner = {0: (N, M, K), 1: (N, K, M), 2: (M, K, N)}[mode]
    names = {0: ("x", "g", "w", "rstd") + (("bias",) if has_bias else ()), 1: ("dy", "w"), 2: ("dy", "x", "g", "rstd")}[mode]
    out_dtype = mx.float32 if mode == 1 else dtype
    defines = (("RL_MODE", mode), ("RL_N", N), ("RL_K", K), ("RL_M", M), ("RL_ROWS", rows), ("RL_COLS", cols),
               ("RL_INNER", inner), ("RL_HAS_BIAS", int(has_bias)))
    grid = (((cols + 15) // 16) * 16, ((rows + 15) // 16) * 16, 1)
    return KernelSpec(_name("rl_gemm", defines, dtype), "rmsnorm_linear_gemm.metal", names, ("out",), defines, dtype,
                      grid, (16, 16, 1), ((rows, cols),), (out_dtype,))


def rms_bwd_rows_spec(*, N, K, dtype) -> KernelSpec:
    TG = 128 if K >= 128 else 32
    defines = (("RL_N", N), ("RL_K", K), ("RL_TG", TG))
    return KernelSpec(_name("rl_bwd_rows", defines, dtype), "rmsnorm_linear_bwd_rows.metal", ("x", "g", "rstd", "dxn"),
                      ("dx",), defines, dtype, (TG, N, 1), (TG, 1, 1), ((N, K),), (dtype,))
