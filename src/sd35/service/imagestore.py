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


class ImageStore:
    """In memory: an id → bytes map that forgets after `ttl` seconds and keeps at most `max_bytes`
    (oldest dropped first). Only the process that made an image can serve it."""

    def __init__(self, ttl: float, max_bytes: int):
        self.ttl, self.max_bytes = ttl, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        image_id = "img_" + secrets.token_urlsafe(18)
        with self._lock:
            self._expire()
            self._items[image_id] = Stored(data, media_type, time.monotonic() + self.ttl)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)
        return image_id

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
        self.cleanup()
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

    def cleanup(self) -> None:
        """Remove expired images (and temporary files a crashed writer left), then the oldest while the
        directory holds more than `max_bytes`."""
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
            for _, size, path in sorted(kept)[:-1]:  # the newest (the one just written) always stays
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size


def make_store(settings) -> ImageStore | DirImageStore:
    """SD35_IMAGE_STORE_DIR set: the shared directory; else memory."""
    if settings.image_store_dir:
        return DirImageStore(settings.image_store_dir, settings.image_url_ttl, settings.image_store_bytes)
    return ImageStore(settings.image_url_ttl, settings.image_store_bytes)
