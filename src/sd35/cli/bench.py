"""`sd35 bench …`: one command per benchmark (results belong in docs/benchmarks.md, with the machine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sd35.cli.bench_fp8 import bench_dynamic, bench_gpu, bench_lora, bench_speed, start
from sd35.cli.common import Json, Model, Precision, err, handle_errors, out, settings
from sd35.errors import InputError

app = typer.Typer(help="Benchmarks (results belong in docs/benchmarks.md).", no_args_is_help=True)


@app.command("memory")
@handle_errors
def bench_memory(
    arch: str = typer.Option("medium", "--arch", help="medium | large (the published transformer configs) | tiny"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Weight bytes of the SD3.5 transformer per precision mode (random weights, built on the CPU)."""
    from sd35.bench import memory

    start(arch)
    report = memory.memory(arch)
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(memory.memory_table(report))


@app.command("load")
@handle_errors
def bench_load(
    arch: str = typer.Option("medium", "--arch", help="medium | large (the published transformer configs) | tiny"),
    work_dir: Optional[Path] = typer.Option(None, "--dir", help="where the two copies are written (default: the "
                                            "system temp folder; medium needs ~7.5 GB, large ~12 GB)"),
    as_json: Json = False,
) -> None:
    """Load one random-weight transformer three ways, each in its own process: bf16 then quantize (today),
    lean (quantized as read), pre-quantized (FP8 from disk). Seconds, peak host RSS, bytes on disk."""
    from sd35.bench import load

    start(arch)
    if work_dir is not None and not work_dir.is_dir():
        raise InputError(f"--dir {work_dir} is not a folder.", "create it or pass another one.")
    report = load.load_modes(arch, work_dir)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for mode, r in report["modes"].items():
        out.print(f"{mode:22} {r['seconds']:7.1f} s  RSS peak {r['rss_peak_bytes'] / 1e9:6.2f} GB  "
                  f"disk {r['disk_bytes'] / 1e9:6.2f} GB", highlight=False)
    out.print(f"pre-quantized vs today: {report['prequantized_vs_bf16_quantize']} · goals {report['goal']}",
              highlight=False)
    peer = report["prequantized_vs_diffusers"]
    out.print(f"pre-quantized vs diffusers' from_pretrained of the same files: time {peer['seconds_ratio']}×, "
              f"peak RSS {peer['rss_peak_ratio']}× · goals {peer['goal']}", highlight=False)


@app.command("serve")
@handle_errors
def bench_serve(
    requests: int = typer.Option(20, "--requests", help="sequential requests per path"),
    steps: int = typer.Option(4, "--steps"),
    size: int = typer.Option(128, "--size", help="square image side"),
    burst: int = typer.Option(16, "--burst", help="concurrent requests in the burst"),
    queue_size: int = typer.Option(4, "--queue-size"),
    model: Model = None,
    precision: Precision = None,
    ray: bool = typer.Option(False, "--ray", help="1 vs 2 Ray Serve replicas side by side (a loopback Ray here; "
                             "--requests generations from --burst closed-loop clients)"),
    flood: bool = typer.Option(False, "--flood", help="a valid user's latency without and with two clients "
                               "sending distinct wrong API keys as fast as they can (goal <= 1.2x)"),
    batch_window: Optional[int] = typer.Option(None, "--batch-window", min=1, max=10_000, metavar="MS",
                                               help="images/s and p50/p95 of --clients closed-loop clients "
                                               "(--requests in all) without and with SD35_BATCH_WINDOW_MS=MS"),
    clients: int = typer.Option(8, "--clients", help="--batch-window: concurrent clients"),
    as_json: Json = False,
) -> None:
    """Service overhead vs a direct pipeline call (goal <= 5 %), and a burst against a bounded queue."""
    from sd35.bench import serve

    start(quiet=True)
    if batch_window is not None:
        from sd35.bench.batching import batch_window as run_batch_window

        report = run_batch_window(settings(model=model, precision=precision), window_ms=batch_window,
                                  clients=clients, requests=max(requests, clients), steps=steps, size=size)
        print(json.dumps(report, indent=2)) if as_json else out.print(_batch_text(report), highlight=False)
        return
    if flood:
        from sd35.bench.flood import wrong_token_flood

        report = wrong_token_flood(settings(model=model, precision=precision), requests=requests, steps=steps,
                                   size=size)
        print(json.dumps(report, indent=2)) if as_json else out.print(_flood_text(report), highlight=False)
        return
    if ray:
        _bench_serve_ray(settings(model=model, precision=precision, queue_size=queue_size), requests, burst, steps,
                         size, as_json)
        return
    report = serve.serve_overhead(settings(model=model, precision=precision), requests=requests, steps=steps,
                                  size=size, burst=burst, queue_size=queue_size)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    b = report["burst"]
    out.print(f"{report['model']} {report['precision']} on {report['device']}, {report['steps']} steps "
              f"{report['size']}, {report['requests']} sequential requests each:\n"
              f"  direct  mean {report['direct_mean_s'] * 1000:.1f} ms  p50 {report['direct_p50_s'] * 1000:.1f} ms\n"
              f"  HTTP    mean {report['http_mean_s'] * 1000:.1f} ms  p50 {report['http_p50_s'] * 1000:.1f} ms\n"
              f"  overhead {report['overhead_mean'] * 100:+.1f} % (mean), {report['overhead_p50'] * 100:+.1f} % (p50); "
              f"goal <= 5 %\n"
              f"burst of {b['concurrent']} against queue {b['queue_size']}: {b['status_counts']} in {b['seconds']} s, "
              f"{b['images_per_s']} images/s, served p50 {b['served_p50_s']} s p95 {b['served_p95_s']} s",
              highlight=False)


