"""Addresses and ports: is a host loopback-only, is a local port free.

Why a leaf module: the debugger harness, the service's preflight, `sd35 lab` and `sd35 doctor` all ask
these questions; keeping the answers here (importing nothing of ours) lets each of them ask without
importing the others — `debug.py` once reached this through the service and closed an import cycle.
"""

from __future__ import annotations

import ipaddress
import socket


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
    """True when nothing listens on host:port (we could bind it now)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
