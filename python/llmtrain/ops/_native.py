"""Access to the native extension ``llmtrain._C`` under the DLPack binding convention.

Outputs are allocated here with torch (so CUDA memory comes from torch's caching allocator)
and passed to the kernels with the inputs as DLPack capsules; CUDA kernels run on torch's
current stream, whose handle is passed explicitly.
"""

from __future__ import annotations

import functools

import torch

try:
    from llmtrain import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR = exc


def native():
    """The extension module; raises with the fix if it is missing."""
    if _C is None:
        raise ImportError(
            "llmtrain._C is not built: install the package with `pip install .` (or `pip install -e .`) "
            f"from the repository root ({_IMPORT_ERROR})"
        )
    return _C


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    return dict(native().build_info())


def has_cuda_kernels() -> bool:
    return _C is not None and "cuda" in build_info()["backends"]


def dl(t: torch.Tensor | None):
    """A DLPack capsule for t (None passes through); no stream synchronisation is implied."""
    if t is None:
        return None
    return torch.utils.dlpack.to_dlpack(t)


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of torch's current stream on t's device (0 on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def supports(t: torch.Tensor) -> bool:
    """Whether the native kernels serve tensors on t's device."""
    if t.device.type == "cpu":
        return _C is not None
    if t.device.type == "cuda":
        return has_cuda_kernels()
    return False


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for t's device, if any: our ops follow autocast like F.linear does."""
    device_type = t.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