def _batch_text(r: dict) -> str:
    lines = [f"{r['model']} {r['precision']} on {r['device']}, {r['steps']} steps {r['size']}, {r['clients']} "
             f"clients, up to {r['max_images']} images a batch:"]
    for name in ("unbatched", "batched"):
        c = r[name]
        lines.append(f"  {name:9} window {c['batch_window_ms']:>5} ms: {c['images_per_s']} images/s, p50 {c['p50_s']} s "
                     f"p95 {c['p95_s']} s, {c['mean_requests_per_batch']} requests a batch, {c['status_counts']}")
    p = r["psnr_vs_unbatched"]
    lines.append(f"  speed-up {r['speedup_images_per_s']}x; batched vs unbatched images: {p['identical']} of "
                 f"{p['images']} identical, the others min {p['min_db']} dB, mean {p['mean_db']} dB")
    return "\n".join(lines)


def _flood_text(r: dict) -> str:
    lines = [f"{r['model']} on {r['device']}, {r['steps']} steps {r['size']}, {r['requests']} requests × "
             f"{r['rounds']} alternating rounds per case; "
             f"quiet: generation p50 {r['quiet']['generation_p50_s'] * 1000:.1f} ms, /v1/models p50 "
             f"{r['quiet']['models_p50_s'] * 1000:.2f} ms"]
    for kind, f in r["flood"].items():
        lines.append(f"  {r['flooders']} clients flooding {kind} wrong keys ({f['wrong_tokens_sent']} sent): generation "
                     f"{f['generation_ratio']}x, /v1/models {f['models_ratio']}x (goal <= {r['goal_ratio_max']}x)")
    a = r["after_distinct_wrong_tokens"]
    lines.append(f"  after {a['count']} distinct wrong keys: a valid key's /v1/models p50 "
                 f"{a['valid_models_p50_s'] * 1000:.2f} ms")
    return "\n".join(lines)


@app.command("keepalive")
@handle_errors
def bench_keepalive(
    keep_alive: float = typer.Option(3.0, "--keep-alive", help="SD35_KEEP_ALIVE of the measured service, seconds"),
    cycles: int = typer.Option(3, "--cycles", help="warm requests, release, reload: this many times"),
    steps: int = typer.Option(4, "--steps"),
    size: int = typer.Option(128, "--size", help="square image side"),
    arch: Optional[str] = typer.Option(None, "--arch", help="instead: host RSS of this published transformer "
                                       "(medium, large; random weights) held, then released the service's way"),
    model: Model = None,
    precision: Precision = None,
    as_json: Json = False,
) -> None:
    """SD35_KEEP_ALIVE: service RSS/VRAM loaded vs released, first image after a release vs warm."""
    from sd35.bench import keepalive

    start(quiet=True)
    if arch:
        r = keepalive.release_rss(arch)
        print(json.dumps(r, indent=2) if as_json else f"{arch}: RSS {r['rss_loaded_bytes'] / 2**20:.0f} MiB held, "
              f"{r['rss_released_bytes'] / 2**20:.0f} MiB after release ({r['release_seconds']} s)")
        return
    r = keepalive.measure(settings(model=model, precision=precision), keep_alive=keep_alive, cycles=cycles,
                          steps=steps, size=size)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    for c in r["cycles"]:
        out.print(f"warm {c['warm_median_s'] * 1000:.0f} ms · first after release "
                  f"{c['first_after_release_s'] * 1000:.0f} ms"
                  f" · RSS {c['rss_loaded_bytes'] / 2**20:.0f} → {c['rss_released_bytes'] / 2**20:.0f} MiB"
                  f" · VRAM reserved {c['vram_reserved_loaded_bytes'] / 2**30:.2f} → "
                  f"{c['vram_reserved_released_bytes'] / 2**30:.2f} GiB", highlight=False)


