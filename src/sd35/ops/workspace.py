"""The workspace as files: where its root is and what `constraints.txt` pins.

Why here and not in `ops/doctor/`: `sd35 lab` (the folder JupyterLab opens), `sd35 doctor` (installed vs
pinned versions) and the tests all need these answers; a checks module is no place for utilities
others import.
"""

from __future__ import annotations

import re
from pathlib import Path


def find_root(start: Path | None = None) -> Path:
    """The workspace root: the nearest folder upwards holding constraints.txt, else the package's repo."""
    start = (start or Path.cwd()).resolve()
    for p in [start, *start.parents]:
        if (p / "constraints.txt").is_file() and (p / "pyproject.toml").is_file():
            return p
    return Path(__file__).resolve().parents[2]


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, names normalised (lower case, `-` for `_`)."""
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
            if m:
                pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins
