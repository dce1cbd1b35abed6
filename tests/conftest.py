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


def no_keys(folder: Path) -> Path:
    """An empty keys file (0640): a service with no keys, whatever /etc/sd35/api-keys holds on this machine."""
    path = folder / "no-api-keys"
    if not path.exists():
        path.touch(mode=0o640)
        path.chmod(0o640)
    return path


@pytest.fixture(scope="session", autouse=True)
def hermetic_session(tmp_path_factory):
    """Before any fixture of any scope builds Settings(): no SD35_*/HF_* variables of the developer's shell,
    an empty working folder (no .env: a checkout whose .env says SD35_MODEL=large still tests the tiny
    model), an empty Hub cache, and no /etc/sd35/api-keys (the machine's keys never reach a test's app).
    `clean_env` then does the same per test, in the test's own folder."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("session")
    for key in list(os.environ):
        if key.startswith("SD35_") or key in SETTING_VARS:
            mp.delenv(key, raising=False)
    mp.setenv("HF_HUB_CACHE", str(home / "hf-cache"))
    mp.setenv("HF_HOME", str(home / "hf-home"))
    mp.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))  # the default compile cache: never the developer's
    mp.chdir(home)
    from sd35.service import auth

    mp.setattr(auth, "DEFAULT_FILE", home / "etc-sd35" / "api-keys")
    keys = no_keys(home)
    mp.setenv("SD35_API_KEYS_FILE", str(keys))  # the CLI in a subprocess: not the machine's file either
    yield keys
    mp.undo()


ROOT_FIXTURES = {"browser", "other"}  # chromium (installed as root), a second Unix account (useradd)


# The longest files first (minutes each on a 2-core box): `make test` runs a file whole on one xdist worker
# (--dist loadfile), so a long file that starts last keeps the other worker idle (longest-first scheduling).
LONGEST_FIRST = ("test_ray.py", "test_fp8_emulated.py", "test_compile.py", "test_debugging.py", "test_bench_gpu.py",
                 "test_notebooks.py", "test_report.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
    """Tests on a fixture only root can provide are `root` tests, like those marked by hand. The longest files
    run first (a stable sort: each file keeps its own order)."""
    for item in items:
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (.ci/run: as root, CI_REQUIRE_ROOT_TESTS=1) a `root` test that skips is a failure: what it
    needs is installed there, so a skip would hide a test that never ran."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI_REQUIRE_ROOT_TESTS") == "1" and item.get_closest_marker("root"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a `root` test skipped under .ci/run (CI_REQUIRE_ROOT_TESTS=1): {reason}"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, hermetic_session) -> Path:
    """One tiny model build per test session, shared by every test (SD35_CACHE_DIR)."""
    from sd35.weights import tiny

    cache = tmp_path_factory.mktemp("sd35-cache")
    tiny.ensure(cache)
    return cache


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path, tiny_cache, hermetic_session):
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
    from sd35.service import auth

    monkeypatch.setattr(auth, "DEFAULT_FILE", tmp_path / "etc-sd35" / "api-keys")
    monkeypatch.setenv("SD35_API_KEYS_FILE", str(hermetic_session))

    hardware.detect.cache_clear()
    yield
