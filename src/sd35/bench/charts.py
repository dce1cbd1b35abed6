"""The benchmark charts: one function per chart, each taking the `--json` report of its benchmark (as
`sd35 bench … --json` prints it) and returning a matplotlib Figure.

Why plain Figures built from the JSON: `sd35 bench report` saves them as PNGs for a page with no JavaScript,
notebook 03 shows the same Figures inline, and a report read back from saved JSON draws exactly what a fresh
run would. No pyplot (no global state, no backend to pick): a Figure renders anywhere.
"""

from __future__ import annotations

SIZE = (6.4, 3.4)  # inches at 100 dpi: 640 px wide, readable on a phone when scaled down
COLOURS = {"bf16": "#4c72b0", "fp8-weight": "#dd8452", "fp8": "#55a868"}


def _figure(ncols: int = 1, size=SIZE):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _scale(values) -> tuple[float, str]:
    """(divisor, unit) that keeps byte counts readable: the tiny model's weights are KB, Large's GB."""
    top = max([v for v in values if v] or [1])
    return next(((d, u) for d, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")) if top >= d), (1, "bytes"))


def _missing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def step_time(speed: dict):
    """Median step time per precision × compile mode as bars, min–max over the repeats as whiskers."""
    import numpy as np

    fig, ax = _figure()
    modes = list(speed["modes"])
    kinds = [k for k in ("eager", "compiled") if any(k in r for r in speed["modes"].values())]
    width = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        rows = [speed["modes"][m].get(kind, {}) for m in modes]
        med = np.array([r.get("step_ms_median", np.nan) for r in rows])
        lo = med - np.array([r.get("step_ms_min", r.get("step_ms_median", np.nan)) for r in rows])
        hi = np.array([r.get("step_ms_max", r.get("step_ms_median", np.nan)) for r in rows]) - med
        x = np.arange(len(modes)) + (j - (len(kinds) - 1) / 2) * width
        ax.bar(x, med, width, yerr=[lo, hi], capsize=4, label=kind, color=["#4c72b0", "#c44e52"][j % 2])
    for i, m in enumerate(modes):
        if "note" in speed["modes"][m]:
            ax.annotate("not run here", (i, 0), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("ms per step (median; whiskers min–max)")
    ax.set_title(f"Step time, {speed['arch']} at {speed['size']}² on {speed['device_name']}", fontsize=10)
    if kinds:
        ax.legend(fontsize=8)
    return fig


def peak_memory(memory: dict | None, speed: dict | None = None):
    """Weight bytes per precision (`bench memory`) and, where measured on a GPU, peak GPU memory (`bench speed`)."""
    fig, ax = _figure()
    series = {}
    if memory:
        series[f"weights, {memory['arch']} (bench memory)"] = {
            m: r["parameters"] for m, r in memory["modes"].items() if "parameters" in r}
    for kind in ("eager", "compiled"):
        peaks = {m: r[kind]["peak_gpu_bytes"] for m, r in (speed or {}).get("modes", {}).items()
                 if "peak_gpu_bytes" in r.get(kind, {})}
        if peaks:
            series[f"peak GPU, {kind} (bench speed)"] = peaks
    if not series:
        _missing(ax, "no memory figures in this report")
        return fig
    div, unit = _scale([v for s in series.values() for v in s.values()])
    modes = list(dict.fromkeys(m for s in series.values() for m in s))
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series.items()):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(modes))],
               [values.get(m, 0) / div for m in modes], width, label=name)
    ax.set_xticks(range(len(modes)), [m.replace("diffusers-layerwise-fp8", "diffusers\nlayerwise fp8") for m in modes],
                  fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title("Memory per precision", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def load_paths(load: dict):
    """Load seconds and peak host RSS per load path (`bench load`), side by side."""
    fig, (left, right) = _figure(2)
    paths = list(load["modes"])
    left.barh(paths, [load["modes"][p]["seconds"] for p in paths], color="#4c72b0")
    left.set_xlabel("seconds (load only)")
    div, unit = _scale([load["modes"][p]["rss_peak_bytes"] for p in paths])
    right.barh(paths, [load["modes"][p]["rss_peak_bytes"] / div for p in paths], color="#dd8452")
    right.set_xlabel(f"peak RSS, {unit}")
    right.set_yticks(range(len(paths)), [""] * len(paths))
    fig.suptitle(f"Loading the {load['arch']} transformer into fp8-weight, per load path", fontsize=10)
    return fig


def service(serve: dict):
    """Service latency p50/p95 against concurrency, and images/s (`bench serve`'s sweep)."""
    fig, (left, right) = _figure(2)
    rows = serve.get("sweep") or []
    if not rows:
        _missing(left, "no concurrency sweep in this report")
        _missing(right, "")
        return fig
    conc = [r["concurrent"] for r in rows]
    left.plot(conc, [r["served_p50_s"] for r in rows], marker="o", label="p50")
    left.plot(conc, [r["served_p95_s"] for r in rows], marker="s", ls="--", label="p95")
    left.set(xlabel="concurrent clients", ylabel="seconds per request", xticks=conc)
    left.legend(fontsize=8)
    right.bar([str(c) for c in conc], [r["images_per_s"] for r in rows], color="#55a868")
    right.set(xlabel="concurrent clients", ylabel="images/s")
    fig.suptitle(f"Service, {serve['model']} {serve['precision']} on {serve['device']}, {serve['steps']} steps "
                 f"{serve['size']}", fontsize=10)
    return fig


def per_block(quality: dict):
    """Each MMDiT block's relative error against bf16 at one step, image (solid) and text (dashed) streams."""
    fig, ax = _figure()
    drawn = False
    for mode, col in quality["columns"].items():
        blocks = col.get("blocks") or []
        if not blocks:
            continue
        x = [b["block"] for b in blocks]
        ax.plot(x, [b["image_rel_err"] for b in blocks], marker="o", color=COLOURS.get(mode), label=f"{mode} image")
        text = [(b["block"], b["text_rel_err"]) for b in blocks if b["text_rel_err"] is not None]
        if text:
            ax.plot(*zip(*text), marker="x", ls="--", color=COLOURS.get(mode), label=f"{mode} text")
        drawn = True
    if not drawn:
        _missing(ax, "no FP8 candidate ran here")
        return fig
    ax.set(xlabel="block", ylabel="relative L2 error vs bf16")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Per-block error at step {quality['step']} of {quality['steps']}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def quality_grid(quality: dict, images: dict):
    """The grid as one Figure (the notebook's view): each column's image above its amplified difference."""
    cols = list(quality["columns"])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(cols), 6.2), dpi=100, layout="constrained")
    grid = fig.subplots(2, len(cols), squeeze=False)
    for j, mode in enumerate(cols):
        col = quality["columns"][mode]
        top, bottom = grid[0][j], grid[1][j]
        for ax in (top, bottom):
            ax.set_axis_off()
        if "missing" in col:
            top.set_title(mode, fontsize=9)
            top.text(0.5, 0.5, col["missing"], ha="center", va="center", wrap=True, fontsize=8, transform=top.transAxes)
            continue
        top.imshow(images[mode])
        top.set_title(mode, fontsize=9)
        if f"{mode}-diff" in images:
            bottom.imshow(images[f"{mode}-diff"])
            lp = col["lpips"] if col["lpips"] is not None else "n/a"
            bottom.set_title(f"|diff| ×{col['amplify']:g}\nPSNR {col['psnr_db']} dB, SSIM {col['ssim']}, LPIPS {lp}",
                             fontsize=8)
    return fig
