"""A faster BLAS for MLX's Linux CPU backend.

The ``mlx[cpu]`` wheel bundles the netlib reference BLAS, so float32 matmuls on Linux run ~10-30x
slower than with OpenBLAS. MLX calls ``cblas_sgemm`` through the dynamic linker, so an OpenBLAS
loaded with RTLD_GLOBAL *before* ``mlx.core`` is imported takes its place (as LD_PRELOAD would).
``preload_openblas()`` does that when an OpenBLAS with the plain CBLAS names is installed
(Debian/Ubuntu: ``apt-get install libopenblas0-pthread``; or a path in ``LLMTRAIN_MLX_BLAS``).
It does nothing on macOS (MLX uses Accelerate), once mlx.core is imported, or with
``LLMTRAIN_MLX_BLAS=none``. The numpy/scipy wheels' OpenBLAS cannot serve: their symbols are renamed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Optional

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: Optional[str] = None


def _exports_cblas(lib: ctypes.CDLL) -> bool:
    try:
        lib.cblas_sgemm  # noqa: B018 - attribute lookup is the symbol check
        return True
    except AttributeError:
        return False


def preload_openblas() -> Optional[str]:
    """Load an OpenBLAS for mlx.core to bind to; returns its path, or None when none was loaded."""
    global _loaded
    if _loaded or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return _loaded
    choice = os.environ.get("LLMTRAIN_MLX_BLAS", "").strip()
    if choice.lower() == "none":
        return None
    paths = [choice] if choice else [p for p in CANDIDATES if Path(p).exists()]
    if not choice and (found := ctypes.util.find_library("openblas")):
        paths.append(found)
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if _exports_cblas(lib):
            _loaded = path
            return path
    return None
