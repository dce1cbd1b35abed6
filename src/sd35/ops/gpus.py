"""`sd35 gpus`: who holds which GPU on a shared box — memory in use, and every process with its Unix user
and what it is (an sd35 service instance, a lab kernel, something else).

Why: `nvidia-smi` lists PIDs and bytes, and the next question is always "whose is that, and may I ask
them to stop it?". The driver knows the PIDs (`--query-compute-apps`); /proc knows their owners and
command lines; an sd35 service instance is recognised by its systemd unit (`sd35-api@N` in
/proc/PID/cgroup) or its command line (`sd35 serve`), a lab kernel by `ipykernel`. A PID /proc cannot
show (another container's, or hidden by hidepid) is listed with user "?" — never guessed.
"""

from __future__ import annotations

import pwd
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sd35.errors import Sd35Error

PROC = Path("/proc")
_UNIT = re.compile(r"(sd35-api@[^/\s]*?)\.service")


@dataclass
class GpuProcess:
    pid: int
    used_mib: int | None
    user: str
    kind: str  # "sd35 service" | "lab kernel" | "other" | "unknown"
    what: str  # the unit, or the command line (shortened)


@dataclass
class Gpu:
    index: str
    uuid: str
    name: str
    used_mib: int | None
    total_mib: int | None
    processes: list[GpuProcess] = field(default_factory=list)


def _smi(exe: str, query: str, fields: str) -> list[list[str]]:
    try:
        out = subprocess.run([exe, f"--query-{query}={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Sd35Error(f"nvidia-smi did not answer ({exc}).", "check the NVIDIA driver: run `nvidia-smi` "
                        "yourself.") from None
    if out.returncode != 0:
        raise Sd35Error(f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}",
                        "check the NVIDIA driver (`nvidia-smi`), and that this account may use the GPUs.")
    return [[p.strip() for p in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None  # "[N/A]": e.g. per-process memory inside some containers


def identify(pid: int, proc: Path = PROC) -> tuple[str, str, str]:
    """(user, kind, what) of a PID, from /proc."""
    base = proc / str(pid)
    try:
        uid = base.stat().st_uid
        argv = [a for a in (base / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return "?", "unknown", "not visible from here (another container, or /proc hidepid)"
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        unit = _UNIT.search((base / "cgroup").read_text())
    except OSError:
        unit = None
    line = " ".join(argv)
    short = line if len(line) <= 100 else line[:97] + "..."
    if unit:
        return user, "sd35 service", unit.group(1)
    words = [Path(a).name for a in argv]
    if any(w == "sd35" for w in words) and "serve" in argv or "sd35.service.server" in line:
        return user, "sd35 service", short
    if "ipykernel_launcher" in line or "ipykernel" in words or "-m ipykernel" in line:
        return user, "lab kernel", short
    return user, "other", short


def survey() -> list[Gpu]:
    """Every GPU the driver lists, with its processes."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        raise Sd35Error("nvidia-smi is not on PATH: no NVIDIA driver here, or it is not installed.",
                        "run this on the GPU server (or install the NVIDIA driver utilities).")
    gpus: dict[str, Gpu] = {}
    for row in _smi(exe, "gpu", "index,uuid,name,memory.used,memory.total"):
        if len(row) >= 5:
            gpus[row[1]] = Gpu(row[0], row[1], row[2], _int(row[3]), _int(row[4]))
    for row in _smi(exe, "compute-apps", "gpu_uuid,pid,used_memory"):
        if len(row) >= 3 and row[0] in gpus and row[1].isdigit():
            user, kind, what = identify(int(row[1]))
            gpus[row[0]].processes.append(GpuProcess(int(row[1]), _int(row[2]), user, kind, what))
    return list(gpus.values())


def as_dicts(gpus: list[Gpu]) -> list[dict]:
    return [asdict(g) for g in gpus]


def table(gpus: list[Gpu]) -> str:
    """Plain text: one block per GPU, one line per process."""
    lines = []
    for g in gpus:
        used = "?" if g.used_mib is None else f"{g.used_mib / 1024:.1f}"
        total = "?" if g.total_mib is None else f"{g.total_mib / 1024:.1f}"
        lines.append(f"GPU {g.index}  {g.name}  {used} / {total} GiB in use  ({len(g.processes)} processes)")
        for p in g.processes:
            mem = "?" if p.used_mib is None else f"{p.used_mib / 1024:.1f} GiB"
            lines.append(f"  pid {p.pid:<8} {p.user:<12} {mem:>10}  {p.kind:<13} {p.what}")
        if not g.processes:
            lines.append("  (no processes)")
    return "\n".join(lines) if lines else "no GPUs listed by nvidia-smi"
