"""docs/hosting.md followed literally, as far as one machine allows (issue 23): the two groups (`sd35` for the
service, `sd35-team` for people), `sd35 cache init`, `sd35 keys add`, `sd35 cache quantize` into the shared
cache as root, `sd35 cache verify` of the shared cache, and a teammate generating from that store by name,
who cannot read the keys file. Its purpose is to keep the docs and the code from drifting apart: the
commands below are the ones in docs/hosting.md's Install section (checked at the start).

The teammate is test_multiuser's second account. It cannot enter root's pyenv (/root is 0700), so it runs
the same `sd35` console script with the system's Python 3.11 on the venv's site-packages: the same code,
the same files, read with the teammate's permissions.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import sd35_cmd
from test_multiuser import OTHER, PROBE_PYTHON, base_env, needs_other, other  # noqa: F401 - `other` is a fixture

ROOT = Path(__file__).resolve().parents[1]
SERVICE, TEAM = "sd35", "sd35-team"
# docs/hosting.md's Install steps this test performs (if the docs change, change the test with them)
DOC_STEPS = [
    "sudo useradd --system --home /var/lib/sd35 --shell /usr/sbin/nologin sd35",
    "sudo groupadd sd35-team",
    "sudo usermod -aG sd35-team sd35",
    "sudo usermod -aG sd35-team alice",
    "sudo .venv/bin/sd35 cache init /srv/cache/huggingface --group sd35-team",
    "sudo .venv/bin/sd35 keys add alice --group sd35",
    "HF_HUB_CACHE=/srv/cache/huggingface .venv/bin/sd35 cache quantize --model large --precision fp8-weight",
    "HF_HUB_CACHE=/srv/cache/huggingface .venv/bin/sd35 cache verify",
]

pytestmark = [pytest.mark.root, needs_other, pytest.mark.slow, pytest.mark.timeout(600)]


def _exists(kind: str, name: str) -> bool:
    try:
        (grp.getgrnam if kind == "group" else pwd.getpwnam)(name)
        return True
    except KeyError:
        return False


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def groups(other):
    """Step 2: the service's account and group, the team's group, the teammate in it; removed afterwards
    (only what this test created)."""
    made_service, made_team = not _exists("group", SERVICE), not _exists("group", TEAM)
    if made_service:
        sh("useradd", "--system", "--home", "/var/lib/sd35", "--shell", "/usr/sbin/nologin", SERVICE)
    if made_team:
        sh("groupadd", TEAM)
    sh("usermod", "-aG", TEAM, SERVICE)
    sh("usermod", "-aG", TEAM, OTHER)
    yield other
    subprocess.run(["gpasswd", "-d", OTHER, TEAM], capture_output=True)
    if made_team:
        subprocess.run(["groupdel", TEAM], capture_output=True)
    if made_service:
        subprocess.run(["userdel", SERVICE], capture_output=True)


@pytest.fixture
def srv():
    """Stands for /srv and /etc on this machine: a folder every account can enter (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="sd35-hosting-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def as_root(*args: str, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(sd35_cmd(*args), capture_output=True, text=True, env=base_env(**env), timeout=300)
    assert r.returncode == 0, f"sd35 {' '.join(args)}: {r.stderr}"
    return r


def as_teammate(pw, argv: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`runuser -u TEAMMATE -- …` (their groups from /etc/group, as after logging in again), with a clean
    environment of their own."""
    site = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    full = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "PYTHONPATH": f"{site}:{ROOT / 'src'}", **env}
    return subprocess.run(["runuser", "-u", pw.pw_name, "--", "env", "-i", *[f"{k}={v}" for k, v in full.items()],
                           *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_docs_hosting_steps_for_the_host_and_a_teammate(groups, srv):
    pw = groups
    docs = " ".join((ROOT / "docs" / "hosting.md").read_text().split())
    for step in DOC_STEPS:
        assert " ".join(step.split()) in docs, f"docs/hosting.md no longer says: {step}"

    # step 2: the cache, shared through the team's group
    cache = srv / "cache" / "huggingface"
    as_root("cache", "init", str(cache), "--group", TEAM)
    st = cache.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2775 and st.st_gid == grp.getgrnam(TEAM).gr_gid

    # step 3: a key for alice in a file only the service's group can read
    keys = srv / "etc" / "sd35" / "api-keys"
    r = as_root("keys", "add", "alice", "--group", SERVICE, "--file", str(keys))
    assert r.stdout.strip().startswith("sd35_")
    st = keys.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0 and st.st_gid == grp.getgrnam(SERVICE).gr_gid

    # step 3: the pre-quantized copy in the shared cache, made by root from root's private tiny model
    r = as_root("cache", "quantize", "--model", "tiny", HF_HUB_CACHE=str(cache))
    store = Path(r.stdout.strip().splitlines()[-1])
    assert store.parent == cache / "sd35-quantized" and f"--model {store.name}" in r.stderr
    as_root("cache", "verify", HF_HUB_CACHE=str(cache))  # the shared cache, no problems

    # a teammate, with a home and a personal cache of their own, generates from the store by name
    home = Path(pw.pw_dir)
    out = home / "images"
    r = as_teammate(pw, [PROBE_PYTHON, sd35_cmd()[0], "generate", "--prompt", "a lighthouse at dusk", "--model", store.name, "--device", "cpu",
                         "--steps", "2", "--width", "64", "--height", "64", "--seed", "7", "--out", str(out)],
                    {"SD35_CACHE_DIR": str(home / ".cache" / "sd35"), "HF_HUB_CACHE": str(cache),
                     "HF_HUB_OFFLINE": "1", "SD35_WARMUP": "0"}, cwd=home)
    assert r.returncode == 0, r.stderr
    pngs = list(out.rglob("*.png"))
    assert pngs and all(p.stat().st_uid == pw.pw_uid for p in pngs), (pngs, r.stdout)
    assert "tiny" in r.stderr.lower() and "note:" in r.stderr  # the tiny model's notice, from the store

    # ...and cannot read the keys file
    r = as_teammate(pw, ["/bin/cat", str(keys)], {}, cwd=home)
    assert r.returncode != 0 and "Permission denied" in r.stderr
