"""Helpers shared by the tests (imported as `helpers`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run the installed `sd35` console script as a user would."""
    exe = Path(sys.executable).with_name("sd35")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sd35"]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def has_fp8_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


requires_gpu = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
requires_fp8 = pytest.mark.skipif(
    not has_fp8_gpu(), reason="needs FP8 tensor cores (CUDA compute capability >= 8.9); none found"
)
