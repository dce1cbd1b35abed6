"""The Hugging Face cache on a multi-user server: inspect it, share it, verify it.

Why: on a shared GPU box everyone downloading SD3.5 Large (16 GB + a 9.8 GB T5) into their own home
fills the disk, and a shared cache with the wrong permissions locks people out (`PermissionError` on
`.locks/` and `blobs/` that another user created). A shared `HF_HUB_CACHE` works when its directories
are group-owned, group-writable and setgid (new files inherit the group), and every user's umask is
0002 (systemd units set `UMask=0002`). Only `HF_HUB_CACHE` is shared: `HF_HOME` (the token) stays per
user.

Permission checks read mode bits, not `os.access`: a check run as root must still see what a normal
member of the group will hit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path



@dataclass
class PermissionReport:
    cache: Path
    shared: bool  # the root is setgid or group-writable: meant for a group
    group: str | None
    not_group_writable: list[Path] = field(default_factory=list)  # files and dirs members cannot write
    dirs_without_setgid: list[Path] = field(default_factory=list)  # new files there get the creator's group
    other_group: list[Path] = field(default_factory=list)  # owned by another group than the root's

    @property
    def ok(self) -> bool:
        return not (self.not_group_writable or self.dirs_without_setgid or self.other_group)

    def fix(self) -> str:
        g = self.group or "GROUP"
        c = self.cache
        return (f"sudo chgrp -R {g} {c} && sudo chmod -R g+rwX {c} && "
                f"sudo find {c} -type d -exec chmod g+s {{}} + ; and give every user `umask 0002` "
                "(systemd: UMask=0002)")


def _group_name(gid: int) -> str | None:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (KeyError, ImportError):
        return str(gid)


def is_shared(cache: Path) -> bool:
    st = cache.stat()
    return bool(st.st_mode & (stat.S_ISGID | stat.S_IWGRP))


def inspect_permissions(cache: Path, limit: int = 1000) -> PermissionReport:
    """Walk the cache (blobs, .locks, refs, snapshots) and list what a group member could not write."""
    cache = Path(cache)
    root = cache.stat()
    report = PermissionReport(cache, is_shared(cache), _group_name(root.st_gid))
    if not report.shared:
        return report
    for dirpath, dirnames, filenames in os.walk(cache):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):  # snapshot entries are links into blobs/
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            need = stat.S_IRGRP | stat.S_IWGRP | (stat.S_IXGRP if is_dir else 0)
            if st.st_mode & need != need:
                report.not_group_writable.append(p)
            if is_dir and not st.st_mode & stat.S_ISGID:
                report.dirs_without_setgid.append(p)
            if st.st_gid != root.st_gid:
                report.other_group.append(p)
            if len(report.not_group_writable) + len(report.dirs_without_setgid) >= limit:
                return report
    return report


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (branch, tag or commit), if cached."""
    folder = repo_folder(cache, repo_id)
    rev = revision or "main"
    ref = folder / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snap = folder / "snapshots" / commit
    return snap if snap.is_dir() else None
