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

from sd35.weights.hub import repo_folder  # the cache layout (models--org--name/…) lives in hub
from sd35.weights import safetensors_header


@dataclass
class PermissionReport:
    cache: Path
    shared: bool  # the root is setgid or group-writable: meant for a group
    group: str | None
    not_group_readable: list[Path] = field(default_factory=list)  # members get "permission denied" reading
    not_group_writable: list[Path] = field(default_factory=list)  # readable, but members cannot write
    dirs_without_setgid: list[Path] = field(default_factory=list)  # new files there get the creator's group
    other_group: list[Path] = field(default_factory=list)  # owned by another group than the root's
    hard_linked: set[Path] = field(default_factory=set)  # files sharing their inode (and mode) with another

    @property
    def ok(self) -> bool:
        return not self.paths()

    def paths(self) -> list[Path]:
        """Every path with a problem, once, in the order found."""
        lists = (self.not_group_readable, self.not_group_writable, self.dirs_without_setgid, self.other_group)
        return list(dict.fromkeys(p for lst in lists for p in lst))

    def reasons(self, p: Path) -> list[str]:
        out = []
        if p in self.not_group_readable:
            out.append("unreadable by the group (members get permission denied)")
        if p in self.not_group_writable:
            out.append("the group cannot write it (members will get PermissionError)")
        if p in self.dirs_without_setgid:
            out.append("no setgid (new files there get their creator's group)")
        if p in self.other_group:
            out.append(f"owned by another group than {self.group}")
        return out

    def fix(self) -> str:
        """The repair for the whole cache. Hard-linked files are left out: chgrp/chmod on one would change
        the file it shares its inode with (a pre-quantized store's link to someone's private model)."""
        g = self.group or "GROUP"
        c = self.cache
        return (f"sudo find {c} \\( -type d -o -type f -links 1 \\) "
                f"-exec chgrp {g} {{}} + -exec chmod g+rwX {{}} + && "
                f"sudo find {c} -type d -exec chmod g+s {{}} + ; and give every user `umask 0002` "
                "(systemd: UMask=0002)")

    def fix_for(self, p: Path) -> str:
        if p not in self.hard_linked:
            return self.fix()
        g = self.group or "GROUP"
        return (f"it is hard-linked: it shares its inode and mode with another file (perhaps a private source), "
                f"so do not chmod it; give the cache a copy of its own: `sudo cp {p} {p}.copy && sudo mv {p}.copy {p} "
                f"&& sudo chgrp {g} {p} && sudo chmod 664 {p}` (a pre-quantized store: delete it and re-run "
                "`sd35 cache quantize`, which copies such files)")


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
            read = stat.S_IRGRP | (stat.S_IXGRP if is_dir else 0)
            if st.st_mode & read != read:
                report.not_group_readable.append(p)
            elif not st.st_mode & stat.S_IWGRP:
                report.not_group_writable.append(p)
            if not is_dir and st.st_nlink > 1:
                report.hard_linked.add(p)
            if is_dir and not st.st_mode & stat.S_ISGID:
                report.dirs_without_setgid.append(p)
            if st.st_gid != root.st_gid:
                report.other_group.append(p)
            found = report.not_group_readable + report.not_group_writable + report.dirs_without_setgid
            if len(found) >= limit:
                return report
    return report


# --- sd35 cache init -------------------------------------------------------------------------------------

@dataclass
class InitResult:
    path: Path
    group: str | None
    acl: str  # what happened with default ACLs
    env_lines: list[str]


def init(path: Path, group: str | None = None) -> InitResult:
    """Create (or repair) a shared cache folder: group-owned, 2775, default ACLs where available."""
    import grp
    import shutil
    import subprocess

    from sd35.errors import InputError, Sd35Error

    path = Path(path).expanduser().resolve()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise InputError(f"group {group!r} does not exist.",
                             f"create it and add the team: `sudo groupadd {group} && sudo usermod -aG {group} USER`.") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, 0o2775)
    except PermissionError as exc:
        raise Sd35Error(f"cannot set up {path}: {exc.strerror}.",
                        f"run it with sudo, or ask the folder's owner: `sudo sd35 cache init {path}"
                        + (f" --group {group}`" if group else "`") + ".") from None
    group_name = _group_name(path.stat().st_gid)
    acl = "setfacl not found: default ACLs not set (every user needs `umask 0002`)"
    if shutil.which("setfacl"):
        spec = "d:u::rwx,d:g::rwx,d:o::rx,d:m::rwx" + (f",d:g:{group}:rwx" if group else "")
        r = subprocess.run(["setfacl", "-m", spec, str(path)], capture_output=True, text=True)
        acl = ("default ACLs set: new files are group-writable whatever a user's umask"
               if r.returncode == 0 else f"default ACLs not set ({r.stderr.strip() or 'unsupported filesystem'}); "
               "every user needs `umask 0002`")
    env_lines = [f"HF_HUB_CACHE={path}"]
    return InitResult(path, group_name, acl, env_lines)


