"""This machine's network, as a shared box sees it: loopback or not, free ports, who listens where, who else
can log in.

Why a leaf module (importing nothing of ours): the debugger harness, the service's preflight, `sd35 lab` and
`sd35 doctor` all ask these questions, and each must ask without importing the others.

Why this exists: on a shared GPU server 127.0.0.1 is not private. Every local account can connect to a
loopback port, and every local account can *bind* a free one first. So the debugger's reverse
connection must check that the port it connects to belongs to us (`owner`), `sd35 doctor` lists the
listeners of ours that other accounts can reach (`ours`), and the service asks whether anyone else
could call it at all (`other_login_accounts`). Linux only: the answers come from /proc/net/tcp{,6} and
/etc/passwd; elsewhere the functions return None / empty and callers say that they could not check.
"""

from __future__ import annotations

import ipaddress
import socket
import os
from dataclasses import dataclass
from pathlib import Path

PROC_NET = Path("/proc/net")
TCP_LISTEN = "0A"
NOLOGIN_SHELLS = ("nologin", "false", "sync", "halt", "shutdown")


@dataclass(frozen=True)
class Listener:
    host: str    # "127.0.0.1", "::1", "0.0.0.0", "::" or a specific address
    port: int
    uid: int
    inode: int

    @property
    def local_only(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _address(hex_addr: str) -> str:
    """/proc/net/tcp's address: little-endian 32-bit words, in hex."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (Python 3.11 prints it as ::ffff:7f00:1)
    return str(mapped or ip)


def tcp_listeners(proc_net: Path = PROC_NET) -> list[Listener] | None:
    """Every TCP socket in LISTEN state in this network namespace; None where /proc/net is not there."""
    found: list[Listener] = []
    seen_any = False
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_any = True
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != TCP_LISTEN:
                continue
            addr, _, port = f[1].partition(":")
            host = _address(addr)
            found.append(Listener(host, int(port, 16), int(f[7]), int(f[9])))
    return found if seen_any else None


def owner(host: str, port: int) -> int | None:
    """The uid of the socket that accepts connections to host:port (a specific or a wildcard bind), or
    None when nothing listens there or this system has no /proc/net."""
    listeners = tcp_listeners()
    if not listeners:
        return None
    try:
        want = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        want = ipaddress.ip_address("127.0.0.1")
    exact = [x for x in listeners if x.port == port and ipaddress.ip_address(x.host) == want]
    wild = [x for x in listeners if x.port == port and ipaddress.ip_address(x.host).is_unspecified]
    for x in exact + wild:
        return x.uid
    return None


def ours(uid: int | None = None) -> list[Listener]:
    """This account's TCP listeners: on loopback every local account reaches them, on any other address
    the network does too."""
    uid = os.getuid() if uid is None else uid
    return sorted({x for x in tcp_listeners() or [] if x.uid == uid}, key=lambda x: (x.port, x.host))


def socket_inodes_of(pid: int) -> set[int]:
    """Socket inodes a process holds (readable for our own processes)."""
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def processes_by_inode(uid: int | None = None) -> dict[int, tuple[int, str]]:
    """socket inode -> (pid, command line) for every process of ours (one pass over /proc)."""
    uid = os.getuid() if uid is None else uid
    found: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for inode in socket_inodes_of(int(entry.name)):
            found.setdefault(inode, (int(entry.name), cmd.strip()))
    return found


def login_accounts(passwd: Path = Path("/etc/passwd")) -> list[tuple[str, int]]:
    """Accounts a person can log in as: uid >= 1000 (not nobody) with a real shell. Root is left out: it
    can read any process's memory anyway, so it changes nothing about who can use our ports."""
    accounts = []
    try:
        lines = passwd.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        f = line.split(":")
        if len(f) < 7 or not f[2].isdigit():
            continue
        uid, shell = int(f[2]), f[6].strip()
        if uid < 1000 or uid == 65534 or not shell or shell.rsplit("/", 1)[-1] in NOLOGIN_SHELLS:
            continue
        accounts.append((f[0], uid))
    return accounts


def other_login_accounts(uid: int | None = None) -> list[str]:
    """Login accounts other than ours: each could reach a loopback port of ours."""
    uid = os.getuid() if uid is None else uid
    return [name for name, u in login_accounts() if u != uid]

def is_loopback(host: str) -> bool:
    """True when `host` (a name, an IPv4/IPv6 literal, bracketed or not) resolves only to loopback."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (we could bind it now). SO_REUSEADDR, as every server sets it:
    connections of a server just stopped (TIME_WAIT) do not make its port look busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
