"""`sd35 bench report`: the benchmarks as a page people can look at — `DIR/index.html` (no CDN, no JavaScript),
the charts as PNGs beside it, the quality grid's images, and `DIR/report.json` with every number shown.

Why one report from many benchmarks: a choice between precisions is a trade of step time, memory, load time,
service latency and image quality, and the numbers were scattered across docs/benchmarks.md as text. It runs
the benchmarks (short settings on a CPU, where they exercise the code path and say so), or reads their saved
`--json` output (`--from`, recognised by shape), so a GPU run can be rendered anywhere. Every number on the
page is a value of report.json, printed as stored; a missing one says why.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

SECTIONS = ("speed", "memory", "load", "serve", "quality")


def kind_of(doc) -> str | None:
    """Which benchmark printed `doc` (its `--json`), by the keys only it has; None if none we chart."""
    if not isinstance(doc, dict):
        return None
    for kind, keys in (("report", {"sections", "header"}), ("memory", {"kept_bf16", "modes"}),
                       ("load", {"prequantized_vs_bf16_quantize"}), ("speed", {"compile_cache_dir", "modes"}),
                       ("serve", {"http_p50_s", "burst"}), ("quality", {"columns", "lpips"}),
                       ("fidelity", {"blocks", "candidate", "reference"})):
        if keys <= doc.keys():
            return kind
    return None


def _from_fidelity(doc: dict) -> dict:
    """`sd35 fidelity --per-block --json` as a quality section: the per-block errors, no images."""
    cand = doc["candidate"]
    image = doc.get("image", {})
    return {"model": doc["model"], "tiny": doc["model"] == "tiny", "device": doc["device"], "prompt": None,
            "seed": doc["seed"], "steps": doc["steps"], "step": doc["step"], "size": None,
            "lpips": {"available": False, "source": "not measured by sd35 fidelity"},
            "columns": {"bf16": {"precision": "bf16", "missing": "images are not in sd35 fidelity's JSON"},
                        cand: {"precision": cand, "psnr_db": image.get("psnr_db"), "ssim": image.get("ssim"),
                               "rel_err": image.get("rel_err"), "lpips": None,
                               "lpips_missing": "not measured by sd35 fidelity", "blocks": doc["blocks"]}}}


def read(paths: list[Path], out: Path) -> tuple[dict, dict]:
    """Sections from saved `--json` files (a later file replaces an earlier one's section), and a header if
    one of them is a previous report; that report's images are copied into `out`."""
    from sd35.errors import InputError

    sections, header = {}, {}
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--from {path}: not a readable JSON file ({exc}).",
                             "pass the output of `sd35 bench … --json` or a report.json.") from None
        kind = kind_of(doc)
        if kind is None:
            raise InputError(f"--from {path}: not the --json of a benchmark the report charts.",
                             f"pass the --json of sd35 bench {' | '.join(SECTIONS[:4])}, sd35 fidelity "
                             "--per-block, or a report.json.")
        if kind == "report":
            sections.update(doc["sections"])
            header = doc["header"]
            for f in Path(path).parent.glob("quality-*.png"):
                out.mkdir(parents=True, exist_ok=True)
                if f.resolve() != (out / f.name).resolve():
                    shutil.copy(f, out / f.name)
        else:
            sections["quality" if kind == "fidelity" else kind] = _from_fidelity(doc) if kind == "fidelity" else doc
    return sections, header


def plan(device: str) -> dict:
    """What a fresh run measures: short, tiny-model settings on a CPU (they exercise every code path; the
    page says they are not GPU figures), the medium architecture at 1024² on a GPU."""
    if device.startswith("cuda"):
        return {"arch": "medium", "size": 1024, "repeats": 10, "compiled": True,
                "serve": {"requests": 10, "burst": 8, "queue_size": 4, "levels": (1, 2, 4), "rounds": 2, "size": 1024}}
    return {"arch": "tiny", "size": 128, "repeats": 3, "compiled": False,
            "serve": {"requests": 2, "burst": 3, "queue_size": 2, "levels": (1, 2), "rounds": 1, "steps": 2,
                      "size": 128}}


