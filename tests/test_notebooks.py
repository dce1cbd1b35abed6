"""The notebooks run top to bottom on the tiny model (nbclient, the project's own kernel), are committed
without outputs, and JupyterLab serves them on loopback with a token."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_four_numbered_notebooks_each_say_what_and_how_long():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01-mmdit-anatomy.ipynb", "02-denoising-trajectory.ipynb", "03-fp8-fidelity.ipynb",
                     "04-attention-maps.ipynb"]
    for p in NOTEBOOKS:
        first = nbformat.read(p, as_version=4).cells[0]
        assert first.cell_type == "markdown" and "What it shows" in first.source and "How long" in first.source
        text = p.read_text()
        assert "load_settings(" in text  # SD35_MODEL / SD35_PRECISION through the same settings as the CLI


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_on_the_tiny_model(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SD35_MODEL", "tiny")
    monkeypatch.setenv("SD35_DEVICE", "cpu")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs) \
        or path.name.startswith("01"), "the notebook should draw its plots"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "tiny" in text and "random weights" in text  # it loaded through the settings, and says what it is


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lab_serves_on_loopback_with_a_token(tmp_path):
    port = _free_port()
    exe = Path(sys.executable).with_name("sd35")
    env = {**os.environ, "SD35_LAB_TOKEN": "test-token-123", "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([str(exe), "lab", "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if _status(f"{base}/api/status?token=test-token-123") == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert _status(f"{base}/api/status?token=test-token-123") == 200
        assert _status(f"{base}/api/status") == 403
        assert _status(f"{base}/api/status?token=wrong") == 403
        # rooted at the workspace: the notebooks are listed
        with urllib.request.urlopen(f"{base}/api/contents/notebooks?token=test-token-123", timeout=5) as r:
            listing = json.loads(r.read())
        assert {c["name"] for c in listing["content"]} >= {p.name for p in NOTEBOOKS}
        # and only on loopback
        ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if ss.returncode == 0 and ss.stdout.strip():
            assert all(re.search(r"(127\.0\.0\.1|\[::1\]):", line) for line in ss.stdout.strip().splitlines()), ss.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_lab_unit_template(tmp_path):
    import shutil

    text = (ROOT / "systemd" / "jupyterlab@.service").read_text()
    assert "User=%i" in text and "sd35 lab" in text
    assert "IPAddressDeny=any" in text and "IPAddressAllow=localhost" in text  # loopback only, enforced
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (.ci/run installs it)")
    unit = tmp_path / "jupyterlab@alice.service"
    shutil.copy(ROOT / "systemd" / "jupyterlab@.service", unit)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
