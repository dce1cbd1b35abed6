"""Attaching VS Code to a running `sd35 serve` / `sd35 generate` (SD35_DEBUGPY) without opening a door.

Why the reverse direction by default: a debuggee that *listens* (`debugpy.listen`) runs code for whoever
connects first, and on a shared server 127.0.0.1 is reachable by every local account — one of them
attached to a colleague's service and read their ~/.ssh. So `SD35_DEBUGPY=HOST:PORT` means **connect**:
VS Code listens (launch.json "Attach: running service" has `"listen": {"host": "127.0.0.1", "port":
5678}`), and the process calls `debugpy.connect` out to it. Nothing in the process accepts connections.

The reverse direction has its own trap: another account can bind 127.0.0.1:5678 before VS Code does,
and a process that connects to it hands itself over. So before connecting we read /proc/net/tcp and
refuse a loopback port whose listener is not ours (`net.owner`).

A listening debuggee stays possible, only on explicit opt-in: `SD35_DEBUGPY=listen:HOST:PORT` with
`SD35_DEBUGPY_ALLOW_LISTEN=1`, and a warning at start (for a single-user container, say).

Grammar: `[connect:|listen:]HOST:PORT` (IPv6 in brackets: `[::1]:5678`).
"""

from __future__ import annotations

import logging
import os

from sd35.errors import InputError

log = logging.getLogger("sd35.debug")
MODES = ("connect", "listen")


def parse(address: str) -> tuple[str, str, int]:
    """`[connect:|listen:]HOST:PORT` → (mode, host, port)."""
    text = address.strip()
    mode = "connect"
    for m in MODES:
        if text.lower().startswith(m + ":"):
            mode, text = m, text[len(m) + 1:]
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"SD35_DEBUGPY={address!r} is not [connect:|listen:]HOST:PORT.",
                         "use e.g. SD35_DEBUGPY=127.0.0.1:5678 (this process connects to VS Code, which listens "
                         "with the \"Attach: running service\" target).", param="debugpy")
    return mode, host, int(port)


def _debugpy():
    try:
        import debugpy
    except ImportError:
        raise InputError("SD35_DEBUGPY is set but debugpy is not installed.", "run `make setup`.") from None
    return debugpy


def _check_listener_is_ours(host: str, port: int, allow_remote: bool = False) -> None:
    """Refuse to hand this process to a loopback listener another account owns (or to nobody). Fails
    closed: when /proc/net/tcp cannot be read, nobody can say whose the listener is."""
    from sd35 import net

    if net.tcp_listeners() is None:
        if allow_remote:  # the user already accepts whoever answers (SD35_DEBUGPY_ALLOW_REMOTE=1)
            log.warning("cannot read /proc/net/tcp: connecting to %s:%s without checking who listens "
                        "(SD35_DEBUGPY_ALLOW_REMOTE=1)", host, port)
            return
        raise InputError(
            f"SD35_DEBUGPY={host}:{port}: cannot read /proc/net/tcp to check that the listener there is your VS "
            "Code; connecting to another account's listener would let it run code as you.",
            "run where /proc is readable (a normal host or container), or, where no other account exists (a "
            "single-user container), accept whoever listens with SD35_DEBUGPY_ALLOW_REMOTE=1.", param="debugpy")
    uid = net.owner(host, port)
    if uid is None:
        raise InputError(
            f"SD35_DEBUGPY={host}:{port}: no debugger is listening there (this process connects to VS Code, not "
            "the other way round).",
            "in VS Code start the \"Attach: running service\" target first (it listens on 127.0.0.1:5678 and waits), "
            "then start this command; use the same port in both.", param="debugpy")
    if uid != os.getuid():
        raise InputError(
            f"SD35_DEBUGPY={host}:{port}: that port is held by another account (uid {uid}), not by your VS Code; "
            "connecting would let that account run code as you.",
            "pick a free port of your own: the same number in SD35_DEBUGPY and in launch.json's \"listen\".\"port\" "
            "(`ss -ltnp` shows who holds which).", param="debugpy")


def start(address: str | None, *, wait: bool = False, allow_remote: bool = False,
          allow_listen: bool = False) -> tuple[str, int] | None:
    """Connect to (or, on opt-in, listen for) a debugger before the model loads. Returns the endpoint."""
    from sd35.net import is_loopback

    if not address:
        return None
    mode, host, port = parse(address)
    # 1. The address: loopback only unless explicitly allowed (containers, a debugger on another host).
    if not is_loopback(host) and not allow_remote:
        if mode == "listen":
            cause = (f"SD35_DEBUGPY={address}: debugpy would listen on a non-loopback address, and that port "
                     "executes code for anyone who reaches it.")
        else:
            cause = (f"SD35_DEBUGPY={address}: this process would connect to a debugger on a non-loopback "
                     "address, and whoever answers there executes code in it.")
        raise InputError(cause, "keep the debugger on 127.0.0.1 (under Remote-SSH VS Code runs on the server: no "
                         "`ssh -L` needed); for a debugger across a container boundary set "
                         "SD35_DEBUGPY_ALLOW_REMOTE=1.", param="debugpy")
    debugpy = _debugpy()
    # 2. Listen (opt-in only) or connect (the default).
    if mode == "listen":
        if not allow_listen:
            raise InputError(
                f"SD35_DEBUGPY={address}: a listening debuggee runs code for whoever connects first, and every "
                "account on this machine can connect to 127.0.0.1.",
                "let VS Code listen instead: SD35_DEBUGPY=127.0.0.1:5678 + the \"Attach: running service\" target; "
                "only where no other account exists (a single-user container) set SD35_DEBUGPY_ALLOW_LISTEN=1.",
                param="debugpy")
        endpoint = tuple(debugpy.listen((host, port)))
        log.warning("!!! debugpy LISTENS on %s:%s (SD35_DEBUGPY_ALLOW_LISTEN=1): ANY account that can reach this "
                    "port can run code as uid %s. Use only where nobody else can log in.", endpoint[0], endpoint[1],
                    os.getuid())
    else:
        if is_loopback(host):
            _check_listener_is_ours(host, port, allow_remote)
        else:
            log.warning("debugpy connects to %s:%s (SD35_DEBUGPY_ALLOW_REMOTE=1): whoever listens there controls "
                        "this process", host, port)
        try:
            debugpy.connect((host, port))
        except OSError as exc:
            raise InputError(f"SD35_DEBUGPY={address}: cannot connect to the debugger: {exc}.",
                             "start VS Code's \"Attach: running service\" target first, on the same port.",
                             param="debugpy") from None
        endpoint = (host, port)
        log.info("debugpy connected to the debugger at %s:%s", host, port)
    if wait:
        log.info("waiting for the debugger to finish configuring (SD35_DEBUGPY_WAIT=1)")
        debugpy.wait_for_client()
    return endpoint