def run(settings, out: Path, *, only=SECTIONS, prompt: str = "a bowl of ramen, studio photo", seed: int = 0,
        steps: int | None = None) -> dict:
    """Run the benchmarks in `only` with `plan(device)`, in this order: 1. speed, 2. memory, 3. load,
    4. serve, 5. quality (its images written into `out`). Returns the sections."""
    import tempfile

    from sd35.bench import load, memory, quality, serve, speed
    from sd35.hardware import detect

    p = plan(detect(settings.device).device)
    sections: dict = {}
    clock = {"t": time.perf_counter()}

    def took(name: str) -> None:  # each section records its own wall time (what a report run costs)
        now = time.perf_counter()
        sections[name]["report_seconds"] = round(now - clock["t"], 1)
        clock["t"] = now

    if "speed" in only:
        sections["speed"] = speed.speed(p["arch"], p["size"], compiled=p["compiled"], repeats=p["repeats"])
        if not p["compiled"]:
            sections["speed"]["compiled_note"] = "compiled runs are GPU-only in a report (CPU inductor takes minutes)"
        took("speed")
    if "memory" in only:
        sections["memory"] = memory.memory(p["arch"])
        took("memory")
    if "load" in only:
        with tempfile.TemporaryDirectory(prefix="sd35-report-load-") as work:
            sections["load"] = load.load_modes(p["arch"], work)
        took("load")
    if "serve" in only:
        sections["serve"] = serve.serve_overhead(settings, **p["serve"])
        took("serve")
    if "quality" in only:
        report, images = quality.run(settings, prompt=prompt, seed=seed, steps=steps)
        quality.save_images(report, images, out)
        sections["quality"] = report
        took("quality")
    return sections


def header(settings, sections: dict, sources: list[Path] | None = None) -> dict:
    """The machine, its GPU or CPU, the versions, what model the figures come from, and the date. Rendered
    from saved JSON (`sources`), this machine is not the one measured: only what the JSON records is shown."""
    import os
    import platform

    import torch

    from sd35.weights.store import versions

    q = sections.get("quality", {})
    archs = sorted({s["arch"] for k, s in sections.items() if k in ("speed", "memory", "load")})
    common = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": q.get("model") or ("—" if sources else settings.model),
              "architectures": ", ".join(f"{a} (random weights)" for a in archs) or "—"}
    if sources:
        recorded = sections.get("speed", {})
        return {**common, "machine": f"not recorded: rendered from {', '.join(p.name for p in sources)}",
                "os": "—", "cpu": "—", "gpu": recorded.get("device_name", "not recorded"),
                "versions": recorded.get("versions") or sections.get("load", {}).get("versions", {})}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
               platform.processor() or platform.machine())
    return {**common, "machine": platform.machine(), "os": platform.platform(terse=True),
            "cpu": f"{cpu} ({os.cpu_count()} cores)", "gpu": gpu or "none",
            "versions": {"python": platform.python_version(), **versions()}}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def charts(sections: dict, out: Path) -> dict[str, str]:
    """Each chart the sections allow, saved as `out/<name>.png`: {name: file name}."""
    from sd35.bench import charts as c

    figures = {}
    if "speed" in sections:
        figures["step-time"] = c.step_time(sections["speed"])
    if "memory" in sections or "speed" in sections:
        figures["memory"] = c.peak_memory(sections.get("memory"), sections.get("speed"))
    if "load" in sections:
        figures["load"] = c.load_paths(sections["load"])
    if "serve" in sections:
        figures["service"] = c.service(sections["serve"])
    if "quality" in sections:
        figures["per-block"] = c.per_block(sections["quality"])
    names = {}
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
        names[name] = f"{name}.png"
    return names


def write(out: Path, sections: dict, head: dict) -> Path:
    """`out/report.json`, the chart PNGs and `out/index.html`; returns the page's path."""
    from sd35.bench import html

    out.mkdir(parents=True, exist_ok=True)
    doc = {"header": head, "sections": sections}
    (out / "report.json").write_text(json.dumps(doc, indent=2))
    page = out / "index.html"
    page.write_text(html.render(doc, charts(sections, out)))
    return page
