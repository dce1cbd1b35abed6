"""A shared GPU box is a multi-user machine: acting as a second local account (created here with
`useradd`; CI runs as root), nothing of ours lets it in — no DAP session into a process started with the
documented attach setting, no JupyterLab and no token in any command line, no keyless generation — and its
keyed requests appear in the access log under its name. Plus the API keys file on its own (no root needed).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port, sd35_cmd

from sd35.service import auth
from sd35 import net
from sd35.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
OTHER = "sd35-other"
PROBE_PYTHON = "/usr/bin/python3"  # the other account cannot enter root's pyenv/venv; the probes need stdlib only


# --- the keys file (any account) --------------------------------------------------------------------------

def test_keys_file_hashes_checks_and_refuses_loose_modes(tmp_path):
    path = tmp_path / "api-keys"
    key = auth.add(path, "alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    line = path.read_text().strip()
    key_id = key.split("_")[1]
    assert key.startswith(f"sd35_{key_id}_") and line.startswith(f"alice:{key_id}:sha256$")
    assert key.split("_", 2)[2] not in line  # only the salted hash is stored
    ring = auth.KeyRing(auth.read(path), default_key="old-single-key")
    assert ring.identify(key) == "alice" and ring.cached(key) == (True, "alice")  # fast path after the first
    assert ring.identify("old-single-key") == "default" and ring.identify("nope") is None
    assert auth.fast_hash(key) != auth.fast_hash(key) and auth.hash_key(key) != auth.hash_key(key)  # salted
    with pytest.raises(InputError, match="already has a key"):
        auth.add(path, "alice")
    path.chmod(0o644)
    with pytest.raises(InputError, match="world-readable"):
        auth.add(path, "bob")
    path.chmod(0o662)
    with pytest.raises(InputError, match="written by other accounts"):
        auth.read(path)


def test_keys_add_for_a_missing_group_says_how_to_create_it(tmp_path):
    with pytest.raises(InputError) as exc:
        auth.add(tmp_path / "api-keys", "alice", group="no-such-group-sd35")
    assert "no group 'no-such-group-sd35'" in exc.value.cause
    assert "sudo groupadd --system no-such-group-sd35" in exc.value.fix and "useradd --system" in exc.value.fix
    assert "--group" not in exc.value.fix  # not the failing command again
    assert not (tmp_path / "api-keys").exists()


def test_keys_cli_prints_the_key_once_and_lists_names(tmp_path):
    from helpers import run_cli

    keys = tmp_path / "api-keys"
    r = run_cli("keys", "add", "bob", "--file", str(keys))
    assert r.returncode == 0 and r.stdout.strip().startswith("sd35_") and r.stdout.strip() not in keys.read_text()
    assert "shown once" in r.stderr
    r = run_cli("keys", "list", "--file", str(keys))
    assert r.returncode == 0 and r.stdout.split() == ["bob"]
    r = run_cli("keys", "add", "default", "--file", str(keys))
    assert r.returncode == 2 and "not allowed" in r.stderr and "fix:" in r.stderr


def _counting_scrypt(monkeypatch) -> list:
    import hashlib

    calls, real = [], hashlib.scrypt

    def scrypt(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(hashlib, "scrypt", scrypt)
    return calls


def test_a_flood_of_wrong_tokens_costs_no_scrypt_and_never_evicts_a_valid_key(tmp_path, monkeypatch):
    """5,000 distinct wrong tokens of every shape: none runs a scrypt unless it names a real key id of a
    scrypt line (then exactly one), repeats are answered from the failure cache, and the valid key stays a
    cache hit. (Keys `keys add` writes now never run scrypt: the next test.)"""
    path = tmp_path / "api-keys"
    alice, bob = (f"sd35_{os.urandom(6).hex()}_{'a' * 43}", f"sd35_{os.urandom(6).hex()}_{'b' * 43}")
    path.write_text("".join(f"{name}:{k.split('_')[1]}:{auth.hash_key(k)}\n" for name, k in (("alice", alice),
                                                                                            ("bob", bob))))
    path.chmod(0o640)
    ring = auth.KeyRing(auth.read(path))
    assert auth.legacy_names(ring.entries) == ["alice", "bob"]  # scrypt lines: named for re-issue
    assert ring.identify(alice) == "alice"
    calls = _counting_scrypt(monkeypatch)
    bob_id = bob.split("_")[1]
    junk = [f"sd35_{os.urandom(6).hex()}_{os.urandom(32).hex()[:43]}" for _ in range(4000)] + \
        [os.urandom(20).hex() for _ in range(500)] + ["sd35-" + "x" * 43 + str(i) for i in range(500)]
    for token in junk:
        assert ring.cached(token) == (True, None) and ring.identify(token) is None
    assert calls == []  # unknown ids and foreign shapes: refused without a scrypt
    assert ring.cached(alice) == (True, "alice")  # still in the valid-key cache, after 5,000 wrong tokens
    wrong_secret = f"sd35_{bob_id}_{'A' * 43}"
    assert ring.cached(wrong_secret) == (False, None)
    assert ring.identify(wrong_secret) is None and len(calls) == 1  # a real id: exactly one scrypt
    assert ring.identify(wrong_secret) is None and len(calls) == 1  # the failure cache answers the repeat
    assert ring.identify(bob) == "bob" and len(calls) == 2
    assert ring.cached(alice) == (True, "alice") and ring.cached(bob) == (True, "bob")


def test_new_keys_are_checked_inline_in_microseconds_even_with_a_real_id(tmp_path, monkeypatch):
    """What `keys add` writes now: a wrong secret with a real key id is refused by one SHA-256, inline (no
    scrypt, no thread), and the valid key still authenticates after 5,000 such tokens."""
    path = tmp_path / "api-keys"
    alice, bob = auth.add(path, "alice"), auth.add(path, "bob")
    ring = auth.KeyRing(auth.read(path))
    assert auth.legacy_names(ring.entries) == []
    calls = _counting_scrypt(monkeypatch)
    bob_id = bob.split("_")[1]
    for i in range(5000):  # known=True: answered inline, never sent to the auth limiter's thread
        assert ring.cached(f"sd35_{bob_id}_{os.urandom(32).hex()[:43]}") == (True, None)
    assert calls == [] and ring.cached(alice) == (True, "alice") and ring.cached(bob) == (True, "bob")
    assert len(ring._failed) == 0  # fast refusals are not cached: they cannot evict anything


def test_old_format_keys_keep_working_and_are_named_for_reissue(tmp_path):
    from helpers import run_cli

    path = tmp_path / "api-keys"
    old_key = "sd35-" + "k" * 43  # what `keys add` printed before key ids
    path.write_text(f"carol:{auth.hash_key(old_key)}\n")
    path.chmod(0o640)
    new_key = auth.add(path, "dave")
    ring = auth.KeyRing(auth.read(path))
    assert auth.legacy_names(ring.entries) == ["carol"]
    assert ring.identify(old_key) == "carol" and ring.identify(new_key) == "dave"
    assert ring.identify("sd35-" + "j" * 43) is None
    r = run_cli("keys", "list", "--file", str(path))
    assert r.returncode == 0 and r.stdout.split() == ["carol", "dave"]
    assert "carol" in r.stderr and "sd35 keys add" in r.stderr and "older format" in r.stderr


def test_wrong_keys_are_paced_service_wide_and_valid_keys_never_wait():
    from sd35.service.app import Pace

    now = [100.0]
    pace = Pace(rate=10.0, burst=3, max_wait=2.0, clock=lambda: now[0])
    assert [pace.delay() for _ in range(3)] == [0.0, 0.0, 0.0]  # a burst (typos) is answered at once
    waits = [pace.delay() for _ in range(30)]  # then one answer per 1/rate s, at most max_wait
    assert waits[:3] == pytest.approx([0.1, 0.2, 0.3]) and max(waits) == pytest.approx(2.0)
    now[0] += 60  # quiet again: the burst is back
    assert pace.delay() == 0.0


def test_a_valid_key_is_answered_while_a_flood_of_wrong_keys_waits(tiny_cache, tmp_path):
    """Over HTTP: 120 wrong keys from 24 clients at once, then a valid key; the valid answer comes back while
    most wrong ones are still paced (app.WRONG_KEYS_PER_S after a burst of WRONG_KEYS_BURST)."""
    import threading
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from test_service import KEY, InProcessServer

    from sd35.service.app import WRONG_KEYS_BURST
    from sd35.settings import Settings

    keys = tmp_path / "api-keys"
    valid = auth.add(keys, "alice")
    key_id = valid.split("_")[1]
    answered: list[str] = []
    lock = threading.Lock()

    def get(token: str, label: str) -> int:
        req = urllib.request.Request(srv.url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        with lock:
            answered.append(label)
        return code

    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_keys_file=keys, api_key=KEY, warmup=False)  # KEY: the fixture's readiness checks
    with InProcessServer(settings) as srv, ThreadPoolExecutor(24) as pool:
        wrong = [pool.submit(get, f"sd35_{key_id}_{'x' * 42}{i % 10}{'y' if i > 60 else 'z'}", "wrong")
                 for i in range(120)]
        while len(answered) < WRONG_KEYS_BURST:  # the burst is answered at once; the rest wait their turn
            time.sleep(0.01)
        assert get(valid, "valid") == 200
        waiting_when_valid_answered = 120 - answered.index("valid")
        assert {w.result() for w in wrong} == {401}
    assert waiting_when_valid_answered >= 30, answered


def test_an_unreadable_keys_file_fails_the_start(tmp_path, monkeypatch):
    from sd35.settings import Settings

    path = tmp_path / "api-keys"
    auth.add(path, "erin")

    def unreadable(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(auth, "read", unreadable)
    for settings in (Settings(_env_file=None, api_keys_file=path), Settings(_env_file=None)):
        monkeypatch.setattr(auth, "DEFAULT_FILE", path)
        with pytest.raises(InputError, match="cannot read the API keys file") as info:
            auth.load(settings)
        assert "chmod 0640" in info.value.fix


def test_secrets_are_masked_everywhere_settings_are_shown():
    from sd35.settings import Settings

    s = Settings(_env_file=None, hf_token="hf_secret123", api_key="key-secret456", lab_token="lab-secret789")
    for shown in (repr(s), str(s), json.dumps(s.model_dump(mode="json")), str(vars(s))):
        assert "secret123" not in shown and "secret456" not in shown and "secret789" not in shown
    assert s.hf_token.get_secret_value() == "hf_secret123"


# --- a second account --------------------------------------------------------------------------------------

def _runs_as_other() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a second Unix account (CI runs as root)"
    if not shutil.which("useradd") or not shutil.which("userdel"):
        return "useradd/userdel not installed"
    if not os.access(PROBE_PYTHON, os.X_OK):
        return f"{PROBE_PYTHON} (a Python the second account can run) is missing"
    return None


needs_other = pytest.mark.skipif(_runs_as_other() is not None, reason=_runs_as_other() or "")


@pytest.fixture(scope="module")
def other():
    """The second account, for one test module at a time: `make test` runs modules on parallel workers, and
    two of them (this one, test_hosting) create and remove the same account."""
    import fcntl

    # O_NOFOLLOW, no truncation: another account may have planted a symlink at that name in /tmp.
    fd = os.open("/tmp/sd35-tests-other-account.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pwd.getpwnam(OTHER)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", OTHER], check=True)
        pw = pwd.getpwnam(OTHER)
        yield pw
        subprocess.run(["userdel", "--remove", OTHER], capture_output=True)


def as_other(pw, code: str, env: dict | None = None, timeout: float = 60) -> dict:
    """Run a stdlib-only Python snippet as the second account; it prints one JSON object."""
    r = subprocess.run([PROBE_PYTHON, "-c", code], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd="/",
                       env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SD35_", "HF_"))}
    return {**env, "SD35_CACHE_DIR": os.environ["SD35_CACHE_DIR"], "SD35_DEVICE": "cpu", "SD35_WARMUP": "0",
            "HF_HUB_OFFLINE": "1", **extra}


OWNER_KEY = "owner-" + os.urandom(8).hex()


def ready(port: int) -> bool:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", headers={"Authorization": f"Bearer {OWNER_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


PROBE_CMDLINES = r"""
import json, os
hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            if os.environ["SECRET"].encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                hits.append(pid)
        except OSError:
            pass
