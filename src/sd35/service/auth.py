"""API keys: one per person (or client), stored hashed, checked in constant time, named in the access log.

Why per-user keys: on a shared GPU box "the API key" becomes everybody's key, and the access log could
only ever say "someone". The keys file (SD35_API_KEYS_FILE, default /etc/sd35/api-keys) holds one line
per key, `NAME:scrypt$N$r$p$SALT$HASH` (base64), written by `sd35 keys add NAME`, which prints the new key
once. The file holds no key itself, but it decides who gets in: we refuse one that other accounts can
write, and `keys add` refuses one they can read (chmod 0640, group = the service's).

Checking: scrypt is slow on purpose (~30 ms), so a key that verified once is remembered by its SHA-256
(bounded); a key that never verified pays the scrypt of every entry, off the event loop. The single
SD35_API_KEY of old is still accepted, under the name "default".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sd35.errors import InputError
from sd35.service.quotas import Policy, split as split_options

DEFAULT_FILE = Path("/etc/sd35/api-keys")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
_CACHE_SIZE = 1024


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def hash_key(key: str, *, salt: bytes | None = None, n: int = SCRYPT["n"], r: int = SCRYPT["r"],
             p: int = SCRYPT["p"]) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify(key: str, encoded: str) -> bool:
    try:
        algo, n, r, p, salt, digest = encoded.split("$")
        if algo != "scrypt":
            return False
        want = _unb64(digest)
        got = hashlib.scrypt(key.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class Entry:
    name: str
    encoded: str
    policy: Policy = Policy()  # options after the hash: priority, daily_images (service/quotas.py)


def _check_mode(path: Path, *, for_writing: bool) -> None:
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise InputError(f"{path} (mode {mode:04o}) can be written by other accounts: anyone could add a key.",
                         f"chmod 0640 {path} (owner root, group = the service's group).", param="api_keys_file")
    if for_writing and mode & 0o004:
        raise InputError(f"{path} (mode {mode:04o}) is world-readable: every account can read the key hashes.",
                         f"chmod 0640 {path} (owner root, group = the service's group), then run this again.",
                         param="api_keys_file")


def read(path: Path) -> list[Entry]:
    """The entries of a keys file; a malformed line is an error naming the line."""
    if not path.is_file():
        raise InputError(f"{path} is not a file.", "point SD35_API_KEYS_FILE at the keys file "
                         "(`sd35 keys add NAME --file PATH` creates it).", param="api_keys_file")
    _check_mode(path, for_writing=False)
    entries: list[Entry] = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line, policy = split_options(line, f"{path}:{i}")
        name, sep, encoded = line.partition(":")
        if not sep or not NAME.match(name) or not encoded.startswith("scrypt$") or encoded.count("$") != 5:
            raise InputError(f"{path}:{i} is not NAME:scrypt$N$r$p$SALT$HASH.",
                             "remove the line and run `sd35 keys add NAME` again.", param="api_keys_file")
        if any(e.name == name for e in entries):
            raise InputError(f"{path}:{i}: the name {name!r} appears twice.", "keep one line per name.",
                             param="api_keys_file")
        entries.append(Entry(name, encoded, policy))
    return entries


def add(path: Path, name: str, group: str | None = None) -> str:
    """Append a new key for `name`; returns the key (shown once, never stored). A new file is created
    0640, owned by `group` when given (the service's group, so the service can read it)."""
    if not NAME.match(name) or name == "default":
        raise InputError(f"key name {name!r} is not allowed.", "use letters, digits, . _ @ - (not 'default', which "
                         "names SD35_API_KEY), e.g. the person's login.", param="name")
    if path.exists():
        _check_mode(path, for_writing=True)
        if any(e.name == name for e in read(path)):
            raise InputError(f"{path} already has a key named {name!r}.",
                             "remove its line to revoke it first, or pick another name.", param="name")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        gid = -1
        if group:
            import grp

            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise InputError(f"no group {group!r} on this machine.", "pass the service's group, e.g. "
                                 "--group sd35.", param="group") from None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.close(fd)
        os.chown(path, -1, gid)
        os.chmod(path, 0o640)
    key = "sd35-" + secrets.token_urlsafe(32)
    with open(path, "a") as f:
        f.write(f"{name}:{hash_key(key)}\n")
    return key


class KeyRing:
    """Who a bearer token belongs to: a name, or None."""

    def __init__(self, entries: list[Entry], default_key: str | None = None):
        self.entries = entries
        self.default = hashlib.sha256(default_key.encode()).digest() if default_key else None
        self._known: OrderedDict[bytes, str | None] = OrderedDict()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.entries) or self.default is not None

    def names(self) -> list[str]:
        return (["default"] if self.default else []) + [e.name for e in self.entries]

    def cached(self, token: str) -> tuple[bool, str | None]:
        """(known, name) without any slow work: the path every request after the first takes."""
        h = hashlib.sha256(token.encode()).digest()
        if self.default is not None and hmac.compare_digest(h, self.default):
            return True, "default"
        with self._lock:
            if h in self._known:
                self._known.move_to_end(h)
                return True, self._known[h]
        return False, None

    def identify(self, token: str) -> str | None:
        """The name a token belongs to (slow on first sight: one scrypt per entry)."""
        known, name = self.cached(token)
        if known:
            return name
        name = next((e.name for e in self.entries if verify(token, e.encoded)), None)
        with self._lock:
            self._known[hashlib.sha256(token.encode()).digest()] = name
            while len(self._known) > _CACHE_SIZE:
                self._known.popitem(last=False)
        return name


def load(settings) -> KeyRing:
    """The keys the service accepts: the keys file (when present) plus SD35_API_KEY as "default"."""
    from sd35.settings import secret

    path = Path(settings.api_keys_file) if settings.api_keys_file else DEFAULT_FILE
    entries: list[Entry] = []
    if path.exists():
        try:
            entries = read(path)
        except PermissionError:
            if settings.api_keys_file:
                raise InputError(f"cannot read {path} as this account.", f"give the service's group read access: "
                                 f"chown root:GROUP {path}; chmod 0640 {path}.", param="api_keys_file") from None
            # The team's file belongs to the team's service; a developer's own `sd35 serve` uses its own key.
            logging.getLogger(__name__).warning("%s is not readable by this account: not using it (the team "
                                                "service's group needs read access: chgrp sd35 %s)", path, path)
    elif settings.api_keys_file:
        raise InputError(f"SD35_API_KEYS_FILE={path} does not exist.", "create it with `sd35 keys add NAME "
                         f"--file {path}`, or unset SD35_API_KEYS_FILE.", param="api_keys_file")
    return KeyRing(entries, secret(settings.api_key))
