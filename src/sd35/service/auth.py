"""API keys: one per person (or client), stored hashed, checked in constant time, named in the access log.

Why per-user keys: on a shared GPU box "the API key" becomes everybody's key, and the access log could
only ever say "someone". The keys file (SD35_API_KEYS_FILE, default /etc/sd35/api-keys) holds one line
per key, `NAME:ID:sha256$SALT$HASH` (base64), written by `sd35 keys add NAME`, which prints the new
key `sd35_<ID>_<SECRET>` once. The file holds no key itself, but it decides who gets in: we refuse one
that other accounts can write, and `keys add` refuses one they can read (chmod 0640, group = the service's).

Why a fast hash and not scrypt: a key's secret is 256 random bits, which no one can guess from its hash,
fast or slow; a slow hash (scrypt: ~30-170 ms and 16 MiB each) protects guessable passwords, and for random
keys it only made every wrong token expensive *for us* — two clients sending wrong keys with a real id kept
a core busy and slowed every user's images (`sd35 bench serve --flood`). So new keys are salted SHA-256,
checked inline in microseconds. Lines written before (`…:scrypt$N$r$p$SALT$HASH`) keep working, each wrong
token naming them costing one scrypt; `sd35 keys list` names them, to re-issue.

Why an id in the key: a token must never cost one check per entry. The id names the one entry to check:
a token whose id is unknown, or whose shape is no key's, is refused with no hashing at all. The scrypt
checks that remain run on the service's own small limiter (app.py: AUTH_THREADS), never on the pool that
checks requests and encodes images. A key that verified is remembered by its SHA-256 (bounded LRU); wrong tokens are remembered in a
separate LRU, so a flood of junk evicts only junk and a valid key stays a dictionary lookup.

Lines of the old format (`NAME:scrypt$…`, keys `sd35-…` without an id) keep working: only a token of that
old shape is checked against them (one scrypt per old line); `sd35 keys list` and the service's start say
which names to re-issue. The single SD35_API_KEY of old is accepted as "default" (a SHA-256 compare).
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
KEY_ID = re.compile(r"^[0-9a-f]{12}$")
TOKEN = re.compile(r"^sd35_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")  # what `keys add` prints
LEGACY_TOKEN = re.compile(r"^sd35-[A-Za-z0-9_-]{43}$")  # keys of the old format (no id)
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
_CACHE_SIZE = 1024  # valid tokens remembered
_FAILED_SIZE = 8192  # wrong tokens remembered (their own LRU: junk never evicts a valid key)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def hash_key(key: str, *, salt: bytes | None = None, n: int = SCRYPT["n"], r: int = SCRYPT["r"],
             p: int = SCRYPT["p"]) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def fast_hash(key: str, *, salt: bytes | None = None) -> str:
    """A new key's line: salted SHA-256 (the secret is 256 random bits: see the module docstring)."""
    salt = salt or secrets.token_bytes(16)
    return f"sha256${_b64(salt)}${_b64(hashlib.sha256(salt + key.encode()).digest())}"


def is_fast(encoded: str) -> bool:
    return encoded.startswith("sha256$")


def verify(key: str, encoded: str) -> bool:
    try:
        if is_fast(encoded):
            _, salt, digest = encoded.split("$")
            return hmac.compare_digest(hashlib.sha256(_unb64(salt) + key.encode()).digest(), _unb64(digest))
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
    key_id: str | None = None  # None: a line of the old format (its key has no id)
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
        name, sep, rest = line.partition(":")
        key_id, sep2, encoded = rest.partition(":")
        if not sep2:  # the old format: NAME:scrypt$…
            key_id, encoded = None, rest
        shape = (encoded.startswith("scrypt$") and encoded.count("$") == 5) or \
            (is_fast(encoded) and encoded.count("$") == 2 and key_id is not None)
        if not sep or not NAME.match(name) or not shape or (key_id is not None and not KEY_ID.match(key_id)):
            raise InputError(f"{path}:{i} is not NAME:ID:sha256$SALT$HASH (or an older NAME:ID:scrypt$… line).",
                             "remove the line and run `sd35 keys add NAME` again.", param="api_keys_file")
        if any(e.name == name for e in entries):
            raise InputError(f"{path}:{i}: the name {name!r} appears twice.", "keep one line per name.",
                             param="api_keys_file")
        if key_id is not None and any(e.key_id == key_id for e in entries):
            raise InputError(f"{path}:{i}: the key id {key_id} appears twice.",
                             "remove the line and run `sd35 keys add NAME` again.", param="api_keys_file")
        entries.append(Entry(name, encoded, key_id, policy))
    return entries


def legacy_names(entries: list[Entry]) -> list[str]:
    """Names whose line is of an older format (no id, or a scrypt hash: every wrong token naming them costs a
    scrypt): re-issue them."""
    return [e.name for e in entries if e.key_id is None or not is_fast(e.encoded)]