print(json.dumps({"hits": hits}))
"""

PROBE_DAP = r"""
import json, os, socket, time

def session(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=3)
    except OSError:
        return "refused"
    buf, seq = b"", 0

    def send(cmd, args):
        nonlocal seq
        seq += 1
        body = json.dumps({"seq": seq, "type": "request", "command": cmd, "arguments": args}).encode()
        s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def frames(deadline):
        nonlocal buf
        s.settimeout(0.5)
        while time.time() < deadline:
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                if not head.startswith(b"Content-Length:"):
                    return  # not DAP (the API answers HTTP)
                n = int(head.split(b":")[1])
                if len(rest) < n:
                    break
                buf = rest[n:]
                yield json.loads(rest[:n])
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk

    # what VS Code sends to take over a debuggee: initialize, attach, (initialized) configurationDone
    send("initialize", {"adapterID": "debugpy", "clientID": "vscode"})
    send("attach", {"justMyCode": False})
    deadline = time.time() + 15
    for f in frames(deadline):
        if f.get("type") == "event" and f.get("event") == "initialized":
            send("configurationDone", {})
        if f.get("type") == "response" and f.get("command") == "attach":
            s.close()
            return "dap-session" if f.get("success") else "no-dap"
        if f.get("type") == "response" and not f.get("success"):
            break
    s.close()
    return "no-dap"

