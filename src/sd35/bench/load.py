"""`sd35 bench load`: one random-weight transformer loaded into fp8-weight on the CPU by each load path, each
in a fresh process: seconds, peak host RSS, bytes read from disk.

Why a process per path: peak RSS is a per-process high-water mark, and a path measured after another would
inherit its allocator's pages; files are evicted from the page cache before each path so every one reads
from disk as a fresh start does. The paths are rows of `LOAD_PATHS` (which folder it reads, how it loads),
so a new load path is one function and one row.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from sd35.bench.arch import build_transformer

# Issue #11's targets, pre-quantized vs today's path (bf16 from disk, then quantize).
LOAD_GOALS = {"disk_ratio_max": 0.52, "rss_peak_ratio_max": 0.6, "seconds_ratio_max": 0.5}
# Issue #30's targets, our pre-quantized load vs diffusers' own from_pretrained of the same files.
PEER_GOALS = {"seconds_ratio_max": 1.0, "rss_peak_ratio_max": 0.85}


def _bf16_quantize(folder: Path):
    """Today's path with SD35_LEAN_LOAD=0: diffusers' from_pretrained in bf16, then quantize."""
    import torch
    from diffusers import SD3Transformer2DModel

    from sd35 import precision

    model = SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16)
    precision.apply(model, "fp8-weight", device="cpu")
    return model


def _lean(folder: Path):
    """SD35_LEAN_LOAD=1: each shard quantized as it is read."""
    from sd35.weights import lean

    return lean.load_transformer(folder, quantize=True)


def _prequantized(folder: Path):
    """FP8 data + scales as `sd35 cache quantize` stores them, memory-mapped and rebuilt by torchao."""
    from sd35.weights import fp8io

    return fp8io.load_transformer(folder)


def _diffusers(folder: Path, **kw):
    """The peers (issue #30): diffusers' own loader on the same files."""
    import torch
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16,
                                                 use_safetensors=True, **kw)


def _diffusers_torchao(folder: Path):
    """diffusers quantizing the bf16 folder as it loads (TorchAoConfig, our KEEP_BF16 included)."""
    from sd35.weights.fp8io import transformer_config

    return _diffusers(folder, quantization_config=transformer_config())


def _diffusers_prequantized(folder: Path):
    """A stock `from_pretrained` of the pre-quantized folder."""
    return _diffusers(folder)


# path name -> (the folder it reads: "bf16" as published | "prequantized" as stored, its loader).
LOAD_PATHS = {
    "bf16-quantize": ("bf16", _bf16_quantize),
    "lean": ("bf16", _lean),
    "prequantized": ("prequantized", _prequantized),
    "diffusers-torchao": ("bf16", _diffusers_torchao),
    "diffusers-prequantized": ("prequantized", _diffusers_prequantized),
}
LOAD_MODES = tuple(LOAD_PATHS)


def _folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _evict(folder) -> None:
    """Drop `folder`'s files from the page cache (posix_fadvise, these files only), so each mode reads from
    disk as a fresh start does, not from pages the previous mode or the preparation left behind."""
    import os

    for f in Path(folder).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(f, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _vm_hwm() -> int | None:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a child started by a big parent would report the parent's size (measured: every mode showed the
    parent's 5.4 GB)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _touch(model) -> None:
    """Read one byte of every page of every tensor's storage, so a memory-mapped load (`prequantized`) has
    read its file by the time it is timed and its RSS measured, as the copying loaders have."""
    import torch

    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        for part in (t.qdata, t.scale) if hasattr(t, "qdata") else (t,):
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].sum()


def _vs_diffusers(rows: dict) -> dict:
    """Our pre-quantized load against diffusers' stock load of the same folder, with issue #30's goals."""
    ours, peer = rows["prequantized"], rows["diffusers-prequantized"]
    ratios = {"seconds_ratio": round(ours["seconds"] / peer["seconds"], 3),
              "rss_peak_ratio": round(ours["rss_peak_bytes"] / peer["rss_peak_bytes"], 3)}
    return {**ratios, "goal": {**PEER_GOALS, "met": {
        "seconds": ratios["seconds_ratio"] <= PEER_GOALS["seconds_ratio_max"],
        "rss_peak": ratios["rss_peak_ratio"] <= PEER_GOALS["rss_peak_ratio_max"]}}}


