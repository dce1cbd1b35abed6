"""Doctor checks of the machine around sd35: the Python, the installed packages, the systemd units.

Why together: none of them depends on the model or the GPU; they are what `make setup` and the
deployment (docs/hosting.md) put in place, and their fixes are `make setup` or `journalctl`.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context

# The packages whose versions matter for behaviour; the rest of constraints.txt is their dependencies.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "torchao", "huggingface_hub", "safetensors",
                "pydantic-settings", "typer")


def check_python(ctx: Context) -> Check:
    v = sys.version_info
    if v < (3, 11):
        return Check("python", FAIL, f"Python {v.major}.{v.minor} is too old", "use Python 3.11 or newer (`make setup`)")
    return Check("python", OK, f"Python {v.major}.{v.minor}.{v.micro} at {sys.executable}")


def check_packages(ctx: Context) -> Check:
    from sd35.ops.workspace import read_pins

    pins = read_pins(ctx.root / "constraints.txt")
    if not pins:
        return Check("packages", WARN, f"no constraints.txt under {ctx.root}: versions not compared",
                     "run sd35 doctor from the workspace root")
    missing, off = [], []
    for name in KEY_PACKAGES:
        key = name.lower().replace("_", "-")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        want = pins.get(key)
        if want and have.split("+")[0] != want:
            off.append(f"{name} {have} (pinned {want})")
    if missing:
        return Check("packages", FAIL, "not installed: " + ", ".join(missing), "run `make setup`")
    if off:
        return Check("packages", WARN, "differ from constraints.txt: " + "; ".join(off),
                     "run `make setup` (or rebuild the image) to get the pinned versions")
    return Check("packages", OK, f"{len(KEY_PACKAGES)} key packages match constraints.txt")


def check_systemd(ctx: Context) -> Check:
    if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        return Check("systemd", SKIP, "systemd is not running here (container or CI): no units to check")
    try:
        out = subprocess.run(["systemctl", "list-units", "--all", "--no-legend", "--plain", "sd35-api@*"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("systemd", WARN, f"systemctl failed: {exc}")
    units = [line.split()[:4] for line in out.stdout.splitlines() if line.strip()]
    if not units:
        return Check("systemd", OK, "no sd35-api@ unit installed (see docs/hosting.md to serve the team)")
    failed = [u[0] for u in units if len(u) > 3 and u[2] == "failed"]
    if failed:
        return Check("systemd", FAIL, f"failed: {', '.join(failed)}", f"journalctl -u {failed[0]} -n 50")
    return Check("systemd", OK, "; ".join(f"{u[0]} {u[2]}/{u[3]}" for u in units if len(u) > 3))
