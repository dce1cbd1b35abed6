"""Doctor checks of the network: the debugpy and API ports, and what this account's listeners expose.

Why together: all of them look at TCP ports (`sd35.net`): a busy port stops `sd35 serve` or a debug
session, and a listener on 127.0.0.1 is open to every local account (a listening debuggee, a JupyterLab
on TCP, an API without keys).
"""

from __future__ import annotations

import importlib.metadata

from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context


def check_debugpy(ctx: Context) -> Check:
    try:
        version = importlib.metadata.version("debugpy")
    except importlib.metadata.PackageNotFoundError:
        return Check("debugpy", WARN, "debugpy is not installed: the VS Code launch targets need it",
                     "run `make setup`")
    from sd35.net import port_free

    if not port_free(ctx.debugpy_port):
        return Check("debugpy", WARN, f"debugpy {version}; port {ctx.debugpy_port} is already in use (fine if it is "
                     "your VS Code's \"Attach: running service\" waiting)",
                     "otherwise stop the other debug session, or use another port in both SD35_DEBUGPY=127.0.0.1:PORT "
                     "and launch.json's \"listen\"; `sd35 doctor`'s listeners check says whose it is")
    return Check("debugpy", OK, f"debugpy {version}; port {ctx.debugpy_port} free")


def check_api_port(ctx: Context) -> Check:
    port = ctx.api_port or (ctx.settings.port if ctx.settings else 8000)
    from sd35.net import port_free

    if not port_free(port):
        return Check("api port", WARN, f"port {port} is in use (another sd35 serve, or another program)",
                     f"`ss -ltnp 'sport = :{port}'` shows who holds it; stop it or serve on another --port")
    return Check("api port", OK, f"port {port} free")


def _answers_without_key(port: int, host: str) -> bool:
    """True when GET /v1/models on the port succeeds with no Authorization header."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://[{host}]:{port}/v1/models" if ":" in host else f"http://{host}:{port}/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_listeners(ctx: Context) -> Check:
    """Every TCP port of ours another account could use: 127.0.0.1 is open to every local account."""
    from sd35 import net

    if net.tcp_listeners() is None:
        return Check("listeners", SKIP, "no /proc/net/tcp here: cannot list listening ports")
    others = net.other_login_accounts()
    api_port = ctx.settings.port if ctx.settings else ctx.api_port
    lab_port = ctx.settings.lab_port if ctx.settings else 8888
    bad: list[tuple[str, str, str]] = []  # (status, finding, fix)
    checked = 0
    procs = net.processes_by_inode()
    for x in net.ours():
        proc = procs.get(x.inode)
        pid, cmd = proc if proc else (None, "")
        who = f"{x} (pid {pid}: {cmd[:80]})" if pid else str(x)
        reach = "every account on this machine" if x.local_only else "every account and the network"
        if "debugpy" in cmd and "adapter" in cmd and "--for-server" in cmd:
            bad.append((FAIL, f"a debuggee listens for a debugger on {who}: {reach} can attach and run code as you",
                        "restart it with SD35_DEBUGPY=127.0.0.1:PORT (it connects out to VS Code's \"Attach: running "
                        "service\", which listens) instead of listen:…"))
        elif "ipykernel" in cmd:
            continue  # kernels' ZMQ ports: every message is signed with the key in a 0600 connection file
        elif "jupyter" in cmd or (x.port == lab_port and not cmd):
            bad.append((WARN, f"JupyterLab on TCP {who}: {reach} can reach it; only its token protects it",
                        "restart it with `sd35 lab` (a Unix socket only you can open; no --tcp / SD35_LAB_TCP)"))
        elif (x.port == api_port or ("sd35" in cmd and " serve" in cmd)) and _answers_without_key(x.port, x.host):
            bad.append((FAIL, f"the sd35 API on {who} answers without a key: {reach} can use the GPU, anonymously",
                        "create per-user keys (`sd35 keys add NAME`, SD35_API_KEYS_FILE) or set SD35_API_KEY, then "
                        "restart it without --allow-no-key"))
        checked += 1
    if not bad:
        return Check("listeners", OK, f"{checked} TCP listener(s) of this account checked: none lets another account "
                     "in" + ("" if others else " (and no other account can log in here)"))
    if not others and all(x[0] == FAIL for x in bad):  # nobody else here today: still worth fixing
        bad = [(WARN, f + " (no other login account today)", fix) for _, f, fix in bad]
    status = FAIL if any(b[0] == FAIL for b in bad) else WARN
    return Check("listeners", status, "; ".join(b[1] for b in bad), " / ".join(dict.fromkeys(b[2] for b in bad)))