def _bench_serve_ray(settings, requests: int, concurrency: int, steps: int, size: int, as_json: bool) -> None:
    try:
        from sd35.bench import ray
    except ImportError as exc:
        raise InputError(f"sd35 bench serve --ray needs Ray Serve ({exc})",
                         "install the ray extra: make setup (or pip install -c constraints.txt -e '.[ray]')") from None
    report = ray.compare(settings, requests=requests, concurrency=concurrency, steps=steps, size=size)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"{report['model']} on {report['device']}, {report['steps']} steps {report['size']}, "
              f"{report['requests']} requests from {report['concurrency']} clients:", highlight=False)
    for r in report["runs"]:
        out.print(f"  {r['replicas']} replica(s): {r['images_per_s']:.3f} images/s  p50 {r['p50_s']} s  "
                  f"p95 {r['p95_s']} s  refused {r['refused']}  (ready in {r['ready_s']} s)  "
                  f"x{report['speedup'][str(r['replicas'])]}", highlight=False)
    if report["note"]:
        out.print(f"  note: {report['note']}", highlight=False)


@app.command("break")
@handle_errors
def bench_break(
    runs: int = typer.Option(20, "--runs"),
    steps: int = typer.Option(4, "--steps"),
    model: Model = None,
    nan: bool = typer.Option(False, "--nan", help="measure SD35_BREAK=nan (finiteness checks) instead"),
    as_json: Json = False,
) -> None:
    """Cost of armed SD35_BREAK hooks that do not match, per denoising step (goal <= 1 %); --nan: of the NaN watch."""
    from sd35.bench import breaks

    start(quiet=True)
    r = breaks.break_overhead(settings(model=model), runs=runs, steps=steps, nan=nan)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    what = "modules watched for NaN/Inf" if nan else "wrappers armed"
    goal = "" if nan else " (goal <= 1 %)"
    out.print(f"{r['model']} {r['precision']} on {r['device']}: {r['wrappers_armed']} {what}, "
              f"step {r['step_ms_plain_median']} ms plain vs {r['step_ms_armed_median']} ms armed "
              f"(median of {r['runs']}): overhead {r['overhead'] * 100:+.2f} %{goal}", highlight=False)


@app.command("summary")
@handle_errors
def bench_summary(
    repeats: int = typer.Option(5, "--repeats"),
    as_json: Json = False,
) -> None:
    """Time of a debugger tensor summary for large CPU tensors (sampled over 2^20 elements; cached per stop)."""
    from sd35.bench import summary

    rows = summary.summary_time(repeats)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        out.print(f"{r['tensor']}: {r['first_ms']} ms, cached {r['cached_ms']} ms (median of {repeats})\n"
                  f"  {r['summary']}", highlight=False)


@app.command("report")
@handle_errors
def bench_report(
    out_dir: Path = typer.Option(Path("bench-report"), "--out", help="folder for index.html, the PNGs, report.json"),
    sources: Optional[list[Path]] = typer.Option(None, "--from", help="a saved `sd35 bench … --json` (or a "
                                                 "report.json) to render instead of running; repeatable"),
    only: str = typer.Option(",".join(("speed", "memory", "load", "serve", "quality")), "--only",
                             help="the benchmarks to run (without --from)"),
    model: Model = None,
    device: Optional[str] = typer.Option(None, "--device", help="[SD35_DEVICE]"),
    prompt: str = typer.Option("a bowl of ramen, studio photo", "--prompt", "-p", help="the quality grid's prompt"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The benchmarks as a page: DIR/index.html (no CDN, no JavaScript) + PNG charts + report.json."""
    try:
        import matplotlib  # noqa: F401 - the charts

        from sd35.bench import report
    except ImportError as exc:
        raise InputError(f"sd35 bench report needs matplotlib ({exc}).",
                         "install the lab extra: make setup (or pip install -c constraints.txt -e '.[lab]').") from None
    start(quiet=True)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    if not wanted or set(wanted) - set(report.SECTIONS):
        raise InputError(f"--only {only!r}: unknown benchmark(s).", f"use a subset of {','.join(report.SECTIONS)}.")
    s = settings(model=model, device=device)
    if sources:
        sections, head = report.read(sources, out_dir)
    else:
        sections, head = report.run(s, out_dir, only=wanted, prompt=prompt, seed=seed), {}
    page = report.write(out_dir, sections, head or report.header(s, sections, sources))
    err.print(f"wrote {page}", highlight=False)


app.command("speed")(bench_speed)
app.command("gpu")(bench_gpu)
app.command("lora")(bench_lora)
app.command("dynamic")(bench_dynamic)
