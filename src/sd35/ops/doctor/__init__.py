"""`sd35 doctor`: every way a first day on SD3.5 goes wrong, found before anything else runs.

Why a package of small functions: each pitfall (a torch without float8, FP8 on a GPU that can't, a
gated repo without a token, LFS pointer stubs, a cache the group can't write, a busy port, a typo in
`.env`) is one `check_*` function that takes the `Context` and returns its finding and the fix. The
functions live in one module per group (config, system, gpu, memory, model, hub, storage, network);
this module holds the order they run and print in (`CHECKS`), the runner and the table. Adding a check
is adding a function to its group and its name to `CHECKS`; the table, `--json` and the exit code follow.

Nothing here downloads weights or loads a model: sizes come from configs (`sizing.py`), access from
the Hub's auth-check endpoint (skipped offline).
"""

from __future__ import annotations

from typing import Callable

from sd35.ops.doctor import config, gpu, hub, memory, model, network, storage, system
from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context

__all__ = ["CHECKS", "FAIL", "OK", "SKIP", "WARN", "Check", "Context", "run", "table"]

# The order `sd35 doctor` runs and prints: settings and the install first, then the GPU, memory, the
# weights and the Hub, then the workspace and the network; later checks say "see above" for earlier ones.
CHECKS: list[Callable[[Context], Check | list[Check]]] = [
    config.check_settings,
    system.check_python,
    system.check_packages,
    gpu.check_torch_build,
    gpu.check_cuda_driver,
    gpu.check_gpu_arch,
    gpu.check_float8,
    gpu.check_gpu,
    gpu.check_precision,
    memory.check_fits,
    model.check_transformer_file,
    memory.check_host_ram,
    hub.check_token,
    hub.check_hub_access,
    storage.check_hub_cache,
    storage.check_compile_cache,
    model.check_model,
    storage.check_disk,
    config.check_dotenv,
    network.check_debugpy,
    network.check_api_port,
    network.check_listeners,
    system.check_systemd,
]


def run(ctx: Context) -> list[Check]:
    """Every check of CHECKS in order; one that raises becomes a failed check instead of hiding the rest."""
    results: list[Check] = []
    for fn in CHECKS:
        try:
            got = fn(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken check must not hide the others
            got = Check(fn.__name__.removeprefix("check_"), FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                        "report this as a bug in sd35 doctor")
        results.extend(got if isinstance(got, list) else [got])
    return results


def table(results: list[Check]):
    """The results as the rich table `sd35 doctor` prints (`--json` prints `Check.as_dict` instead)."""
    from rich.table import Table

    colour = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}
    t = Table(title="sd35 doctor", show_lines=False)
    t.add_column("check")
    t.add_column("status")
    t.add_column("finding")
    t.add_column("fix")
    for r in results:
        t.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", r.finding, r.fix or "")
    counts = {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL, SKIP)}
    t.caption = " · ".join(f"{n} {s}" for s, n in counts.items())
    return t
