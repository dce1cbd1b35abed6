"""What this machine can do, detected once and recorded as a value plus the reason.

Why: the precision `auto` picks, the device a run lands on and the errors for impossible requests all
follow from one fact sheet. Computing it in one place (and recording the reason as text, e.g.
"fp8: SM 9.0 >= 8.9") means the log line, the sidecar JSON and `sd35 doctor` agree.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from sd35.errors import HardwareError

FP8_MIN_CAPABILITY = (8, 9)  # Ada (SM 8.9) and Hopper (SM 9.0) have FP8 tensor cores.


@dataclass(frozen=True)
class Hardware:
    device: str  # "cpu" or "cuda:N"
    name: str  # "CPU" or the GPU's marketing name
    capability: tuple[int, int] | None  # CUDA compute capability, None on CPU
    total_memory_bytes: int | None  # GPU memory, None on CPU
    fp8_compute: bool  # FP8 matmuls on tensor cores possible
    fp8_reason: str  # why (not), for logs and sidecars
    has_float8_dtype: bool  # torch build knows float8_e4m3fn (needed for any FP8 mode)
    device_reason: str = "requested"  # why this device (auto: the GPU with the most free memory)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        if not self.is_cuda:
            return "CPU (no CUDA device)"
        major, minor = self.capability or (0, 0)
        gib = (self.total_memory_bytes or 0) / 2**30
        return f"{self.name} (SM {major}.{minor}, {gib:.0f} GiB) as {self.device}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["capability"] = f"{self.capability[0]}.{self.capability[1]}" if self.capability else None
        return d


def free_memory(device: str) -> int | None:
    """Bytes free on a CUDA device right now (all processes' use counted, as the driver sees it); None on a CPU."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def _most_free_gpu() -> tuple[str, str]:
    """The visible GPU with the most free memory, and why: on a shared box another process (another user's
    service, a notebook) may already hold cuda:0."""
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda:0", "auto: the only GPU"
    free = [(free_memory(f"cuda:{i}") or 0, i) for i in range(count)]
    best, index = max(free, key=lambda t: (t[0], -t[1]))
    listing = ", ".join(f"cuda:{i} {f / 2**30:.1f} GiB" for f, i in free)
    return f"cuda:{index}", f"auto: most free memory ({listing})"


def _resolve_device(requested: str) -> tuple[str, str]:
    requested = requested.strip().lower()
    cuda_ok = torch.cuda.is_available()
    if requested == "auto":
        return _most_free_gpu() if cuda_ok else ("cpu", "auto: torch sees no CUDA device")
    if requested == "cpu":
        return "cpu", "requested"
    if not cuda_ok:
        raise HardwareError(
            f"device {requested!r} was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}).",
            "use --device cpu (or SD35_DEVICE=auto), or install torch's CUDA build on a GPU machine "
            "(`sd35 doctor` checks the driver and the build).",
        )
    index = 0 if requested == "cuda" else int(requested.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise HardwareError(
            f"device {requested!r} was asked for, but only {count} CUDA device(s) are visible "
            "(CUDA_VISIBLE_DEVICES renumbers them from 0).",
            f"use one of cuda:0 … cuda:{count - 1}.",
        )
    return f"cuda:{index}", "requested"


@functools.cache
def detect(requested: str = "auto") -> Hardware:
    """Detect the device `requested` resolves to. Cached: hardware does not change within a process."""
    device, device_reason = _resolve_device(requested)
    has_f8 = hasattr(torch, "float8_e4m3fn")
    if device == "cpu":
        return Hardware(
            device="cpu",
            name="CPU",
            capability=None,
            total_memory_bytes=None,
            fp8_compute=False,
            fp8_reason="fp8 compute: no CUDA device (FP8 tensor cores need SM >= 8.9)",
            has_float8_dtype=has_f8,
            device_reason=device_reason,
        )
    props = torch.cuda.get_device_properties(device)
    cap = (props.major, props.minor)
    ok = cap >= FP8_MIN_CAPABILITY and has_f8
    sign = ">=" if cap >= FP8_MIN_CAPABILITY else "<"
    reason = f"fp8 compute: SM {cap[0]}.{cap[1]} {sign} 8.9 on {props.name}"
    if not has_f8:
        reason += f"; torch {torch.__version__} has no float8_e4m3fn"
    return Hardware(
        device=device,
        name=props.name,
        capability=cap,
        total_memory_bytes=props.total_memory,
        fp8_compute=ok,
        fp8_reason=reason,
        has_float8_dtype=has_f8,
        device_reason=device_reason,
    )
