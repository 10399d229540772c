"""`llmtrain info`: version, compiled native backends and the devices this process can see."""

from __future__ import annotations

import importlib.util
import platform


def collect() -> dict:
    import torch

    from llmtrain import __version__
    from llmtrain.ops import _native

    info = {
        "llmtrain": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
    }
    try:
        build = _native.build_info()
        info["native backends"] = ", ".join(build["backends"])
        info["openmp"] = build["openmp"]
        if "cuda_archs" in build:
            info["cuda archs (compiled)"] = build["cuda_archs"]
        info["cuda devices (native runtime)"] = build["cuda_devices"] or "none"
    except ImportError as exc:
        info["native backends"] = f"not built ({exc})"
    if torch.cuda.is_available():
        info["torch cuda devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["torch cuda devices"] = "none"
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps and mps.is_available())
    for pkg in ("deepspeed", "mlx", "transformers", "datasets"):
        info[pkg] = _version_of(pkg)
    return info


def _version_of(pkg: str) -> str:
    if importlib.util.find_spec(pkg) is None:
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "installed"


def run(args) -> int:
    for key, value in collect().items():
        if isinstance(value, list):
            value = "; ".join(value)
        print(f"{key:>30}: {value}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="version, compiled backends, visible devices")
    p.set_defaults(func=run)
