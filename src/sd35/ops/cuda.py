"""torch's CUDA build against this machine: which CUDA line, which driver, which GPU architectures.

Why a module of its own: a torch wheel is built for one CUDA line (cu126, cu130, ...) and carries kernels
for a fixed list of GPU architectures. Three things must agree on a GPU server — the line the workspace
pins (`# torch-cudaNN:` in constraints.txt), the driver (it runs a CUDA line only up to the version it
reports), and the GPU (a Blackwell card, SM 10.0/12.0, has no kernels in a CUDA 12.6 build). `sd35 doctor`
asks these questions; the answers are plain functions so the tests can ask them too.

Sources: PyTorch's published lines per release live in docker/torch-cuda-matrix.json (with its source);
the driver floors are NVIDIA's "Minor Version Compatibility" table (CUDA 12.x: driver >= 525, CUDA 13.x:
>= 580, https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
"""

from __future__ import annotations

import re
from pathlib import Path

# Oldest driver branch that runs each CUDA major (NVIDIA, minor version compatibility).
DRIVER_FLOOR = ((580, (13, 0)), (525, (12, 0)), (450, (11, 0)))


def read_cuda_lines(constraints: Path) -> dict[int, str]:
    """The `# torch-cudaNN: X.Y.Z` lines of constraints.txt, by CUDA major: {12: "12.6.3", 13: "13.0.2"}."""
    lines = {}
    if Path(constraints).is_file():
        for m in re.finditer(r"^# torch-cuda(\d+):\s*(\d+\.\d+(?:\.\d+)?)\s*$", Path(constraints).read_text(), re.M):
            lines[int(m.group(1))] = m.group(2)
    return lines


def wheel_tag(version: str) -> str:
    """PyTorch's index name for a CUDA version: "12.6.3" or "12.6" → "cu126"."""
    major, minor = version.split(".")[:2]
    return f"cu{major}{minor}"


def parse_version(text: str | None) -> tuple[int, int] | None:
    """ "12.6" / "13.0.2" → (12, 6); None when it is not a version."""
    m = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def driver_cuda_from_header(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The highest CUDA version the driver supports, from `nvidia-smi`'s header ("CUDA Version: 12.6")."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def driver_cuda_from_version(driver_version: str) -> tuple[int, int] | None:
    """A lower bound of the CUDA version a driver supports, from its branch ("560.35.03" → (12, 0))."""
    m = re.match(r"^\s*(\d+)", driver_version or "")
    if not m:
        return None
    branch = int(m.group(1))
    return next((cuda for floor, cuda in DRIVER_FLOOR if branch >= floor), None)


def arch_in_build(capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """How a build runs on a GPU of this compute capability: the `sm_XY` kernels it uses, a `compute_XY`
    (PTX, JIT-compiled by the driver at first use), or None when it cannot run there at all.

    A cubin for sm_XY also runs on sm_XZ with Z >= Y (same major): Ada (8.9) runs a build's sm_86 kernels.
    Arch-specific targets (sm_90a, sm_100a) run only on exactly that GPU."""
    major, minor = capability
    native, ptx = [], []
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)(a|f)?", arch)
        if not m:
            continue
        a_major, a_minor, suffix = int(m.group(2)), int(m.group(3)), m.group(4)
        if m.group(1) == "sm" and a_major == major and (a_minor == minor or (a_minor < minor and not suffix)):
            native.append((a_minor, arch))
        elif m.group(1) == "compute" and (a_major, a_minor) <= (major, minor) and not suffix:
            ptx.append(((a_major, a_minor), arch))
    if native:
        return max(native)[1]
    return max(ptx)[1] if ptx else None