print(json.dumps({port: session(int(port)) for port in os.environ["PORTS"].split(",")}))
"""


@needs_other
@pytest.mark.timeout(120)
def test_debugger_refuses_a_port_the_other_account_holds(other, tmp_path):
    """The reverse direction's trap: the other account listens first on the port our debuggee connects to."""
    port = free_port()
    trap = subprocess.Popen([PROBE_PYTHON, "-c", (
        "import socket, json, sys\n"
        f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port}))\n"
        "s.listen(); print('ready', flush=True); s.settimeout(8); n = 0\n"
        "try:\n    s.accept(); n = 1\nexcept OSError:\n    pass\n"
        "print(json.dumps({'connections': n}))\n")], user=other.pw_uid, group=other.pw_gid, extra_groups=[],
        cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert trap.stdout.readline().strip() == "ready"
        r = subprocess.run(sd35_cmd("generate", "--out", str(tmp_path / "o"), "--steps", "1"), capture_output=True,
                           text=True, env=base_env(SD35_DEBUGPY=f"127.0.0.1:{port}"), timeout=90)
        assert r.returncode == 2 and f"held by another account (uid {other.pw_uid})" in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
        assert json.loads(trap.communicate(timeout=30)[0].strip().splitlines()[-1]) == {"connections": 0}
    finally:
        if trap.poll() is None:
            trap.kill()


