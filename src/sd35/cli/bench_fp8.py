"""`sd35 bench speed | gpu | lora | dynamic`: the benchmarks of precision and compilation (the FP8 story),
and `start`, which every `sd35 bench` command runs first. `cli/bench.py` registers these on the group."""

from __future__ import annotations

import json

import typer

from sd35.cli.common import Json, handle_errors, out, settings
from sd35.errors import InputError


def start(arch: str | None = None, *, quiet: bool = False) -> None:
    """Every `sd35 bench` command: our logs only (warnings only with `quiet`, so timings print clean), and
    `--arch` checked against the registry's architectures."""
    import logging

    from sd35 import logs
    from sd35.models import ARCHS

    logs.configure(False)
    if quiet:
        logging.getLogger("sd35").setLevel(logging.WARNING)
    if arch is not None and arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}.", f"use --arch {' or --arch '.join(ARCHS)}.")


def _checked(modes: str, size: int, *, example: str, min_size: int = 64) -> list[str]:
    """The `--modes` list, each a real precision mode (not auto), and `--size` checked: the bench commands'
    shared input check."""
    from sd35.settings import PRECISIONS

    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in wanted if m not in PRECISIONS or m == "auto"]
    if bad or not wanted:
        raise InputError(f"unknown mode(s) {', '.join(bad) or modes!r}.", f"use --modes {example}.")
    if size % 16 or not min_size <= size <= 4096:
        raise InputError(f"--size {size} must be a multiple of 16 from {min_size} to 4096.", "pass --size 1024.")
    return wanted


def _label(report: dict, mode: str) -> str:
    """A mode's name in a table: `fp8 (emulated)` where SD35_FP8_EMULATE ran it on the CPU."""
    return f"{mode} (emulated)" if mode == "fp8" and report.get("emulated") else mode


@handle_errors
def bench_speed(
    arch: str = typer.Option("large", "--arch", help="medium | large (published configs) | tiny"),
    size: int = typer.Option(1024, "--size", help="square image side"),
    modes: str = typer.Option("bf16,fp8-weight,fp8", "--modes", help="comma-separated precision modes"),
    eager_only: bool = typer.Option(False, "--eager-only", help="skip the compiled runs"),
    repeats: int = typer.Option(10, "--repeats"),
    cache_check: bool = typer.Option(False, "--cache-check", help="also time a cold vs a warm compile cache in two "
                                     "`sd35 generate --compile blocks` processes (the configured model)"),
    as_json: Json = False,
) -> None:
    """Transformer step latency and peak GPU memory per precision mode, eager and compiled (random weights)."""
    from sd35.bench import speed as speed_bench

    start(arch, quiet=True)
    wanted = _checked(modes, size, example="bf16,fp8-weight,fp8")
    s = settings()
    report = speed_bench.speed(arch, size, modes=wanted, compiled=not eager_only, repeats=repeats,
                               emulate=s.fp8_emulate)
    if cache_check:
        report["compile_cache"] = speed_bench.compile_cache(s)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"{report['arch']} at {report['size']}² on {report['device_name']} ({report['device']}), "
              f"median of {report['repeats']} steps" + (f"\n[yellow]{report['note']}[/]" if report["note"] else ""),
              highlight=False)
    for mode, row in report["modes"].items():
        mode = _label(report, mode)
        if "note" in row:
            out.print(f"  {mode:11} {row['note']}", highlight=False)
            continue
        parts = [f"{kind} {r['step_ms_median']:.1f} ms" + (f" ({r['ratio_vs_bf16']:.2f}× bf16)" if "ratio_vs_bf16" in r
                 else "") + (f", peak {r['peak_gpu_bytes'] / 1e9:.2f} GB" if "peak_gpu_bytes" in r else "")
                 + (f", first call {r['first_call_s']:.1f} s" if "first_call_s" in r else "")
                 for kind, r in row.items()]
        out.print(f"  {mode:11} " + " · ".join(parts), highlight=False)
    if "compile_cache" in report:
        c = report["compile_cache"]
        out.print(f"  compile cache: cold {c['cold']['seconds']} s, warm {c['warm']['seconds']} s → {c['ratio']}× "
                  f"(goal ≤ {c['goal_ratio_max']})", highlight=False)


@handle_errors
def bench_gpu(
    rehearse: bool = typer.Option(False, "--rehearse", help="without CUDA: the same sequence on this CPU with the "
                                  "tiny model and emulated fp8 (minutes; not GPU figures)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report instead of the markdown table"),
) -> None:
    """GPU acceptance, offline: the GPU test tier, bf16/fp8-weight/fp8 step times eager and compiled, peak
    memory, compile cold/warm, fp8's error per block (random weights of the published architectures)."""
    from sd35.bench import gpu

    start(quiet=True)
    report = gpu.run(rehearse=rehearse)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(gpu.markdown(report))


