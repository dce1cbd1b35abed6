"""Shared fixtures. Test tiers: fast CPU tests always; `slow` marked; `gpu`/`fp8` skipped with the
reason when the hardware is missing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTING_VARS = ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME")
# The service's usage ledger defaults to $XDG_STATE_HOME/sd35: never the developer's (set before any fixture).
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="sd35-test-state-")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny model build per test session, shared by every test (SD35_CACHE_DIR)."""
    from sd35.weights import tiny

    cache = tmp_path_factory.mktemp("sd35-cache")
    tiny.ensure(cache)
    return cache


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path, tiny_cache):
    """Each test starts with no SD35_*/HF_* variables, in an empty folder (so no stray .env), with the
    tiny model cache shared and the Hub cache empty."""
    for key in list(os.environ):
        if key.startswith("SD35_") or key in SETTING_VARS:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SD35_CACHE_DIR", str(tiny_cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token from the developer
    monkeypatch.chdir(tmp_path)
    from sd35 import hardware

    hardware.detect.cache_clear()
    yield