@needs_other
@pytest.mark.timeout(60)
def test_keyless_service_is_refused_on_a_multi_user_host(other):
    r = subprocess.run(sd35_cmd("serve", "--port", str(free_port())), capture_output=True, text=True,
                       env=base_env(SD35_API_KEYS_FILE=""), timeout=60)
    assert r.returncode == 2, r.stderr
    assert "other accounts can log in" in r.stderr and OTHER in r.stderr and "sd35 keys add" in r.stderr
    assert "keys add NAME --group sd35" in " ".join(r.stderr.split())  # the file the service can read
    assert "SD35_ALLOW_NO_KEY=1" in r.stderr and "Traceback" not in r.stderr


@needs_other
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_other_account_against_a_keyed_service_under_the_debugger(other, tmp_path):
    """`sd35 serve` with per-user keys, attached to "VS Code" the documented way (SD35_DEBUGPY=127.0.0.1:P,
    the adapter listening): the other account gets no DAP session, 401 without a key, 200 with its own,
    and the access log names it."""
    from dap import DapClient, launch_config

    keys = tmp_path / "api-keys"
    added = subprocess.run(sd35_cmd("keys", "add", OTHER, "--file", str(keys)), capture_output=True, text=True,
                           env=base_env())
    assert added.returncode == 0, added.stderr
    other_key = added.stdout.strip()
    assert other_key.startswith("sd35_") and other_key not in keys.read_text()
    api, dbg = free_port(), free_port()
    log = tmp_path / "service.log"
    procs = []

    def start_service():
        deadline = time.time() + 60
        while net.owner("127.0.0.1", dbg) != os.getuid():
            assert time.time() < deadline
            time.sleep(0.1)
        procs.append(subprocess.Popen(sd35_cmd("serve", "--port", str(api)), stdout=subprocess.DEVNULL,
                                      stderr=log.open("w"), env=base_env(SD35_API_KEYS_FILE=str(keys),
                                                                        SD35_API_KEY=OWNER_KEY,
                                                                        SD35_DEBUGPY=f"127.0.0.1:{dbg}")))

    dap = DapClient(log_dir=tmp_path / "debugpy-logs")
    try:
        # The service runs from this checkout (the Remote-SSH case): the path mapping is the identity.
        config = launch_config("Attach: running service", {"serverRoot": str(ROOT)})
        config["listen"]["port"] = dbg
        dap.start("attach", config, after_request=start_service)
        proc = procs[0]
        deadline = time.time() + 180
        while not ready(api):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.3)
        # the service holds one TCP listener: the API. Nothing accepts a debugger.
        ports = {x.port for x in net.ours() if x.inode in net.socket_inodes_of(proc.pid)}
        assert ports == {api}, ports
        # as the other account: DAP initialize + attach on every port the service and "VS Code's" adapter
        # listen on (the API, the adapter's debuggee port, its own client port) -> no session
        held = net.socket_inodes_of(proc.pid) | net.socket_inodes_of(dap.proc.pid)
        ours = sorted({x.port for x in net.ours() if x.inode in held})
        assert {api, dbg} <= set(ours), (ours, api, dbg)
        probe = as_other(other, PROBE_DAP, {"PORTS": ",".join(map(str, ours))})
        assert set(probe.values()) <= {"no-dap", "refused"}, probe
        # ...HTTP: no key, a wrong key -> 401; its own key -> a generation
        http = as_other(other, r"""
import json, os, urllib.request, urllib.error
def call(path, key=None, body=None):
    h = {"Content-Type": "application/json"}
    if key: h["Authorization"] = "Bearer " + key
    req = urllib.request.Request("http://127.0.0.1:" + os.environ["API"] + path, headers=h,
                                 data=json.dumps(body).encode() if body else None)
    try:
        with urllib.request.urlopen(req, timeout=120) as r: return r.status
    except urllib.error.HTTPError as e: return e.code
gen = {"prompt": "from the other account", "size": "128x128", "n": 1, "steps": 2}
print(json.dumps({"nokey": call("/v1/images/generations", None, gen), "wrong": call("/v1/models", "sd35-wrong"),
                  "mine": call("/v1/images/generations", os.environ["KEY"], gen)}))
""", {"API": str(api), "KEY": other_key}, timeout=200)
        assert http == {"nokey": 401, "wrong": 401, "mine": 200}, http
        time.sleep(0.5)
        text = log.read_text()
        assert re.search(rf"key={OTHER} status=200 POST /v1/images/generations size=128x128 n=1 steps=2 "
                         r"queue_wait=\d+\.\d+s duration=\d+\.\d+s", text), text
        assert re.search(r"key=- status=401 POST /v1/images/generations", text), text
        assert re.search(r"key=default status=200 GET /readyz", text), text
        assert other_key not in text and OWNER_KEY not in text
    finally:
        dap.close()
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


