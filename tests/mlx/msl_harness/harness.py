"""Linux-side checks of the Metal kernels, on the exact MSL that MLX generates.

- ``generated_msl(spec, inputs)``: the full kernel source MLX writes for a launch (signature from
  the input/output names and dtypes, our header and body). Obtained without a Metal device by
  tracing the launch under ``mx.export_function`` with ``stream=mx.gpu, verbose=True``, which
  prints the source (``mx.fast.metal_kernel`` only records the kernel while exporting).
- ``syntax_check(msl)``: clang's C++ for OpenCL front end with ``opencl_prelude.h`` (the ``clang``
  executable when on PATH, else libclang from the ``libclang`` PyPI wheel).
- ``execute(spec, inputs)`` / ``HarnessExecutor``: compile that MSL as C++20 with ``msl_shim.h``
  (g++), run every threadgroup's threads concurrently on CPU threads, return the outputs as
  ``mx.array``s (outputs are poisoned with NaN first, so unwritten entries show).
  ``HarnessExecutor`` plugs into ``llmtrain.mlx.ops._kernels.set_executor`` so the ops' whole
  Metal path (kernels and MLX glue) runs on Linux.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from llmtrain.mlx.ops import _kernels as K

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("LLMTRAIN_MSL_HARNESS_CACHE", Path(tempfile.gettempdir()) / "llmtrain_msl_harness"))

_CTYPES = {mx.float32: ("float", np.float32), mx.float16: ("float16_t", np.float16),
           mx.bfloat16: ("bfloat16_t", np.uint16), mx.int32: ("int32_t", np.int32),
           mx.uint32: ("uint32_t", np.uint32)}


# ---------------------------------------------------------------------------------------------
# The MSL MLX generates
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _capture_fd1():
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        box = {}
        try:
            yield box
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode()


_MSL_CACHE: dict = {}


def generated_msl(spec: K.KernelSpec, inputs) -> str:
    """The exact source MLX hands to the Metal compiler for this launch (before its own utility
    header, which our prelude/shim stand in for)."""
    key = (spec, tuple((tuple(x.shape), x.dtype) for x in inputs))
    if key in _MSL_CACHE:
        return _MSL_CACHE[key]

    def launch(*arrays):
        return K.metal_run(spec, arrays, stream=mx.gpu, verbose=True)

    with tempfile.TemporaryDirectory() as d, _capture_fd1() as box:
        mx.export_function(os.path.join(d, "k.mlxfn"), launch, *inputs)
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```", box["text"], re.S)
    if not m:
        raise RuntimeError(f"MLX printed no kernel source for {spec.name}:\n{box['text'][:2000]}")
    _MSL_CACHE[key] = m.group(1)
    return m.group(1)


_SIG = re.compile(r"\[\[kernel\]\]\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)


def parse_signature(msl: str):
    """(kernel name, [(kind, type, name)]) with kind 'buffer' or 'attr'."""
    m = _SIG.search(msl)
    if not m:
        raise ValueError("no [[kernel]] function in the source")
    params = []
    for part in m.group(2).split(",\n"):
        part = part.strip()
        attr = re.search(r"\[\[(\w+)(?:\((\d+)\))?\]\]", part)
        decl = part[: attr.start()].strip() if attr else part
        name = decl.split()[-1]
        ctype = decl[: decl.rfind(name)].strip()
        params.append(("buffer" if attr and attr.group(1) == "buffer" else "attr", ctype, name))
    return m.group(1), params


# ---------------------------------------------------------------------------------------------
# clang syntax check (C++ for OpenCL)
# ---------------------------------------------------------------------------------------------


def clang_tools() -> list[str]:
    """The front ends present: 'clang' (an executable on PATH, e.g. Debian's clang) and/or
    'libclang' (the ``libclang`` PyPI wheel: libclang.so with its Python bindings)."""
    tools = ["clang"] if shutil.which("clang") else []
    try:
        import clang.cindex as ci

        ci.Index.create()
        tools.append("libclang")
    except Exception:
        pass
    return tools


def clang_available() -> str | None:
    tools = clang_tools()
    return tools[0] if tools else None


def _opencl_text(msl: str) -> str:
    return msl.replace("[[kernel]]", "__kernel")


CLANG_ARGS = ["-x", "cl", "-cl-std=clc++2021", "-cl-no-stdinc", "-fsyntax-only", "-Wno-unknown-attributes"]


def syntax_check(msl: str, tool: str | None = None) -> tuple[bool, str]:
    """Syntax- and type-check the MSL with clang's C++ for OpenCL mode. Returns (ok, diagnostics)."""
    tool = tool or clang_available()
    text = _opencl_text(msl)
    prelude = str(HERE / "opencl_prelude.h")
    if tool == "clang":
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "kernel.cl"
            src.write_text(text)
            p = subprocess.run(["clang", *CLANG_ARGS, "-include", prelude, str(src)], capture_output=True, text=True)
            return p.returncode == 0, p.stderr
    if tool == "libclang":
        import clang.cindex as ci

        tu = ci.Index.create().parse("kernel.cl", args=[*CLANG_ARGS, "-include", prelude],
                                     unsaved_files=[("kernel.cl", text)])
        diags = [d for d in tu.diagnostics if d.severity >= ci.Diagnostic.Error]
        return not diags, "\n".join(f"{d.location.line}:{d.location.column}: {d.spelling}" for d in diags)
    raise RuntimeError("no clang: install the 'clang' package (apt) or 'libclang' (pip)")


# ---------------------------------------------------------------------------------------------
# C++ execution harness
# ---------------------------------------------------------------------------------------------

_TG_DECL = re.compile(r"\bthreadgroup\s+(?=[A-Za-z_][\w:]*\s+[A-Za-z_]\w*\s*(\[|;))")


def cpp_text(msl: str) -> str:
    """MSL -> the C++ the shim compiles: threadgroup declarations become function statics."""
    return _TG_DECL.sub("static ", msl)


def driver_source(spec: K.KernelSpec, msl: str, inputs) -> str:
    kname, params = parse_signature(msl)
    lines = ['#include "msl_shim.h"', cpp_text(msl), '#include "msl_shim_end.h"',
             "int main(int argc, char** argv) {", "  const std::string dir = argv[1];"]
    args = []
    n_in = len(spec.input_names)
    buffers = [p for p in params if p[0] == "buffer"]
    if len(buffers) != n_in + len(spec.output_names):
        raise NotImplementedError(f"{spec.name}: shape/stride parameters are not supported by the harness")
    for i, x in enumerate(inputs):
        ctype = _CTYPES[x.dtype][0]
        lines.append(f"  auto in{i} = msl::load<{ctype}>(dir + \"/in{i}.bin\", {x.size});")
    for i, (shape, dt) in enumerate(zip(spec.output_shapes, spec.output_dtypes)):
        n = int(np.prod(shape))
        lines.append(f"  auto out{i} = msl::poisoned<{_CTYPES[dt][0]}>({n});")
    for kind, ctype, name in params:
        if kind == "buffer":
            if name in spec.input_names:
                i = spec.input_names.index(name)
                args.append(f"in{i}[0]" if ctype.endswith("&") else f"in{i}.data()")
            else:
                args.append(f"out{spec.output_names.index(name)}.data()")
        else:
            args.append(f"c.{name}")
    gx, gy, gz = spec.grid
    tx, ty, tz = spec.threadgroup
    lines.append(f"  msl::launch(uint3{{{gx}u, {gy}u, {gz}u}}, uint3{{{tx}u, {ty}u, {tz}u}}, [&](msl::Ctx& c) {{")
    lines.append(f"    {kname}({', '.join(args)});")
    lines.append("  });")
    for i, shape in enumerate(spec.output_shapes):
        lines.append(f"  msl::save(dir + \"/out{i}.bin\", out{i}, {int(np.prod(shape))});")
    lines.append("  return 0;\n}")
    return "\n".join(lines) + "\n"


def compile_driver(src: str, sanitize: bool = False) -> Path:
    flags = ["-std=c++20", "-pthread", "-w", f"-I{HERE}"]
    flags += ["-O1", "-g", "-fsanitize=thread"] if sanitize else ["-O1"]
    shim = (HERE / "msl_shim.h").read_text() + (HERE / "msl_shim_end.h").read_text()
    key = hashlib.sha256((src + shim + " ".join(flags)).encode()).hexdigest()[:20]
    CACHE.mkdir(parents=True, exist_ok=True)
    exe = CACHE / f"k_{key}{'_tsan' if sanitize else ''}"
    if exe.exists():
        return exe
    cpp = CACHE / f"k_{key}.cpp"
    cpp.write_text(src)
    tmp = exe.with_suffix(f".tmp{os.getpid()}")
    p = subprocess.run(["g++", *flags, str(cpp), "-o", str(tmp)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"g++ failed on {cpp}:\n{p.stderr[:6000]}")
    os.replace(tmp, exe)
    return exe


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16))
    return np.array(x)


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(a).view(mx.bfloat16)
    return mx.array(a)


