"""MLX backend (Apple Silicon): ops with Metal kernels and a pure-MLX fallback (issue 10).

Importing ``llmtrain.mlx`` does not import MLX, so torch-only installs are unaffected; the
subpackages (``llmtrain.mlx.ops``) import ``mlx.core`` and need ``pip install llmtrain[mlx]``.
"""

from __future__ import annotations


def is_available() -> bool:
    """True when MLX can be imported (it is not imported by this check's caller otherwise)."""
    import importlib.util

    return importlib.util.find_spec("mlx") is not None


__all__ = ["is_available"]