@needs_other
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_other_account_cannot_reach_jupyterlab_or_see_its_token(other, tmp_path):
    rt = tmp_path / "xdg"
    rt.mkdir(mode=0o700)
    token = "lab-token-" + os.urandom(8).hex()
    env = base_env(XDG_RUNTIME_DIR=str(rt), SD35_LAB_TOKEN=token, JUPYTER_RUNTIME_DIR=str(tmp_path / "jrt"),
                   JUPYTER_CONFIG_DIR=str(tmp_path / "jcfg"), JUPYTER_DATA_DIR=str(tmp_path / "jdata"))
    proc = subprocess.Popen(sd35_cmd("lab"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sock = rt / "sd35-lab.sock"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "JupyterLab did not start"
            if sock.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(sock))
                        break
                    except OSError:
                        pass
            time.sleep(0.5)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        # the second account: the token in nobody's command line; the socket out of reach; no TCP port of ours
        assert as_other(other, PROBE_CMDLINES, {"SECRET": token}) == {"hits": []}
        reach = as_other(other, r"""
import json, os, socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(os.environ["SOCK"]); r = "connected"
except OSError as e:
    r = type(e).__name__
print(json.dumps({"socket": r}))
""", {"SOCK": str(sock)})
        assert reach == {"socket": "PermissionError"}, reach
        lab_tcp = {x.port for x in net.ours() if x.inode in net.socket_inodes_of(proc.pid)}
        assert lab_tcp == set(), lab_tcp
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert token not in out  # not a terminal: never printed to a log


@needs_other
@pytest.mark.timeout(120)
def test_the_probe_does_get_into_a_listening_debuggee(other):
    """The control for the DAP probe above, and why SD35_DEBUGPY=listen:… is opt-in only: a debuggee that
    listens on 127.0.0.1 (the old default) gives the other account a session."""
    port = free_port()
    victim = subprocess.Popen([sys.executable, "-c", f"import debugpy, time; debugpy.listen(('127.0.0.1', {port})); "
                               "print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "up"
        assert as_other(other, PROBE_DAP, {"PORTS": str(port)}) == {str(port): "dap-session"}
    finally:
        victim.kill()
        victim.wait()


# --- the compile cache: code another account plants there would run as the service -------------------------

@needs_other
@pytest.mark.timeout(120)
def test_a_compile_cache_the_other_account_can_write_is_refused(other, tmp_path):
    from sd35.inference import compilation
    from sd35.ops import doctor
    from sd35.settings import Settings

    import tempfile

    base = Path(tempfile.mkdtemp(prefix="sd35-cc-", dir="/tmp"))  # pytest's tmp_path is not open to others
    base.chmod(0o755)
    try:
        _refuse_planted_caches(other, base, tmp_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _refuse_planted_caches(other, base: Path, tmp_path: Path) -> None:
    from sd35.inference import compilation
    from sd35.ops import doctor
    from sd35.ops.doctor import storage
    from sd35.settings import Settings

    # 1. the other account's own folder, named as ours
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, other.pw_uid, other.pw_gid)
    # 2. a cache of ours others can enter, where the other account really planted a kernel (as it could in
    #    the group-writable shared cache of old)
    ours = base / "ours"
    (ours / "torch-x" / "ab").mkdir(parents=True)
    for p in (ours, ours / "torch-x"):
        p.chmod(0o755)
    (ours / "torch-x" / "ab").chmod(0o777)
    planted = as_other(other, """
import json, os
path = os.path.join(os.environ["DIR"], "kernel.py")
open(path, "w").write("import os; os.system('id > /tmp/pwned')")
print(json.dumps({"planted": path}))
""", {"DIR": str(ours / "torch-x" / "ab")})["planted"]
    assert os.stat(planted).st_uid == other.pw_uid
    for cache, said in ((theirs, "belongs to another account"), (ours, "can be written by other accounts")):
        problem = compilation.cache_problem(cache)
        assert problem is not None and said in problem, problem
        r = subprocess.run(sd35_cmd("generate", "--compile", "blocks", "--steps", "1", "--out", str(tmp_path / "o")),
                           capture_output=True, text=True, env=base_env(SD35_COMPILE_CACHE=str(cache)), timeout=120)
        assert r.returncode == 2 and said in r.stderr and "SD35_COMPILE_CACHE" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
        check = storage.check_compile_cache(doctor.Context(settings=Settings(_env_file=None, compile_cache=cache)))
        assert check.status == doctor.FAIL and said in check.finding, check