def load_child(mode: str, folder: str) -> dict:
    """One load path, in this (fresh) process: load the transformer in `folder` into fp8-weight on the CPU."""
    import resource

    t0 = time.perf_counter()
    import diffusers  # noqa: F401 - imports are timed apart from the load
    import torch  # noqa: F401
    import torchao.quantization  # noqa: F401
    from diffusers import SD3Transformer2DModel, TorchAoConfig  # noqa: F401

    from sd35 import precision
    from sd35.weights import lean  # noqa: F401

    t_import = time.perf_counter() - t0
    if mode not in LOAD_PATHS:
        raise ValueError(mode)
    t1 = time.perf_counter()
    model = LOAD_PATHS[mode][1](Path(folder))
    _touch(model)  # a mapped load reads its pages on first use: count that reading here, for every mode alike
    seconds = time.perf_counter() - t1
    cov = precision.linear_coverage(model)
    return {"seconds": round(seconds, 2), "import_seconds": round(t_import, 2),
            "rss_peak_bytes": _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "weight_bytes": precision.weight_bytes(model)["total"], **cov}


def _prepare(arch: str, root: Path) -> dict[str, Path]:
    """The folders on disk: bf16 (as published) and pre-quantized (as `sd35 cache quantize` writes it)."""
    from sd35.weights import fp8io, lean

    bf16 = root / "bf16"
    model = build_transformer(arch)
    model.save_pretrained(bf16 / "transformer", safe_serialization=True)
    del model
    gc.collect()
    stored = root / "prequantized"
    q = lean.load_transformer(bf16, quantize=True)
    fp8io.store_transformer(q, stored)  # what `sd35 cache quantize` writes for it
    del q
    gc.collect()
    return {"bf16": bf16, "prequantized": stored}


def _run_child(mode: str, folder: Path) -> dict:
    """`python -m sd35.bench.load load-child MODE FOLDER` after evicting FOLDER; its row plus the wall time."""
    import json
    import os
    import subprocess
    import sys

    _evict(folder)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sd35.bench.load", "load-child", mode, str(folder)],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"bench load {mode} failed: {r.stderr[-2000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["process_seconds"] = round(wall, 2)
    row["disk_bytes"] = _folder_bytes(folder / "transformer")
    return row


def load_modes(arch: str, work_dir=None, keep: bool = False) -> dict:
    """Load one random-weight transformer of `arch` by every path in `LOAD_PATHS`, each in its own process:
    `bf16-quantize` (today: bf16 from disk, then quantize), `lean` (quantized as the shards are read),
    `prequantized` (FP8 data + scales mapped from disk), and diffusers' own loader on the same files
    (`diffusers-torchao`, `diffusers-prequantized`). Reports seconds, peak RSS and bytes read from disk."""
    import os
    import shutil
    import tempfile

    import torch

    from sd35.weights import store

    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"sd35-bench-load-{arch}-", dir=work_dir))
    try:
        folders = _prepare(arch, root)
        prep = time.perf_counter() - t0
        rows = {mode: _run_child(mode, folders[kind]) for mode, (kind, _) in LOAD_PATHS.items()}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    base, pre = rows["bf16-quantize"], rows["prequantized"]
    ratios = {"disk_ratio": round(pre["disk_bytes"] / base["disk_bytes"], 3),
              "rss_peak_ratio": round(pre["rss_peak_bytes"] / base["rss_peak_bytes"], 3),
              "seconds_ratio": round(pre["seconds"] / base["seconds"], 3),
              "lean_rss_peak_ratio": round(rows["lean"]["rss_peak_bytes"] / base["rss_peak_bytes"], 3)}
    met = {"disk": ratios["disk_ratio"] <= LOAD_GOALS["disk_ratio_max"],
           "rss_peak": ratios["rss_peak_ratio"] <= LOAD_GOALS["rss_peak_ratio_max"],
           "seconds": ratios["seconds_ratio"] <= LOAD_GOALS["seconds_ratio_max"]}
    return {"arch": arch, "linear_parameters": base["fp8_linear_params"] + base["bf16_linear_params"],
            "modes": rows, "prequantized_vs_bf16_quantize": ratios, "goal": {**LOAD_GOALS, "met": met},
            "prequantized_vs_diffusers": _vs_diffusers(rows),
            "prepare_seconds": round(prep, 1), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "versions": store.versions(),
            "notes": "seconds: the load itself (imports excluded, in import_seconds); rss_peak_bytes: the child "
                     "process's VmHWM (imports included, ~0.4 GB, the same for every mode); files evicted from the "
                     "page cache before each mode."}


if __name__ == "__main__":  # `python -m sd35.bench.load load-child MODE FOLDER` (used by load_modes)
    import json
    import logging
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if len(sys.argv) == 4 and sys.argv[1] == "load-child":
        print(json.dumps(load_child(sys.argv[2], sys.argv[3])))
    else:
        sys.exit("usage: python -m sd35.bench.load load-child MODE FOLDER")
