"""`hardware.detect` on its CUDA path, on a CPU: torch.cuda faked (capabilities 8.0, 8.9, 9.0, 12.0, several GPUs
with different free memory, a full GPU), so capability → fp8, the GPU `auto` picks and the refusals are tested
without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sd35 import hardware, precision
from sd35.errors import HardwareError

GIB = 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    """Install a fake torch.cuda with the GPUs given as [(name, (major, minor), total_gib, free_gib), …]."""

    def install(gpus):
        def index(device):
            d = torch.device(device) if not isinstance(device, torch.device) else device
            return d.index or 0

        def props(device):
            name, (major, minor), total, _free = gpus[index(device)]
            return SimpleNamespace(name=name, major=major, minor=minor, total_memory=int(total * GIB))

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "get_device_properties", props)
        monkeypatch.setattr(torch.cuda, "mem_get_info",
                            lambda device=None: (int(gpus[index(device)][3] * GIB), int(gpus[index(device)][2] * GIB)))
        hardware.detect.cache_clear()

    yield install
    hardware.detect.cache_clear()


@pytest.mark.parametrize("cap,name,fp8", [
    ((8, 0), "NVIDIA A100-SXM4-80GB", False),
    ((8, 9), "NVIDIA L40S", True),
    ((9, 0), "NVIDIA H200", True),
    ((12, 0), "NVIDIA RTX PRO 6000 Blackwell", True),
])
def test_capability_decides_fp8_compute_and_what_auto_picks(fake_cuda, cap, name, fp8):
    fake_cuda([(name, cap, 80, 70)])
    hw = hardware.detect("auto")
    assert hw.device == "cuda:0" and hw.device_reason == "auto: the only GPU" and hw.capability == cap
    assert hw.fp8_compute is fp8 and f"SM {cap[0]}.{cap[1]}" in hw.fp8_reason and name in hw.fp8_reason
    assert (">=" if fp8 else "<") in hw.fp8_reason
    assert hw.as_dict()["capability"] == f"{cap[0]}.{cap[1]}" and hw.total_memory_bytes == 80 * GIB
    plan = precision.resolve("auto", "auto", hw, compiled=True)
    assert plan.transformer == ("fp8" if fp8 else "fp8-weight") and plan.emulated is False
    eager = precision.resolve("auto", "auto", hw, compiled=False)  # FP8 compute pays off only compiled
    assert eager.transformer == "fp8-weight" and ("only compiled" in eager.transformer_reason) is fp8
    if not fp8:
        with pytest.raises(HardwareError, match="compute capability >= 8.9"):
            precision.resolve("fp8", "auto", hw)


def test_auto_picks_the_gpu_with_the_most_free_memory_and_says_why(fake_cuda):
    fake_cuda([("H100", (9, 0), 80, 10), ("H100", (9, 0), 80, 70.5), ("H100", (9, 0), 80, 40)])
    hw = hardware.detect("auto")
    assert hw.device == "cuda:1"
    assert hw.device_reason.startswith("auto: most free memory") and "cuda:1 70.5 GiB" in hw.device_reason
    assert hardware.free_memory("cuda:2") == 40 * GIB


def test_a_tie_goes_to_the_lowest_index_and_a_full_gpu_is_never_picked(fake_cuda):
    fake_cuda([("H100", (9, 0), 80, 0), ("H100", (9, 0), 80, 30), ("H100", (9, 0), 80, 30)])
    assert hardware.detect("auto").device == "cuda:1"  # cuda:0 is full (another user's service)
    fake_cuda([("H100", (9, 0), 80, 0)])
    hw = hardware.detect("auto")  # one GPU, full: still the only device; the load's own OOM says more
    assert hw.device == "cuda:0" and hw.device_reason == "auto: the only GPU"


def test_explicit_devices_and_their_refusals(fake_cuda):
    fake_cuda([("A100", (8, 0), 40, 39), ("H100", (9, 0), 80, 1)])
    assert hardware.detect("cuda:1").device == "cuda:1" and hardware.detect("cuda:1").fp8_compute
    assert hardware.detect("cuda").device == "cuda:0" and not hardware.detect("cuda").fp8_compute
    assert hardware.detect("cpu").device == "cpu"
    with pytest.raises(HardwareError, match="only 2 CUDA device"):
        hardware.detect("cuda:2")


def test_no_cuda_is_the_cpu_and_an_explicit_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hardware.detect.cache_clear()
    hw = hardware.detect("auto")
    assert hw.device == "cpu" and hw.device_reason == "auto: torch sees no CUDA device" and not hw.fp8_compute
    with pytest.raises(HardwareError, match="torch sees no CUDA device"):
        hardware.detect("cuda:0")
    hardware.detect.cache_clear()
