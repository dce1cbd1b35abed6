"""Which LoRA a name means: `PATH_OR_NAME[:SCALE]` specs, the service's folder (SD35_LORA_DIR), its listing.

Why a module of its own: a LoRA name in an API request is a file name chosen by a stranger. It must only
ever open a file *in* SD35_LORA_DIR — never `../x`, an absolute path or a symlink that leads out — and
the CLI's `--lora` may also take a path. Both rules, and the one spec syntax shared by `--lora`,
SD35_LORAS and the request's `lora` field, live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sd35.weights.lora_files import LoraError, header, sha256

SUFFIXES = (".safetensors", ".sft")
MAX_SCALE = 10.0


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA picked for a run or a request: a name in SD35_LORA_DIR (or, from the CLI, a path) and its
    strength (1.0: as trained; 0: no effect)."""

    name: str
    scale: float = 1.0


def check_scale(scale, name: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or abs(scale) > MAX_SCALE:
        raise LoraError(f"LoRA {name}: scale {scale!r} must be a finite number from {-MAX_SCALE:g} to {MAX_SCALE:g}.",
                        "pass NAME:SCALE with SCALE like 0.8 (1.0: as trained).")
    return float(scale)


def parse_spec(spec: str) -> LoraChoice:
    """`PATH_OR_NAME[:SCALE]` → LoraChoice (a trailing `:number` is the scale, else part of the name)."""
    spec = spec.strip()
    name, sep, tail = spec.rpartition(":")
    if sep and name:
        try:
            return LoraChoice(name, check_scale(float(tail), name))
        except ValueError:
            pass
    if not spec:
        raise LoraError("an empty LoRA spec.", "pass --lora PATH_OR_NAME[:SCALE], e.g. --lora style.safetensors:0.8.")
    return LoraChoice(spec, 1.0)


def parse_specs(value: str | list[str] | None) -> list[LoraChoice]:
    """SD35_LORAS (comma-separated) or repeated --lora flags → choices, in order."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    return [parse_spec(p) for p in items if p.strip()]


def in_folder(folder: Path | None, name: str) -> Path:
    """The file `name` names inside `folder`, or LoraError: only plain file names (with or without the
    .safetensors suffix), and the real path (symlinks followed) must stay inside the folder."""
    if folder is None:
        raise LoraError(f"LoRA {name!r} was asked for, but this service has no LoRA folder.",
                        "set SD35_LORA_DIR to a folder of .safetensors LoRAs (GET /v1/loras lists them).")
    bad = (not isinstance(name, str) or not name or name.startswith((".", "~")) or "/" in name or "\\" in name
           or "\x00" in name or Path(name).is_absolute() or ".." in name)
    if bad:
        raise LoraError(f"LoRA name {name!r} is not a file name in the LoRA folder (no paths, '..' or hidden files).",
                        "pass a name GET /v1/loras lists.")
    root = Path(folder).expanduser().resolve()
    candidates = [root / name] + [root / (name + s) for s in SUFFIXES if not name.endswith(s)]
    for path in candidates:
        if path.is_file():
            real = path.resolve()
            if not real.is_relative_to(root):
                raise LoraError(f"LoRA name {name!r} leads out of the LoRA folder (a symlink to {real.parent}).",
                                "pass a name GET /v1/loras lists; links out of SD35_LORA_DIR are not followed.")
            return real
    raise LoraError(f"no LoRA named {name!r} in the LoRA folder.", "pass a name GET /v1/loras lists.")


def resolve(choice: LoraChoice, folder: Path | None, *, allow_paths: bool) -> Path:
    """A CLI/settings choice (`allow_paths`: an existing path wins, else a name in the folder) or a
    request's (a name in the folder only)."""
    if allow_paths:
        path = Path(choice.name).expanduser()
        if path.is_file() or folder is None or any(c in choice.name for c in "/\\"):
            header(path)  # a missing or unreadable file is refused here, with its path
            return path.resolve()
    return in_folder(folder, choice.name)


def folder_files(folder: Path | None) -> list[Path]:
    """The LoRA files directly in `folder` whose real path is inside it (symlinks out are not offered)."""
    if folder is None:
        return []
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise LoraError(f"SD35_LORA_DIR {folder} is not a folder.", "create it, or correct SD35_LORA_DIR.")
    return sorted(p for p in root.iterdir() if p.suffix in SUFFIXES and p.is_file()
                  and not p.name.startswith(".") and p.resolve().is_relative_to(root))


def describe(path: Path) -> dict:
    """What GET /v1/loras says of one file, from its header: name, rank, layer count, size, sha256."""
    from sd35.weights.lora_files import _split

    shapes, _ = header(path)
    downs = [s for k, s in shapes.items() if (_split(k) or ("", ""))[1] == "down"]
    return {"name": path.stem, "rank": max((s[0] for s in downs if s), default=0), "layers": len(downs),
            "size": path.stat().st_size, "sha256": sha256(path)}
