import os

import pytest
import torch

# Two cores: keep intra-op threads at the machine's size and tests deterministic.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    import zlib

    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def load_bench_script(name: str):
    """A script under bench/ (not a package) imported as a module, for testing its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
