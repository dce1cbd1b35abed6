"""Per-key policy (priority, daily image quota) and the usage ledger that survives restarts.

Why the policy lives on the key's line: the keys file already is the one place an admin decides who may
use the GPU; how much and how urgently belongs beside it. A line may carry options after the hash,
`alice:ID:sha256$SALT$HASH priority=batch daily_images=200`; a line without them is an interactive key
without a quota, so every existing file reads as before. `sd35 keys set` rewrites only that line's options.

Why a file for usage: a quota a restart resets is no quota. The ledger is a small JSON file in the
service's state directory (SD35_STATE_DIR; the unit's StateDirectory, /var/lib/sd35, writable by the
service only), `{"YYYY-MM-DD": {"key": {"images": n, "gpu_seconds": s}}}` per UTC day, eight days kept.
Every instance on the box (one per GPU) adds to the same file under an flock, so a quota is per key
per box, not per GPU. Days are UTC: a quota resets at 00:00 UTC, and the 429 says when that is.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from sd35.errors import InputError

PRIORITIES = ("interactive", "batch")
KEEP_DAYS = 8
_OPTION = re.compile(r"^(priority|daily_images)=(\S+)$")


@dataclass(frozen=True)
class Policy:
    priority: str = "interactive"
    daily_images: int | None = None  # None: no quota

    def options(self) -> str:
        """The options part of a keys-file line (empty for the defaults)."""
        out = [] if self.priority == "interactive" else [f"priority={self.priority}"]
        if self.daily_images is not None:
            out.append(f"daily_images={self.daily_images}")
        return "".join(" " + o for o in out)


def check_priority(value: str) -> str:
    if value not in PRIORITIES:
        raise InputError(f"priority {value!r} is not known.", "use interactive (people waiting at the page) or "
                         "batch (scripts: they wait behind interactive work, but always get a turn).",
                         param="priority")
    return value


def check_daily(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise InputError(f"--daily-images {value} is negative.", "give 0 or more images per day (omit it for no "
                         "quota).", param="daily_images")
    return value


def split(line: str, where: str) -> tuple[str, Policy]:
    """`NAME:HASH [options]` -> ("NAME:HASH", Policy); a bad option is an error naming the line."""
    words = line.split()
    fields: dict[str, str] = {}
    for word in words[1:]:
        m = _OPTION.match(word)
        if not m:
            raise InputError(f"{where}: unknown option {word!r} after the key's hash.",
                             "options are priority=interactive|batch and daily_images=N "
                             "(`sd35 keys set NAME …` writes them).", param="api_keys_file")
        fields[m.group(1)] = m.group(2)
    try:
        daily = int(fields["daily_images"]) if "daily_images" in fields else None
        policy = Policy(check_priority(fields.get("priority", "interactive")), check_daily(daily))
    except (ValueError, InputError) as exc:
        raise InputError(f"{where}: {getattr(exc, 'cause', exc)}", "priority=interactive|batch, daily_images=N "
                         "(N >= 0).", param="api_keys_file") from None
    return (words[0] if words else ""), policy


def set_policy(path: Path, name: str, *, priority: str | None = None, daily_images: int | None = None,
               clear_daily: bool = False) -> Policy:
    """Rewrite NAME's options in the keys file (atomically, keeping its mode and group)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o026:
        raise InputError(f"{path} (mode {mode:04o}) can be read or written by other accounts.",
                         f"chmod 0640 {path} (owner root, group = the service's group), then run this again.",
                         param="api_keys_file")
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped.split(":", 1)[0] == name:
            credential, old = split(stripped, f"{path}:{i + 1}")
            policy = Policy(check_priority(priority) if priority else old.priority,
                            None if clear_daily else (check_daily(daily_images) if daily_images is not None
                                                      else old.daily_images))
            lines[i] = credential + policy.options()
            break
    else:
        raise InputError(f"{path} has no key named {name!r}.", f"`sd35 keys add {name}` creates it.", param="name")
    st = path.stat()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".api-keys.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, st.st_mode & 0o777)
        try:
            os.chown(tmp, st.st_uid, st.st_gid)
        except PermissionError:
            pass  # not root: the file stays ours, with our group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return policy


# --- the usage ledger --------------------------------------------------------------------------------------

def state_dir(settings) -> Path:
    """SD35_STATE_DIR, else $XDG_STATE_HOME/sd35, else ~/.local/state/sd35."""
    if settings.state_dir:
        return Path(settings.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sd35"


def today(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d")


def reset_at(now: dt.datetime | None = None) -> dt.datetime:
    """When today's quotas reset: the next 00:00 UTC."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


class Ledger:
    """Images and GPU-seconds per key per UTC day, in `directory/usage.json`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / "usage.json"
        self._lock = threading.Lock()
        self._cache: tuple[float, dict] | None = None  # (mtime, data)

    def check(self) -> None:
        """Refuse to start where usage could not be kept (quotas would silently reset)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            writable = False
            reason = exc.strerror
        else:
            writable, reason = os.access(self.directory, os.W_OK | os.X_OK), "not writable by this account"
        if not writable:
            raise InputError(f"cannot keep per-key usage in {self.directory} ({reason}): quotas would reset.",
                             "set SD35_STATE_DIR to a folder this account can write (the unit uses /var/lib/sd35, "
                             "its StateDirectory).", param="state_dir")

    def read(self) -> dict:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cache is not None and self._cache[0] == mtime:
            return self._cache[1]
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        self._cache = (mtime, data)
        return data

    def record(self, key: str, images: int, gpu_seconds: float, day: str | None = None) -> None:
        """Add one job's usage (read-modify-write under an flock shared by every instance)."""
        day = day or today()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        with self._lock, open(self.directory / "usage.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._cache = None
            data = self.read()
            entry = data.setdefault(day, {}).setdefault(key, {"images": 0, "gpu_seconds": 0.0})
            entry["images"] += int(images)
            entry["gpu_seconds"] = round(entry["gpu_seconds"] + float(gpu_seconds), 3)
            for old in sorted(data)[:-KEEP_DAYS]:
                del data[old]
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".usage.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o640)
            os.replace(tmp, self.path)

    def images_today(self, key: str) -> int:
        return int(self.read().get(today(), {}).get(key, {}).get("images", 0))

    def summary(self, days: int = 7, now: dt.datetime | None = None) -> dict[str, dict]:
        """{key: {"today": {images, gpu_seconds}, "7d": {…}}} over the last `days` UTC days."""
        now = now or dt.datetime.now(dt.timezone.utc)
        wanted = {today(now - dt.timedelta(days=i)) for i in range(days)}
        out: dict[str, dict] = {}
        for day, keys in self.read().items():
            if day not in wanted:
                continue
            for key, use in keys.items():
                row = out.setdefault(key, {"today": {"images": 0, "gpu_seconds": 0.0},
                                           f"{days}d": {"images": 0, "gpu_seconds": 0.0}})
                spans = [f"{days}d"] + (["today"] if day == today(now) else [])
                for span in spans:
                    row[span]["images"] += use.get("images", 0)
                    row[span]["gpu_seconds"] = round(row[span]["gpu_seconds"] + use.get("gpu_seconds", 0.0), 3)
        return dict(sorted(out.items()))
