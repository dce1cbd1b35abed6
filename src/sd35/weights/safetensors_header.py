"""The one reader of a safetensors file's header: 8 bytes of little-endian length, then a JSON table
{name: {dtype, shape, data_offsets}} with an optional `__metadata__` of strings.

Why one module: the lean loader, the single-file inspector (`--transformer`) and `sd35 cache verify`
all need that table without reading a tensor. Parsed in one place, the length is bounded once (a
foreign file cannot make us allocate its first 8 bytes' worth) and a cut-short file gets the same
cause wherever it is found. Reading tensors is not done here: that is safetensors' job.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sd35.errors import ModelError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class Header:
    tensors: dict[str, dict]  # name → {"dtype", "shape", "data_offsets": [start, end]} (relative to data_start)
    metadata: dict[str, str]  # the file's __metadata__ ({} when absent)
    data_start: int  # byte offset of the first tensor's data in the file


def _parse(path: Path) -> tuple[Header | None, str | None]:
    """(the header, None), or (None, why the file is not a whole safetensors file)."""
    size = path.stat().st_size
    if size < 8:
        return None, f"{size} bytes, too small for a safetensors header"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            return None, f"header claims {n} bytes, file has {size}"
        try:
            table = json.loads(fh.read(n))
        except ValueError:
            return None, "header is not valid JSON"
    if not isinstance(table, dict):
        return None, "header is not a JSON object"
    metadata = table.pop("__metadata__", None) or {}
    end = max((t["data_offsets"][1] for t in table.values()), default=0)
    if size < 8 + n + end:
        return None, f"{size} bytes on disk, {8 + n + end} expected"
    return Header(table, metadata, 8 + n), None


def torch_dtype(code: str):
    """The torch dtype of a header's dtype code ("BF16", "F8_E4M3", …)."""
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
            "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}[code]


def truncated(path: Path) -> str | None:
    """Why a .safetensors file is cut short or not safetensors (header vs file size), or None when whole."""
    return _parse(Path(path))[1]


def read_header(path: Path) -> Header:
    """The header of a whole safetensors file; a ModelError naming the cause otherwise."""
    header, why = _parse(Path(path))
    if header is None:
        raise ModelError(f"{path} is not a whole safetensors file ({why}): truncated or not safetensors.",
                         "download or re-create it (compare its size with the source's).")
    return header