# --- sd35 cache verify ------------------------------------------------------------------------------------

@dataclass
class Problem:
    kind: str  # lfs-stub | missing-blob | truncated | incomplete-download | unreadable | permissions
    path: Path
    detail: str
    fix: str


def _repos(cache: Path, model: str | None) -> list[Path]:
    if model:
        from sd35.models import expand_alias

        folder = repo_folder(cache, expand_alias(model))
        return [folder] if folder.is_dir() else []
    return sorted(p for p in cache.glob("models--*") if p.is_dir())


def verify(cache: Path, model: str | None = None) -> list[Problem]:
    """Everything in the cache (or one model's part of it) that would break a load or lock a user out."""
    from sd35.weights.folder import WEIGHT_SUFFIXES, is_lfs_pointer

    cache = Path(cache).expanduser()
    problems: list[Problem] = []
    refetch = "re-download: `sd35 cache prefetch {repo}` (delete the broken file first)"
    for repo_dir in _repos(cache, model):
        repo = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
        for blob in sorted((repo_dir / "blobs").glob("*.incomplete")):
            problems.append(Problem("incomplete-download", blob, "an interrupted download left a partial blob",
                                    f"`sd35 cache prefetch {repo}` resumes it"))
        for f in sorted((repo_dir / "snapshots").rglob("*")):
            if f.is_symlink() and not f.exists():
                problems.append(Problem("missing-blob", f, "the snapshot links to a blob that is gone",
                                        refetch.format(repo=repo)))
                continue
            if not f.is_file() or f.suffix not in WEIGHT_SUFFIXES:
                continue
            if is_lfs_pointer(f):
                problems.append(Problem("lfs-stub", f, "a Git LFS pointer file, not weights", refetch.format(repo=repo)))
                continue
            if f.suffix == ".safetensors":
                why = safetensors_header.truncated(f)
                if why:
                    problems.append(Problem("truncated", f, why, refetch.format(repo=repo)))
    if cache.is_dir() and is_shared(cache):
        report = inspect_permissions(cache)
        for p in report.paths()[:50]:  # each path once, with all its reasons
            kind = "unreadable" if p in report.not_group_readable else "permissions"
            problems.append(Problem(kind, p, "; ".join(report.reasons(p)), report.fix_for(p)))
    return problems


def verify_quantized(settings, name: str | None = None) -> list[Problem]:
    """The same checks for the pre-quantized store (weights/store.py): records, LFS stubs, truncated files."""
    from sd35.weights.folder import is_lfs_pointer
    from sd35.weights.store import listing, read_record, store_dir

    problems: list[Problem] = []
    fix = "re-create it: delete the folder, then `sd35 cache quantize --model SOURCE --precision MODE`"
    for row in listing(settings):
        if name and row["name"] != name:
            continue
        folder = Path(row["path"])
        try:
            read_record(folder)
        except Exception as exc:  # noqa: BLE001 - ModelError with the cause
            problems.append(Problem("record", folder, getattr(exc, "cause", str(exc)), fix))
        for f in sorted(folder.rglob("*.safetensors")):
            if is_lfs_pointer(f):
                problems.append(Problem("lfs-stub", f, "a Git LFS pointer file, not weights", fix))
            elif why := safetensors_header.truncated(f):
                problems.append(Problem("truncated", f, why, fix))
    for partial in sorted(store_dir(settings).glob(".*.partial-*")) if store_dir(settings).is_dir() else []:
        problems.append(Problem("incomplete-download", partial, "an interrupted `sd35 cache quantize` left it",
                                f"delete it: `rm -rf {partial}`"))
    return problems


# --- sd35 cache ls -----------------------------------------------------------------------------------------

def listing(cache: Path) -> list[dict]:
    """Models in the cache with their revisions (refs → commit) and sizes on disk."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(Path(cache).expanduser())
    except CacheNotFound:
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            rows.append({"repo_id": repo.repo_id, "type": repo.repo_type, "commit": rev.commit_hash,
                         "refs": sorted(rev.refs), "files": rev.nb_files, "size_on_disk": rev.size_on_disk,
                         "path": str(rev.snapshot_path)})
    return rows