LEGACY_FIX = ("re-issue each: delete its line, run `sd35 keys add NAME` and hand over the new key (sd35_<id>_…, "
              "checked in microseconds); old keys keep working until then, but every wrong token naming them "
              "costs a scrypt (~30-170 ms of a core)")


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
                raise InputError(
                    f"no group {group!r} on this machine: the keys file is given to the service's group, "
                    "which must exist first.",
                    f"create it: `sudo groupadd --system {group}` (or `sudo useradd --system {group}` for the "
                    "service account, which creates its group too), then run this again. Keep it apart from "
                    "the team's group (docs/hosting.md: `sd35` for the service, `sd35-team` for people), or "
                    "every teammate can read the keys.", param="group") from None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.close(fd)
        os.chown(path, -1, gid)
        os.chmod(path, 0o640)
    taken = {e.key_id for e in read(path)}
    key_id = secrets.token_hex(6)
    while key_id in taken:
        key_id = secrets.token_hex(6)
    key = f"sd35_{key_id}_{secrets.token_urlsafe(32)}"
    with open(path, "a") as f:
        f.write(f"{name}:{key_id}:{fast_hash(key)}\n")
    return key


class KeyRing:
    """Who a bearer token belongs to: a name, or None. At most one scrypt per token of the new shape."""

    def __init__(self, entries: list[Entry], default_key: str | None = None):
        self.entries = entries
        self.by_id = {e.key_id: e for e in entries if e.key_id is not None}
        self.legacy = [e for e in entries if e.key_id is None]
        self.default = hashlib.sha256(default_key.encode()).digest() if default_key else None
        self._known: OrderedDict[bytes, str] = OrderedDict()  # valid tokens only
        self._failed: OrderedDict[bytes, None] = OrderedDict()  # wrong tokens only
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.entries) or self.default is not None

    def names(self) -> list[str]:
        return (["default"] if self.default else []) + [e.name for e in self.entries]

    def cached(self, token: str) -> tuple[bool, str | None]:
        """(known, name) without any slow work: every valid token after its first request, every wrong one
        already seen, and every token no entry could match (wrong shape, unknown id) take this path."""
        h = hashlib.sha256(token.encode()).digest()
        if self.default is not None and hmac.compare_digest(h, self.default):
            return True, "default"
        with self._lock:
            if h in self._known:
                self._known.move_to_end(h)
                return True, self._known[h]
            if h in self._failed:
                return True, None
        candidates = self._candidates(token)
        if not candidates:
            return True, None  # nothing to verify against: refused without any hashing
        if all(is_fast(e.encoded) for e in candidates):  # microseconds: checked here, no thread hop, no cache
            name = next((e.name for e in candidates if verify(token, e.encoded)), None)
            if name is not None:
                self._remember(h, name)
            return True, name
        return False, None

    def _remember(self, h: bytes, name: str | None) -> None:
        with self._lock:
            table, size = (self._known, _CACHE_SIZE) if name is not None else (self._failed, _FAILED_SIZE)
            table[h] = name
            while len(table) > size:
                table.popitem(last=False)

    def _candidates(self, token: str) -> list[Entry]:
        m = TOKEN.match(token)
        if m:
            entry = self.by_id.get(m.group(1))
            return [entry] if entry is not None else []
        return self.legacy if LEGACY_TOKEN.match(token) else []

    def identify(self, token: str) -> str | None:
        """The name a token belongs to (slow on first sight: one scrypt, or one per old-format line)."""
        known, name = self.cached(token)
        if known:
            return name
        name = next((e.name for e in self._candidates(token) if verify(token, e.encoded)), None)
        self._remember(hashlib.sha256(token.encode()).digest(), name)
        return name


def load(settings) -> KeyRing:
    """The keys the service accepts: the keys file (when present) plus SD35_API_KEY as "default"."""
    from sd35.settings import secret

    path = Path(settings.api_keys_file) if settings.api_keys_file else DEFAULT_FILE
    entries: list[Entry] = []
    try:
        present = path.exists()
        if present:
            entries = read(path)
    except PermissionError:
        # Never start with fewer keys than the admin wrote (a keyless or "default"-only service): say so.
        raise InputError(f"cannot read the API keys file {path} as this account"
                         f"{'' if settings.api_keys_file else ' (the default SD35_API_KEYS_FILE)'}.",
                         f"give the service's group read access: chown root:GROUP {path}; chmod 0640 {path}; for a "
                         "service of your own, point SD35_API_KEYS_FILE at your own file (`sd35 keys add NAME "
                         "--file PATH`).", param="api_keys_file") from None
    if not present and settings.api_keys_file:
        raise InputError(f"SD35_API_KEYS_FILE={path} does not exist.", "create it with `sd35 keys add NAME "
                         f"--file {path}`, or unset SD35_API_KEYS_FILE.", param="api_keys_file")
    if legacy_names(entries):
        logging.getLogger(__name__).warning("%s: keys of an older format (no id, or scrypt) for %s: %s", path,
                                            ", ".join(legacy_names(entries)), LEGACY_FIX)
    return KeyRing(entries, secret(settings.api_key))
