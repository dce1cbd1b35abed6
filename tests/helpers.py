"""Helpers shared by the tests (imported as `helpers`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sd35_cmd(*args: str) -> list[str]:
    """The command line of the installed `sd35` console script (`python -m sd35` without it), then `args`."""
    exe = Path(sys.executable).with_name("sd35")
    return ([str(exe)] if exe.exists() else [sys.executable, "-m", "sd35"]) + list(args)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run the installed `sd35` console script as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(sd35_cmd(*args), capture_output=True, text=True, env=full_env, cwd=cwd,
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


def load_jsonc(path: Path) -> object:
    """Parse JSON with comments and trailing commas (VS Code's launch.json, devcontainer.json)."""
    import json
    import re

    text = Path(path).read_text()
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':  # copy a string literal verbatim, honouring escapes
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        else:
            out.append(c)
            i += 1
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", "".join(out)))


def read_in_background(proc):
    """Drain a child's stdout on a thread, so a full pipe never blocks it (a service writes an access-log line
    per request: a test polling /metrics fills a 64 KB pipe within a minute and the server's event loop then
    blocks in the write). Returns a function giving the text read so far."""
    import threading

    chunks: list[str] = []

    def pump():
        for line in proc.stdout:
            chunks.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()

    def text(wait: float = 5.0) -> str:
        if proc.poll() is not None:
            t.join(timeout=wait)
        return "".join(chunks)

    return text
