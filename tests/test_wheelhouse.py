"""Air-gapped GPU servers: `make wheelhouse CUDA=12|13` downloads every pinned wheel for the server's platform,
`make setup OFFLINE=1 WHEELHOUSE=DIR` installs from that folder with no index. Checked as the commands make
would run (`make -n`): downloading gigabytes of CUDA wheels is not a unit test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry(*args: str) -> str:
    r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("cuda,tag", [("12", "cu126"), ("13", "cu130")])
def test_wheelhouse_downloads_the_pinned_cuda_torch_and_every_pin_as_wheels(cuda, tag):
    text = dry("wheelhouse", f"CUDA={cuda}")
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    assert f"https://download.pytorch.org/whl/{tag}" in text and f'"{torch_pin}+{tag}"' in text
    assert text.count("--only-binary=:all:") == 2 and "-r wheelhouse/.pinned.txt" in text and "--platform" in text


def test_wheelhouse_needs_a_cuda_line(tmp_path):
    r = subprocess.run(["make", "wheelhouse", f"WHEEL_DIR={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "CUDA=12 or CUDA=13" in r.stdout + r.stderr


def test_offline_setup_never_reaches_an_index(tmp_path):
    text = dry("setup", "OFFLINE=1", "CUDA=12", f"WHEELHOUSE={tmp_path}/wh", f"VENV={tmp_path}/venv")
    installs = [line for line in text.splitlines() if " -m pip install " in line]
    assert len(installs) == 3  # the build backend, torch, the workspace
    for line in installs:
        assert "--no-index" in line and f"--find-links {tmp_path}/wh" in line and "--index-url" not in line
