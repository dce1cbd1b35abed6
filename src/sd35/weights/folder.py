"""Is a local folder a pipeline we can load: readable by this user, real weights (not Git LFS pointer
stubs), every component model_index.json lists present. Why apart from hub.py: these checks answer for any
folder — a git clone, the Hub cache's snapshot, a pre-quantized store — and `cache verify`, doctor and the
single-file reader ask them too, each time with a cause and a fix instead of diffusers' FileNotFoundError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sd35.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


def check_readable(folder: Path) -> None:
    """Refuse a folder with files this user cannot read, naming the file: diffusers turns permission
    denied into `FileNotFoundError …/model.safetensors`, which sends people looking for a missing file
    (a teammate loading a store in the shared cache whose files kept the private source's 0600 mode)."""
    denied: list[Path] = []

    def onerror(exc: OSError) -> None:
        denied.append(Path(exc.filename))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror):
        for name in filenames:
            f = Path(dirpath) / name
            if f.exists() and not os.access(f, os.R_OK):
                denied.append(f)
        if len(denied) > 3:
            break
    if denied:
        shown = ", ".join(str(d) for d in denied[:3]) + (" …" if len(denied) > 3 else "")
        raise ModelError(
            f"permission denied reading {shown}{_who(denied[0])}.",
            "ask the owner to make the folder group-readable (in the shared cache: `sd35 cache verify` shows the "
            "command); a pre-quantized store made by an older sd35 must be re-made: delete it, then "
            "`sd35 cache quantize --model SOURCE` (hard-linked private files are copied now).",
        )


def _who(f: Path) -> str:
    """` (owner alice, mode 600)`, or nothing when even that cannot be read."""
    try:
        import pwd

        st = f.stat()
        return f" (owner {pwd.getpwuid(st.st_uid).pw_name}, mode {st.st_mode & 0o777:o})"
    except (KeyError, ImportError, OSError):
        return ""


def is_lfs_pointer(f: Path) -> bool:
    """A weight file that is a Git LFS pointer (~130 bytes of text) instead of weights."""
    if f.suffix not in WEIGHT_SUFFIXES or not f.is_file() or f.stat().st_size >= 1024:
        return False
    with open(f, "rb") as fh:
        return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def find_lfs_pointers(folder: Path) -> list[Path]:
    """Weight files that are Git LFS pointer stubs (a `git clone` made without git-lfs)."""
    return [f for f in sorted(folder.rglob("*")) if is_lfs_pointer(f)]


def check_complete(folder: Path, *, with_t5: bool = True) -> None:
    """Refuse folders whose weights are LFS pointers or whose components are missing."""
    stubs = find_lfs_pointers(folder)
    if stubs:
        shown = ", ".join(str(s.relative_to(folder)) for s in stubs[:3])
        more = f" and {len(stubs) - 3} more" if len(stubs) > 3 else ""
        raise ModelError(
            f"{len(stubs)} weight file(s) in {str(folder)!r} are Git LFS pointer stubs, not weights "
            f"({shown}{more}): the folder was cloned without Git LFS.",
            f"run `git lfs install && git -C {folder} lfs pull`, or load the repo id through the "
            "Hugging Face cache instead of a git clone.",
        )
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / 'model_index.json'}: {exc}.", "re-download the model.") from None
    missing = [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
        and not (folder / name).is_dir()
        and (with_t5 or name not in ("text_encoder_3", "tokenizer_3"))
    ]
    if missing:
        raise ModelError(
            f"{str(folder)!r} lists component(s) {', '.join(missing)} in model_index.json but has no such folder.",
            "re-download the model (`sd35 cache prefetch MODEL`) or copy the missing folders.",
        )
