"""The pre-quantized store (`sd35 cache quantize`): writing a folder, its record, finding and listing them.

Why: loading a bf16 checkpoint and quantizing it at every start, in every service process, costs time and
host RAM (≈ 28 GB for SD3.5 Large with T5 staged in bf16). The store is a diffusers-layout folder whose
transformer (and T5) holds FP8 data + scales on disk (fp8io.py), plus `sd35_quant.json` recording how it
was made (source repo + commit, precision, the layers kept in bf16, library versions). It lives in the
shared cache, inside `HF_HUB_CACHE` (`<HF_HUB_CACHE>/sd35-quantized/<alias>-<precision>`, or
`SD35_QUANTIZED_DIR`), so one person quantizes and the team loads it by name (`--model medium-fp8-weight`)
or by path. The other components (CLIP encoders, VAE, tokenizers, scheduler) are hard-linked from the
source when it already has the owner group and mode the store gives its files, else copied: a hard link
shares the inode, so it keeps the source's owner and mode (the tiny model's files are 0600) and a chmod
on it would change the private source too.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sd35 import precision
from sd35.errors import InputError, ModelError
from sd35.models import QUANT_RECORD as RECORD
from sd35.models import lookup
from sd35.settings import Settings
from sd35.weights import lean
from sd35.weights.fp8io import QUANT_MODES, store_t5, store_transformer

log = logging.getLogger(__name__)

FORMAT = "sd35-quantized/2"  # 2: the position table is stored (a stock diffusers load reproduces the image)


# --- the record ------------------------------------------------------------------------------------------------

def read_record(folder: Path | None) -> dict | None:
    """`sd35_quant.json` of a pre-quantized folder, or None for any other folder."""
    if folder is None:
        return None
    f = Path(folder) / RECORD
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{f} is not readable JSON ({exc}).",
                         "re-create the folder with `sd35 cache quantize`.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelError(f"{f} has format {record.get('format') if isinstance(record, dict) else '?'!r}; this "
                         f"sd35 reads {FORMAT!r}.", "re-create the folder with this version's `sd35 cache quantize`.")
    return record


def versions() -> dict[str, str]:
    """The library versions a folder was made with (recorded: a later torchao may read the format differently)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchao", "diffusers", "transformers", "safetensors", "sd35"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            from sd35 import __version__

            out[pkg] = __version__ if pkg == "sd35" else "?"
    return out


def check_plan(record: dict, plan: precision.PrecisionPlan, folder: Path) -> None:
    """A pre-quantized folder holds FP8 weights: a bf16 request for them cannot be honoured from it."""
    src = record.get("source", {}).get("alias") or record.get("source", {}).get("repo_id") or "the source model"
    if plan.transformer == "bf16":
        raise ModelError(f"{folder} holds a pre-quantized FP8 transformer ({record.get('precision')}); bf16 was "
                         "requested.", f"load the source model for bf16 (--model {src}), or use --precision "
                         "fp8-weight, fp8 or auto with this folder.")
    if plan.t5 == "bf16" and record.get("t5") in QUANT_MODES:
        raise ModelError(f"{folder} stores T5 in FP8; --t5 bf16 was requested.",
                         f"use --t5 auto or fp8-weight with this folder, or load {src} for a bf16 T5.")


# --- the store ---------------------------------------------------------------------------------------------------

def store_dir(settings: Settings) -> Path:
    """Where pre-quantized folders live: SD35_QUANTIZED_DIR, else `sd35-quantized` inside HF_HUB_CACHE.

    Inside, not beside: on a shared server HF_HUB_CACHE is the group-owned setgid folder `sd35 cache init`
    made (docs/hosting.md), so the store inherits its group and ACLs, and `cache verify` checks its
    permissions with the rest. huggingface_hub skips a folder not named `models--…` when it scans."""
    if settings.quantized_dir is not None:
        return Path(settings.quantized_dir).expanduser()
    return Path(settings.hf_hub_cache).expanduser() / "sd35-quantized"


