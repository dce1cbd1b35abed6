"""Doctor checks of storage: the Hub cache's permissions and the free disk under it.

Why together: both look at where weights live; a shared cache must stay group-writable with setgid dirs
(`sd35.ops.cache`), and the disk must hold the model's published (bf16) checkpoint. The embedded tiny model
is the exception: a few MB, built in SD35_CACHE_DIR, never downloaded into HF_HUB_CACHE.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context


def check_hub_cache(ctx: Context) -> Check:
    from sd35.ops.cache import inspect_permissions

    cache = Path(ctx.settings.hf_hub_cache).expanduser()
    if not cache.exists():
        parent = next((p for p in cache.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK):
            return Check("hub cache", FAIL, f"HF_HUB_CACHE={cache} does not exist and {parent} is not writable",
                         "create it (`sd35 cache init PATH --group GROUP` for a shared one) or point HF_HUB_CACHE elsewhere")
        return Check("hub cache", OK, f"HF_HUB_CACHE={cache} (created on first download)")
    if not os.access(cache, os.W_OK | os.X_OK):
        return Check("hub cache", FAIL, f"HF_HUB_CACHE={cache} is not writable by this user",
                     "ask the cache's owner to add you to its group, or use a cache of your own")
    report = inspect_permissions(cache)
    if not report.shared:
        return Check("hub cache", OK, f"HF_HUB_CACHE={cache} (private to this user)")
    if report.ok:
        return Check("hub cache", OK, f"HF_HUB_CACHE={cache} shared with group {report.group}, setgid, group-writable")
    bad = report.paths()
    shown = ", ".join(str(p.relative_to(cache)) for p in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    what = []
    if report.not_group_readable:
        what.append(f"{len(report.not_group_readable)} unreadable by the group")
    if report.not_group_writable:
        what.append(f"{len(report.not_group_writable)} not group-writable")
    if report.dirs_without_setgid:
        what.append(f"{len(report.dirs_without_setgid)} dirs without setgid")
    if report.other_group:
        what.append(f"{len(report.other_group)} owned by another group")
    return Check("hub cache", FAIL, f"shared cache {cache} (group {report.group}): {'; '.join(what)}: {shown} — "
                 "other users will hit PermissionError on blobs/ and .locks/", report.fix())


def check_compile_cache(ctx: Context) -> Check:
    """The compiled-kernel cache must be writable by this account alone: inductor imports code from it."""
    from sd35.inference import compilation

    if ctx.settings is None:
        return Check("compile cache", SKIP, "settings invalid (see above)")
    root = compilation.cache_root(ctx.settings)
    problem = compilation.cache_problem(root)
    if problem is not None:
        return Check("compile cache", FAIL, f"{root}: {problem}: whoever can write there runs code as the service "
                     "once it compiles (SD35_COMPILE=auto on a GPU)", "point SD35_COMPILE_CACHE at a folder only this "
                     f"account can write (the unit's CacheDirectory=, docs/hosting.md), or, if {root} is its own, "
                     "chmod 0700 it")
    parent = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK | os.X_OK):
        return Check("compile cache", FAIL, f"{root} cannot be created: {parent} is not writable by this account",
                     "point SD35_COMPILE_CACHE at a folder this account can write (mode 0700)")
    return Check("compile cache", OK, f"{root} (this account's alone"
                 f"{'' if root.exists() else ', created 0700 at the first compile'})")


TINY_DISK_BYTES = 50e6  # the tiny build is ~3 MB; room for it and a rebuild beside it


def _free_under(folder: Path) -> tuple[Path, int]:
    probe = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
    return probe, shutil.disk_usage(probe).free


def check_disk(ctx: Context) -> Check:
    from sd35.weights import sizing
    from sd35.hardware import detect
    from sd35.precision import resolve

    gb = 1e9
    if ctx.known is not None and ctx.known.repo_id is None:  # the embedded tiny model: built locally
        probe, free = _free_under(Path(ctx.settings.cache_dir).expanduser())
        if free < TINY_DISK_BYTES:
            return Check("disk", FAIL, f"the tiny model is built in SD35_CACHE_DIR and needs a few MB; "
                         f"{free / 1e6:.0f} MB free under {probe}", "free some space or set SD35_CACHE_DIR elsewhere")
        return Check("disk", OK, f"{free / gb:.0f} GB free under {probe}; the tiny model (built in SD35_CACHE_DIR, "
                     "not downloaded) needs a few MB")
    cache = Path(ctx.settings.hf_hub_cache).expanduser()
    probe, free = _free_under(cache)
    if ctx.known is None or ctx.model_folder() is not None:
        return Check("disk", OK if free > 5 * gb else WARN, f"{free / gb:.0f} GB free under {probe}",
                     None if free > 5 * gb else "free some space under HF_HUB_CACHE")
    # On disk the published checkpoints are bf16: size them with the bf16 plan.
    arch = ctx.known.transformer
    t5 = "off" if ctx.settings.t5 == "off" else "bf16"
    size = sizing.pipeline_bytes(arch, resolve("bf16", t5, detect("cpu")))["total"]
    if free < size + gb:
        return Check("disk", FAIL, f"{ctx.model} needs ≈ {size / gb:.0f} GB, {free / gb:.0f} GB free under {probe}",
                     "free space or point HF_HUB_CACHE at a larger disk (`sd35 cache init`)")
    return Check("disk", OK, f"{free / gb:.0f} GB free under {probe}; {ctx.model} needs ≈ {size / gb:.0f} GB")
