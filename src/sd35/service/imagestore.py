"""Where the images behind `response_format: url` live until their link expires: in the process's memory
(one service, one replica), or in a directory every replica mounts (`SD35_IMAGE_STORE_DIR`).

Why a shared directory and not only memory: on Ray Serve (or behind any load balancer) the `GET
/v1/images/{id}` of a link reaches *a* replica, rarely the one that made the image. A directory on the
filesystem the replicas already share (one box: a private folder in /tmp; N boxes: the NFS / ReadWriteMany
volume that holds the Hugging Face cache, or one beside it) answers on every replica, with no extra service.

The directory store, as a shared folder demands:
  - ids are `img_<expiry, unix seconds in hex>_<24 random url-safe characters>`: the wall-clock expiry is in
    the name, so every replica agrees when a link dies without reading the file; an id is checked against
    that exact form before it names a path (no traversal), and a tampered or unknown id finds no file: 404;
  - writes are atomic (a 0600 temporary file in the same directory, fsync, rename), so a reader on another
    replica sees the whole image or none; files are 0600 and the directory is created 0700;
  - every `put` removes what has expired, then the oldest files while the folder holds more than
    SD35_IMAGE_STORE_BYTES; `get` of an expired id removes it. Several replicas doing so at once is fine:
    a file another one removed first is simply gone.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sd35.errors import Sd35Error

# Media type by file suffix: the directory store keeps the format in the file name, not beside it.
SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpeg", "image/webp": ".webp"}
DISK_ID = re.compile(r"img_([0-9a-f]{8,12})_[A-Za-z0-9_-]{24}")


@dataclass
class Stored:
    data: bytes
    media_type: str
    expires: float


def stored_bound(width: int, height: int, n: int) -> int:
    """An upper bound on the encoded bytes of `n` images (raw RGB + PNG's per-row and header overhead):
    what a `url` response may need in the store, known before the GPU runs."""
    return n * (width * height * 3 + height + 4096)


class DoesNotFit(Exception):
    """The images of one response are more than the whole store holds."""


def _check_fits(datas: list[bytes], max_bytes: int) -> int:
    total = sum(len(d) for d in datas)
    if total > max_bytes:
        raise DoesNotFit(f"{total} bytes of images; the store holds {max_bytes}")
    return total


class ImageStore:
    """In memory: an id → bytes map that forgets after `ttl` seconds and keeps at most `max_bytes` (oldest
    dropped first — but never an image of the response being stored: a response's images go in together, or
    not at all). Only the process that made an image can serve it."""

    def __init__(self, ttl: float, max_bytes: int):
        self.ttl, self.max_bytes = ttl, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        return self.put_all([data], media_type)[0]

    def put_all(self, datas: list[bytes], media_type: str) -> list[str]:
        """Store one response's images together; raises DoesNotFit when they alone exceed `max_bytes`."""
        total = _check_fits(datas, self.max_bytes)
        ids = ["img_" + secrets.token_urlsafe(18) for _ in datas]
        with self._lock:
            self._expire()
            while self._items and self._bytes + total > self.max_bytes:  # older responses' images only
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)
            expires = time.monotonic() + self.ttl
            for image_id, data in zip(ids, datas):
                self._items[image_id] = Stored(data, media_type, expires)
            self._bytes += total
        return ids

    def get(self, image_id: str) -> Stored | None:
        with self._lock:
            self._expire()
            return self._items.get(image_id)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            first = next(iter(self._items.values()))
            if first.expires > now:
                break
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old.data)


class DirImageStore:
    """In a directory shared by the replicas (module docstring): same `put`/`get` as `ImageStore`."""

    def __init__(self, root: Path, ttl: float, max_bytes: int):
        self.root, self.ttl, self.max_bytes = Path(root), ttl, max_bytes
        self._lock = threading.Lock()  # one cleanup at a time in this process (others may run elsewhere)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(6)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise Sd35Error(f"SD35_IMAGE_STORE_DIR={root} cannot be written: {exc.strerror or exc}",
                            "point it at a directory this account can write, on a filesystem every replica "
                            "mounts at the same path (docs/scale-out.md)") from None

    def put(self, data: bytes, media_type: str) -> str:
        return self.put_all([data], media_type)[0]

    def put_all(self, datas: list[bytes], media_type: str) -> list[str]:
        """Write one response's images (each atomically), then clean up without touching them; raises
        DoesNotFit when they alone exceed `max_bytes`."""
        _check_fits(datas, self.max_bytes)
        ids = [self._write(data, media_type) for data in datas]
        self.cleanup(keep={self.root / (i + SUFFIXES[media_type]) for i in ids})
        return ids

    def _write(self, data: bytes, media_type: str) -> str:
        image_id = f"img_{int(time.time() + self.ttl):x}_{secrets.token_urlsafe(18)}"
        final = self.root / (image_id + SUFFIXES[media_type])
        tmp = self.root / f".tmp-{image_id}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return image_id

    def get(self, image_id: str) -> Stored | None:
        m = DISK_ID.fullmatch(image_id)
        if m is None:
            return None
        expires = int(m.group(1), 16)
        paths = {media_type: self.root / (image_id + suffix) for media_type, suffix in SUFFIXES.items()}
        if expires <= time.time():
            for path in paths.values():
                path.unlink(missing_ok=True)
            return None
        for media_type, path in paths.items():
            try:
                return Stored(path.read_bytes(), media_type, expires)
            except FileNotFoundError:
                continue
        return None

    def cleanup(self, keep: set[Path] = frozenset()) -> None:
        """Remove expired images (and temporary files a crashed writer left), then the oldest while the
        directory holds more than `max_bytes` — never those in `keep` (the response just stored)."""
        now = time.time()
        with self._lock:
            kept: list[tuple[float, int, Path]] = []
            for entry in os.scandir(self.root):
                path = Path(entry.path)
                try:
                    size, mtime = entry.stat().st_size, entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                m = DISK_ID.fullmatch(path.stem)
                stale_tmp = entry.name.startswith(".tmp-") and mtime < now - 600
                if stale_tmp or (m and int(m.group(1), 16) <= now):
                    path.unlink(missing_ok=True)
                elif m:
                    kept.append((mtime, size, path))
            total = sum(size for _, size, _ in kept)
            for _, size, path in sorted(kept):
                if total <= self.max_bytes:
                    break
                if path in keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size


def make_store(settings) -> ImageStore | DirImageStore:
    """SD35_IMAGE_STORE_DIR set: the shared directory; else memory."""
    if settings.image_store_dir:
        return DirImageStore(settings.image_store_dir, settings.image_url_ttl, settings.image_store_bytes)
    return ImageStore(settings.image_url_ttl, settings.image_store_bytes)
