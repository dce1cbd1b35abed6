"""The report page: one static HTML file, inline CSS, no scripts, no remote anything.

Why every number carries `data-path`: the page prints each value exactly as report.json stores it, and the
cell says where it came from (`speed/modes/bf16/eager/step_ms_median`), so a test — or a sceptical reader —
can check the page against the data. Layout is a single column that fits a 390 px phone: images scale down,
tables are fixed-width and break long numbers rather than scroll the page.
"""

from __future__ import annotations

from html import escape

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 960px; padding: 12px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 5px; text-align: right; overflow-wrap: anywhere; }
th:first-child, td:first-child, .kv td { text-align: left; }
.kv td:first-child { width: 28%; }
.note { color: #7a5b00; background: #fff8e1; padding: 4px 8px; overflow-wrap: anywhere; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; }
.grid figure { margin: 0; border: 1px solid #ddd; padding: 6px; }
.grid figcaption { font-size: 0.8em; overflow-wrap: anywhere; }
.grid img { width: 100%; image-rendering: pixelated; }
code { overflow-wrap: anywhere; }
"""


def num(doc: dict, path: str) -> str:
    """The value at `path` ("speed/modes/bf16/…": a section, then keys or list indices) in `doc`'s sections,
    printed as stored, in a cell that names its path."""
    value = doc["sections"]
    for part in path.split("/"):
        value = value[int(part)] if isinstance(value, list) else value.get(part) if isinstance(value, dict) else None
        if value is None:
            return "<td>—</td>"
    text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    return f'<td data-path="{escape(path)}">{escape(text)}</td>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _note(text) -> str:
    return f'<p class="note">{escape(str(text))}</p>' if text else ""


def _chart(charts: dict, name: str, alt: str) -> str:
    return f'<img src="{charts[name]}" alt="{escape(alt)}">' if name in charts else ""


def _speed(doc: dict, charts: dict) -> str:
    s = doc["sections"]["speed"]
    rows = []
    for mode, row in s["modes"].items():
        if "note" in row:
            rows.append([f"<td>{escape(mode)}</td>", f'<td colspan="4">{escape(row["note"])}</td>'])
        for kind in ("eager", "compiled"):
            if kind in row:
                p = f"speed/modes/{mode}/{kind}"
                rows.append([f"<td>{escape(mode)} {kind}</td>"] + [num(doc, f"{p}/{k}") for k in
                            ("step_ms_median", "step_ms_min", "step_ms_max", "ratio_vs_bf16")])
    return (_note(s.get("note")) + _note(s.get("compiled_note")) + _chart(charts, "step-time", "step time chart")
            + _table(["mode", "median ms", "min ms", "max ms", "× bf16"], rows))


def _memory(doc: dict, charts: dict) -> str:
    m = doc["sections"].get("memory")
    rows = []
    for mode, row in (m or {}).get("modes", {}).items():
        if "note" in row:
            rows.append([f"<td>{escape(mode)}</td>", f'<td colspan="3">{escape(row["note"])}</td>'])
            continue
        rows.append([f"<td>{escape(mode)}</td>"] + [num(doc, f"memory/modes/{mode}/{k}") for k in
                    ("parameters", "ratio_vs_bf16", "buffers")])
    table = _table(["mode", "weight bytes", "× bf16", "buffer bytes"], rows) if rows else ""
    return _chart(charts, "memory", "memory chart") + table


def _load(doc: dict, charts: dict) -> str:
    rows = [[f"<td>{escape(path)}</td>"] + [num(doc, f"load/modes/{path}/{k}") for k in
            ("seconds", "rss_peak_bytes", "disk_bytes")] for path in doc["sections"]["load"]["modes"]]
    return (_chart(charts, "load", "load chart") + _table(["load path", "seconds", "peak RSS bytes", "disk bytes"], rows)
            + _note(doc["sections"]["load"].get("notes")))


def _serve(doc: dict, charts: dict) -> str:
    s = doc["sections"]["serve"]
    rows = [[num(doc, f"serve/sweep/{i}/concurrent")] + [num(doc, f"serve/sweep/{i}/{k}") for k in
            ("served_p50_s", "served_p95_s", "images_per_s")] for i in range(len(s.get("sweep", [])))]
    over = _table(["path", "p50 s", "mean s"], [
        ["<td>direct</td>", num(doc, "serve/direct_p50_s"), num(doc, "serve/direct_mean_s")],
        ["<td>HTTP</td>", num(doc, "serve/http_p50_s"), num(doc, "serve/http_mean_s")]])
    return (_chart(charts, "service", "service chart")
            + _table(["clients", "p50 s", "p95 s", "images/s"], rows) + over)


def _metric(doc: dict, mode: str, key: str, label: str) -> str:
    q = doc["sections"]["quality"]
    col = q["columns"][mode]
    if col.get(key) is None:
        why = col.get(f"{key}_missing") or ("identical images" if key == "psnr_db" else "not measured")
        why = "no local weights (above)" if key == "lpips" and why == q["lpips"]["source"] else why
        return f"<tr><td>{label}</td><td>missing: {escape(why)}</td></tr>"
    return f"<tr><td>{label}</td>{num(doc, f'quality/columns/{mode}/{key}')}</tr>"


def _quality(doc: dict, charts: dict) -> str:
    q = doc["sections"]["quality"]
    cards = []
    for mode, col in q["columns"].items():
        parts = [f"<figcaption><b>{escape(mode)}</b></figcaption>"]
        if "missing" in col and "image" not in col:
            parts.append(f"<figcaption>missing: {escape(col['missing'])}</figcaption>")
        if col.get("image"):
            parts.append(f'<img src="{escape(col["image"])}" alt="{escape(mode)} image">')
        if col.get("diff"):
            parts.append(f'<img src="{escape(col["diff"])}" alt="{escape(mode)} difference">'
                         f"<figcaption>|{escape(mode)} − bf16|, amplified ×{col['amplify']:g}</figcaption>")
        if "ssim" in col:
            parts.append("<table>" + "".join(_metric(doc, mode, k, label) for k, label in
                         (("psnr_db", "PSNR dB"), ("ssim", "SSIM"), ("lpips", "LPIPS"))) + "</table>")
        cards.append("<figure>" + "".join(parts) + "</figure>")
    intro = (f"<p>{escape(str(q['model']))}; prompt “{escape(str(q.get('prompt')))}”, seed {q['seed']}, "
             f"{q['steps']} steps; per-block error at step {q['step']}. LPIPS: "
             f"{'AlexNet v0.1 from ' if q['lpips']['available'] else 'missing: '}{escape(q['lpips']['source'])}</p>")
    warn = _note("Tiny model: random weights, the images are noise — this grid exercises the code, it says "
                 "nothing about SD3.5's quality.") if q.get("tiny") else ""
    return warn + intro + f'<div class="grid">{"".join(cards)}</div>' + _chart(charts, "per-block", "per-block error")


TITLES = {"speed": ("Step time per precision × compile mode", "sd35 bench speed --json > speed.json", _speed),
          "memory": ("Memory per precision", "sd35 bench memory --json > memory.json", _memory),
          "load": ("Load time and peak RSS per load path", "sd35 bench load --json > load.json", _load),
          "serve": ("Service latency against concurrency", "sd35 bench serve --json > serve.json", _serve),
          "quality": ("Quality: bf16 | fp8-weight | fp8", "sd35 fidelity --per-block --json > quality.json",
                      _quality)}


def _header(h: dict) -> str:
    rows = [("date", h.get("date")), ("machine", f"{h.get('machine')}, {h.get('os')}"), ("CPU", h.get("cpu")),
            ("GPU", h.get("gpu")), ("model", h.get("model")), ("architectures", h.get("architectures")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (h.get("versions") or {}).items()))]
    cells = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{cells}</table>'


def render(doc: dict, charts: dict[str, str]) -> str:
    """The page for `doc` ({"header", "sections"}) with the chart files in `charts` ({name: file})."""
    body = [f"<h1>sd35 benchmarks</h1>{_header(doc.get('header', {}))}"]
    for key, (title, command, section) in TITLES.items():
        body.append(f'<h2 id="{key}">{escape(title)}</h2>')
        if key in doc["sections"]:
            body.append(section(doc, charts))
        else:
            body.append(_note(f"not in this report: run `{command}` and pass --from {key}.json"))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>sd35 benchmarks</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
