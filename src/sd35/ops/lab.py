"""`sd35 lab`: JupyterLab for one user on a shared machine, reachable by nobody else.

Why a Unix socket: a TCP port on 127.0.0.1 is open to every local account, so the token is the only
lock — and a token on the command line (`--IdentityProvider.token=…`) is in `ps` for everyone. So by
default JupyterLab listens on a Unix socket, mode 0600, in a 0700 folder of ours ($XDG_RUNTIME_DIR, else
/tmp/sd35-<uid>): only this account can connect. A laptop reaches it with `ssh -L 8888:/path/lab.sock HOST`
(OpenSSH forwards a local TCP port to a remote Unix socket). TCP on 127.0.0.1 only when asked (`--tcp`,
SD35_LAB_TCP=1), with the token as the lock.

The token travels in the environment (JUPYTER_TOKEN: /proc/PID/environ is readable by this account and
root only), never in argv; jupyter_server then logs it as `?token=...`. We print it to an interactive
terminal only; without one (systemd: stderr is the journal) it goes to a 0600 file beside the socket and
the log names the file.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sd35.errors import InputError

SOCKET_NAME = "sd35-lab.sock"
TOKEN_NAME = "sd35-lab.token"


def private_dir() -> Path:
    """A folder only we can enter: $XDG_RUNTIME_DIR when it is ours and 0700, else /tmp/sd35-<uid>."""
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.stat(xdg)
            if st.st_uid == uid and stat.S_IMODE(st.st_mode) & 0o077 == 0:
                return Path(xdg)
        except OSError:
            pass
    path = Path(tempfile.gettempdir()) / f"sd35-{uid}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
        raise InputError(f"{path} is not a private folder of yours (owner uid {st.st_uid}, mode "
                         f"{stat.S_IMODE(st.st_mode):o}): another account may have created it to catch your socket.",
                         "set SD35_LAB_SOCKET to a path in a 0700 folder you own, or log in so that "
                         "$XDG_RUNTIME_DIR exists.", param="lab_socket")
    return path


def _check_parent(sock: Path) -> None:
    st = os.stat(sock.parent)
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise InputError(f"SD35_LAB_SOCKET={sock}: its folder is not private (owner uid {st.st_uid}, mode "
                         f"{stat.S_IMODE(st.st_mode):o}).", "use a folder you own with mode 0700.", param="lab_socket")


def _socket_in_use(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            sock.unlink()  # stale: left by a lab that was killed
            return False
    return True


@dataclass
class Plan:
    args: list[str]
    env: dict[str, str]
    token: str
    url: str                      # what the user opens (on the laptop, after the tunnel)
    tunnel: str                   # the ssh -L line
    socket: Path | None = None
    token_file: Path | None = None
    notes: list[str] = field(default_factory=list)


def plan(settings, root: Path, *, tcp: bool, interactive: bool) -> Plan:
    """Everything `sd35 lab` will run, decided before anything starts."""
    from sd35.net import port_free

    token = settings.lab_token.get_secret_value() if settings.lab_token else secrets.token_urlsafe(24)
    host = socket.gethostname()
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.root_dir={root}",
            "--KernelSpecManager.ensure_native_kernel=True"]
    env = {**os.environ, "JUPYTER_TOKEN": token}
    env.pop("JUPYTER_TOKEN_FILE", None)
    notes = []
    sock = None
    if tcp:
        port = settings.lab_port
        if not port_free(port):
            raise InputError(f"port {port} on 127.0.0.1 is in use.", "pass --port or set SD35_LAB_PORT.",
                             param="lab_port")
        args += ["--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0"]
        url = f"http://127.0.0.1:{port}/lab?token={token}"
        tunnel = f"ssh -N -L {port}:127.0.0.1:{port} {host}"
        notes.append("TCP on 127.0.0.1 (--tcp): every account on this machine can reach the port; the token is "
                     "the only lock. The default Unix socket is reachable by you alone.")
    else:
        sock = Path(settings.lab_socket).expanduser() if settings.lab_socket else private_dir() / SOCKET_NAME
        sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_parent(sock)
        if _socket_in_use(sock):
            raise InputError(f"a JupyterLab already listens on {sock}.",
                             "use it, stop it, or set SD35_LAB_SOCKET to another path.", param="lab_socket")
        args += [f"--ServerApp.sock={sock}", "--ServerApp.sock_mode=0600"]
        port = settings.lab_port
        url = f"http://127.0.0.1:{port}/lab?token={token}"
        tunnel = f"ssh -N -L {port}:{sock} {host}"
    token_file = None
    if not interactive:  # stderr is a log (the journal): the token goes to a 0600 file, the log names it
        token_file = (sock.parent if sock else private_dir()) / TOKEN_NAME
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
    if os.geteuid() == 0:  # JupyterLab refuses root unless told; containers and CI often are root
        args.append("--allow-root")
        notes.append("running JupyterLab as root")
    return Plan(args, env, token, url, tunnel, sock, token_file, notes)