@handle_errors
def bench_lora(
    arch: str = typer.Option("large", "--arch", help="medium | large (published configs) | tiny"),
    size: int = typer.Option(1024, "--size", help="square image side"),
    modes: str = typer.Option("bf16,fp8-weight,fp8", "--modes", help="comma-separated precision modes"),
    ranks: str = typer.Option("0,16,64", "--ranks", help="comma-separated slot ranks (0: no LoRA)"),
    eager_only: bool = typer.Option(False, "--eager-only", help="skip the compiled runs"),
    repeats: int = typer.Option(10, "--repeats"),
    as_json: Json = False,
) -> None:
    """Per-step cost of an unfused LoRA (rank 16, 64) against none, per precision, eager and compiled, and the
    recompiles when swapping LoRAs on the compiled model (random weights)."""
    from sd35.bench import lora as bench

    start(arch, quiet=True)
    wanted = _checked(modes, size, example="bf16,fp8-weight,fp8")
    try:
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise InputError(f"--ranks {ranks!r} must be comma-separated integers.", "pass --ranks 0,16,64.") from None
    if not rank_list or any(not 0 <= r <= 1024 for r in rank_list):
        raise InputError(f"--ranks {ranks!r}: each rank must be from 0 to 1024.", "pass --ranks 0,16,64.")
    report = bench.run(arch, size, modes=wanted, ranks=rank_list, compiled=not eager_only, repeats=repeats,
                       emulate=settings().fp8_emulate)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"{report['arch']} at {report['size']}² on {report['device_name']} ({report['device']}), median of "
              f"{report['repeats']} steps / min; LoRA slots on every linear" +
              (f"\n[yellow]{report['note']}[/]" if report["note"] else ""), highlight=False)
    for mode, rows in report["modes"].items():
        mode = _label(report, mode)
        for rank, r in rows.items():
            if "note" in r:
                out.print(f"  {mode:11} rank {rank:>3}: {r['note']}", highlight=False)
                continue
            parts = [f"{kind} {r[f'{kind}_ms']:.1f} / {r[f'{kind}_min_ms']:.1f} ms"
                     + (f" ({r[f'{kind}_overhead'] * 100:+.0f}% min)" if f"{kind}_overhead" in r else "")
                     for kind in ("eager", "compiled") if f"{kind}_ms" in r]
            if "recompiles_on_swap" in r:
                parts.append(f"recompiles on swap: {r['recompiles_on_swap']}")
            out.print(f"  {mode:11} rank {rank:>3}: " + " · ".join(parts), highlight=False)


@handle_errors
def bench_dynamic(
    arch: str = typer.Option("medium", "--arch", help="medium | large (published configs) | tiny"),
    size: int = typer.Option(1024, "--size", help="square image side (the warm-up's; requests go 48 below to 16 above)"),
    modes: str = typer.Option("bf16,fp8", "--modes", help="comma-separated precision modes"),
    backend: str = typer.Option("inductor", "--backend", help="inductor (what serving runs) | eager (dynamo "
                                "alone: the graph counts and limit hits in seconds; its times mean nothing)"),
    as_json: Json = False,
) -> None:
    """Warm-up shapes vs inputs marked dynamic: warm-up seconds, graphs, recompile-limit hits, new graphs for
    16 request shapes and step times, each way in a fresh process (random weights, `blocks` compiled)."""
    from sd35.bench import dynamic

    start(arch, quiet=True)
    wanted = _checked(modes, size, example="bf16,fp8", min_size=128)
    if backend not in ("inductor", "eager"):
        raise InputError(f"--backend {backend!r} is not one this benchmark takes.", "pass --backend inductor or eager.")
    report = dynamic.run(arch, size, modes=wanted, emulate=settings().fp8_emulate, backend=backend)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"{report['arch']} at {report['size']}² on {report['device_name']}, blocks compiled ({backend})"
              + (f"\n[yellow]{report['note']}[/]" if report["note"] else ""), highlight=False)
    for mode, rows in report["modes"].items():
        for approach, r in rows.items():
            if "note" in r:
                out.print(f"  {_label(report, mode):14} {approach:8} {r['note']}", highlight=False)
                continue
            out.print(f"  {_label(report, mode):14} {approach:8} warm-up {r['warm_up_s']} s · graphs {r['graphs_at_ready']}"
                      f" (+{r['graphs_after_ready']} after) · limit hits {r['limit_hits']} · step ms batch 1/2/8 "
                      f"{r['step_ms']['1']} / {r['step_ms']['2']} / {r['step_ms']['8']}", highlight=False)