def default_name(model: str, mode: str) -> str:
    """`medium-fp8-weight`, `large-turbo-fp8`, `tiny-fp8-weight`, `<folder>-fp8-weight`, `<repo name>-fp8`."""
    spec = lookup(model)
    base = spec.alias if spec else Path(model.rstrip("/")).name or "model"
    return f"{base}-{mode}"


def find(name: str, settings: Settings) -> Path | None:
    """A pre-quantized folder in the store called `name` (what `--model NAME` resolves to)."""
    if not name or "/" in name or name.startswith("."):
        return None
    folder = store_dir(settings) / name
    return folder if (folder / RECORD).is_file() and (folder / "model_index.json").is_file() else None


def listing(settings: Settings) -> list[dict]:
    """Pre-quantized folders in the store, with their records and sizes."""
    root = store_dir(settings)
    rows = []
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if not (folder / RECORD).is_file():
            continue
        try:
            record = read_record(folder) or {}
        except ModelError as exc:
            record = {"error": exc.cause}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({"name": folder.name, "path": str(folder), "precision": record.get("precision"),
                     "t5": record.get("t5"), "source": record.get("source", {}), "size_on_disk": size,
                     **({"error": record["error"]} if "error" in record else {})})
    return rows


def _link_or_copy(src: Path, dst: Path, mode: int, gid: int | None) -> None:
    """Hard-link a file (the Hub cache's blob, shared, no extra disk) when the link already has the mode
    (and, in a group store, the group) the store gives its files; else copy it, so `_share` can set the
    copy's mode without touching the source's inode."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    st = real.stat()
    if st.st_mode & 0o7777 == mode and (gid is None or st.st_gid == gid):
        try:
            os.link(real, dst)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(real, dst)


def quantize(settings: Settings, source, mode: str, t5: str = "auto", out: Path | None = None) -> Path:
    """Write a pre-quantized copy of `settings.model` and return its folder.

    1. Check the request (mode, T5, output folder free) before reading a weight.
    2. The source: `source` is `hub.resolve(settings)`'s ModelSource (tiny | local folder | Hub cache),
       resolved by the caller once `check_request` passed.
    3. Link/copy the components stored as they are (tokenizers, scheduler, CLIP encoders, VAE).
    4. Load the transformer (and T5) lean — FP8 as the shards are read — and save them with their
       quantization_config (torchao tensors flattened into safetensors).
    5. Write the record, then move the folder into place in one rename: a half-written store is never
       found under its name.
    """
    # 1. The request (also checked by `check_request` before the source is resolved).
    target = check_request(settings, mode, t5, out)
    t5_mode = {"auto": "fp8-weight"}.get(t5, t5)

    # 2. The source.
    if read_record(source.path):
        raise InputError(f"{source.path} is already pre-quantized.", "quantize the bf16 source model instead.")
    need = sum(f.stat().st_size for f in (source.path / "transformer").rglob("*.safetensors"))
    need += sum(f.stat().st_size for f in (source.path / "text_encoder_3").rglob("*.safetensors"))
    _make_store_dir(target.parent)
    free = shutil.disk_usage(target.parent).free
    if need // 2 + (1 << 30) > free:
        raise ModelError(f"not enough disk for the pre-quantized copy: ~{need / 2e9:.1f} GB needed, "
                         f"{free / 1e9:.1f} GB free under {target.parent}.",
                         "free space there, or pass --out on a larger disk (or set SD35_QUANTIZED_DIR).")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    group = _setgid(target.parent)
    fmode, _ = _modes(group)
    gid = target.parent.stat().st_gid if group else None
    try:
        # 3. Components stored as they are.
        for f in sorted(source.path.rglob("*")):
            rel = f.relative_to(source.path)
            if rel.parts[0] in ("transformer",) or (rel.parts[0] == "text_encoder_3" and t5_mode != "bf16"):
                continue
            if f.is_file():
                _link_or_copy(f, tmp / rel, fmode, gid)
        # 4. FP8 components, one at a time (peak host memory: one FP8 component plus a shard of bf16).
        transformer = lean.load_transformer(source.path, quantize=True)
        store_transformer(transformer, tmp)
        coverage = precision.linear_coverage(transformer)
        del transformer
        if t5_mode != "bf16":
            enc = lean.load_t5(source.path, quantize=True)
            store_t5(enc, tmp)
            del enc
        # 5. Record and publish.
        record = {
            "format": FORMAT,
            "precision": mode,
            "t5": t5_mode,
            "storage": {"weight_dtype": "float8_e4m3fn", "scale": "float32, one per output row (torchao "
                        "Float8Tensor, PerRow)", "serialization": "diffusers/transformers TorchAoConfig, "
                        "safetensors (torchao flattened tensors: <module>._weight_qdata, <module>._weight_scale)"},
            "source": {"requested": settings.model, "alias": _alias(settings.model), "kind": source.kind,
                       "repo_id": source.repo_id, "revision": source.revision, "commit": source.commit,
                       "path": str(source.path)},
            "kept_bf16": {"transformer": precision.KEEP_BF16, "t5": precision.T5_KEEP_BF16},
            "transformer_linear_params": coverage,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_by": _user(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _share(tmp, group=group)
        if target.is_dir():
            target.rmdir()  # an empty folder named by --out
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pre-quantized %s (%s) into %s in %.1f s", settings.model, mode, target, time.perf_counter() - started)
    return target


def check_request(settings: Settings, mode: str, t5: str = "auto", out: Path | None = None) -> Path:
    """Refuse a bad `sd35 cache quantize` before anything is read; return the output folder."""
    import torch

    if mode not in QUANT_MODES:
        raise InputError(f"--precision {mode!r} cannot be stored pre-quantized.",
                         f"use --precision {' or '.join(QUANT_MODES)} (bf16 is the source itself).", param="precision")
    if t5 not in ("auto", "fp8-weight", "bf16"):
        raise InputError(f"--t5 {t5!r} is not storable.", "use --t5 auto (FP8), fp8-weight or bf16.", param="t5")
    if not hasattr(torch, "float8_e4m3fn"):
        raise ModelError(f"this torch build ({torch.__version__}) has no float8_e4m3fn dtype.",
                         "install the pinned torch (`make setup`).")
    target = Path(out).expanduser() if out else store_dir(settings) / default_name(settings.model, mode)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} already exists.", "remove it first, or pass another --out.", param="out")
    return target


def _alias(model: str) -> str | None:
    spec = lookup(model)
    return spec.alias if spec else None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container
        return str(os.getuid())


def _modes(group: bool) -> tuple[int, int]:
    """(file mode, dir mode) of what the store writes: group-writable and setgid in a shared (setgid)
    store, else readable by all whatever the umask (save_pretrained writes safetensors as 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    if group:
        return 0o664, 0o2775
    return 0o666 & ~umask | 0o444, 0o777 & ~umask | 0o555


def _share(folder: Path, group: bool) -> None:
    """Give what the store owns its modes. Hard-linked files already have them (`_link_or_copy` links
    only then), and chmod on them would change the source that shares the inode."""
    fmode, dmode = _modes(group)
    for p in [folder, *folder.rglob("*")]:
        st = p.lstat()
        if p.is_dir():
            os.chmod(p, dmode)
        elif st.st_nlink == 1:
            os.chmod(p, fmode)


def _make_store_dir(folder: Path) -> None:
    """Create the store's folder; inside a shared (setgid) cache it is made group-writable and setgid like
    the cache (mkdir follows the creator's umask, often 022, and the next teammate could not add a store)."""
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if _setgid(folder.parent):
        os.chmod(folder, 0o2775)


def _setgid(folder: Path) -> bool:
    import stat

    try:
        return bool(folder.stat().st_mode & stat.S_ISGID)
    except OSError:
        return False

