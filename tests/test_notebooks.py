"""The notebooks run top to bottom on the tiny model (nbclient, the project's own kernel), are committed
without outputs, and JupyterLab serves them on a private Unix socket (TCP loopback only when asked)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from helpers import free_port, sd35_cmd

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


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class UnixHTTPConnection(__import__("http.client").client.HTTPConnection):
    """http.client over a Unix socket (what `ssh -L 8888:/path/lab.sock` forwards to)."""

    def __init__(self, path: str):
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def unix_get(sock: Path | str, url: str) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(str(sock))
    try:
        conn.request("GET", url)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def cmdlines() -> list[str]:
    """Every process's command line, as any account reads them (`ps`)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def lab_env(tmp_path: Path, token: str | None = "test-token-123") -> dict:
    rt = tmp_path / "xdg-runtime"
    rt.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(rt), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    env.pop("SD35_LAB_SOCKET", None)
    if token:
        env["SD35_LAB_TOKEN"] = token
    return env


def wait_lab_socket(sock: Path, token: str, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if unix_get(sock, f"/api/status?token={token}")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer on {sock}")


def stop(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lab_listens_on_a_private_socket_and_keeps_the_token_off_argv_and_logs(tmp_path):
    env = lab_env(tmp_path, token=None)  # a random token: only the 0600 token file has it
    proc = subprocess.Popen(sd35_cmd("lab"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sock = Path(env["XDG_RUNTIME_DIR"]) / "sd35-lab.sock"
    token_file = sock.with_name("sd35-lab.token")
    try:
        deadline = time.time() + 60
        while not token_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        wait_lab_socket(sock, token, proc)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert unix_get(sock, "/api/status")[0] == 403
        assert unix_get(sock, "/api/status?token=wrong")[0] == 403
        status, body = unix_get(sock, f"/api/contents/notebooks?token={token}")  # rooted at the workspace
        assert status == 200 and {c["name"] for c in json.loads(body)["content"]} >= {p.name for p in NOTEBOOKS}
        assert not any(token in c for c in cmdlines())  # not in anyone's `ps`
        # no TCP listener of JupyterLab's
        from sd35 import net

        mine = {x.inode for x in net.ours()}
        assert not (mine & net.socket_inodes_of(proc.pid))
    finally:
        out = stop(proc)
    assert f"ssh -N -L 8888:{sock} " in out  # the tunnel line for the laptop
    assert token not in out  # stderr is not a terminal here (a journal): the log names the file instead
    assert str(token_file) in out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lab_tcp_only_when_asked(tmp_path):
    port = free_port()
    proc = subprocess.Popen(sd35_cmd("lab", "--tcp", "--port", str(port)), cwd=ROOT, env=lab_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        assert not any("test-token-123" in c for c in cmdlines())
        # and only on loopback
        ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if ss.returncode == 0 and ss.stdout.strip():
            assert all(re.search(r"(127\.0\.0\.1|\[::1\]):", line) for line in ss.stdout.strip().splitlines()), ss.stdout
    finally:
        out = stop(proc)
    assert "every account on this machine can reach the port" in out


@pytest.mark.root
def test_lab_unit_template(tmp_path):
    import shutil

    text = (ROOT / "systemd" / "jupyterlab@.service").read_text()
    assert "User=%i" in text and "sd35 lab" in text
    settings = [ln for ln in text.split("[Service]")[1].splitlines() if not ln.startswith("#")]
    assert not any("%h" in ln for ln in settings)  # %h is the manager's home (/root), not %i's
    assert "ReadWritePaths=/home/%i" in text and "HF_TOKEN" in text.split("UnsetEnvironment=")[1].splitlines()[0]
    assert "SD35_LAB_SOCKET=/run/sd35-lab-%i/" in text and "RuntimeDirectoryMode=0700" in text
    assert "IPAddressDeny=any" in text and "IPAddressAllow=localhost" in text  # loopback only, enforced
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (.ci/run installs it)")
    unit = tmp_path / "jupyterlab@alice.service"
    shutil.copy(ROOT / "systemd" / "jupyterlab@.service", unit)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