class HarnessError(RuntimeError):
    pass


def execute(spec: K.KernelSpec, inputs, *, sanitize: bool = False, msl: str | None = None, timeout: float = 300):
    """Run one launch in the C++ harness; returns (outputs, stderr)."""
    inputs = [mx.contiguous(x) for x in inputs]
    mx.eval(inputs)
    msl = msl if msl is not None else generated_msl(spec, inputs)
    exe = compile_driver(driver_source(spec, msl, inputs), sanitize)
    env = dict(os.environ)
    if sanitize:
        env["TSAN_OPTIONS"] = "halt_on_error=0 exitcode=66 report_signal_unsafe=0"
    with tempfile.TemporaryDirectory() as d:
        for i, x in enumerate(inputs):
            _to_numpy(x).astype(_CTYPES[x.dtype][1], copy=False).tofile(os.path.join(d, f"in{i}.bin"))
        p = subprocess.run([str(exe), d], capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise HarnessError(f"{spec.name}: harness exit {p.returncode}\n{p.stderr[-6000:]}")
        outs = []
        for i, (shape, dt) in enumerate(zip(spec.output_shapes, spec.output_dtypes)):
            a = np.fromfile(os.path.join(d, f"out{i}.bin"), dtype=_CTYPES[dt][1]).reshape(shape)
            outs.append(_from_numpy(a, dt))
    return outs, p.stderr


class HarnessExecutor:
    """Executor for ``_kernels.set_executor``: runs each launch in the C++ harness and records it."""

    def __init__(self, sanitize: bool = False):
        self.sanitize = sanitize
        self.launches: list[str] = []

    def __call__(self, spec, inputs):
        outs, _ = execute(spec, inputs, sanitize=self.sanitize)
        self.launches.append(spec.body)
        return outs


@contextlib.contextmanager
def metal_through_harness(sanitize: bool = False):
    """Run the ops' Metal path with the harness as the GPU."""
    ex = HarnessExecutor(sanitize)
    old = K.set_executor(ex)
    K.set_backend("metal")
    try:
        yield ex
    finally:
        K.set_executor(old)
        K.set_backend(None)
