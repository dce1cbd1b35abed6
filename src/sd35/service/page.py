"""The team's web page: `GET /` on `sd35 serve` — try prompts on the shared GPU from a browser.

Why in the service and not a Gradio demo beside it: one process, one port, one auth, one queue. The page is
a client of the public API like any other (`POST /v1/images/generations` with `stream: true`, the same
Bearer key, the same 4xx/429 answers), so what a teammate sees in the browser is what the SDKs get.

Why three static files and no build step: the GPU box may have no internet and nobody wants a node
toolchain on it. index.html + app.js + style.css ship inside the package (pyproject's package data), are
served from here, and a Content-Security-Policy of `default-src 'self'` makes any stray CDN link fail loudly.

Auth: the page is static and holds no secrets, so exactly its paths (PAGE_PATHS) are open; the key the
user types stays in the browser's sessionStorage and goes only into the API calls' Authorization header.
`/page/config.json` tells the page whether to ask for a key at all.
"""

from __future__ import annotations

import math
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sd35.inference import generate as gen

router = APIRouter(include_in_schema=False)

# file name -> media type; only these are served (no directory listing, no path tricks).
ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "edit.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "icon.svg": "image/svg+xml"}
# The open (no API key) paths: the page, its assets and whether it must ask for a key. Nothing else.
PAGE_PATHS = frozenset({"/", "/page/config.json", *(f"/page/{name}" for name in ASSETS)})
_HEADERS = {
    # Every byte from this service: blocks CDNs, inline scripts and framing by other sites.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded service serves its own page, not a stale one
}
# Aspect ratios offered as presets, at the model's own pixel count (SD3.5: 1024x1024 = 1 MP).
RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


def _asset(name: str) -> bytes:
    return resources.files("sd35.service").joinpath("static", name).read_bytes()


def needs_key(keys) -> bool:
    """Whether API calls need `Authorization: Bearer …` (the page then shows its API key field): any key in
    the service's key ring (SD35_API_KEYS_FILE's people, or SD35_API_KEY)."""
    return bool(keys)


@router.get("/")
async def index():
    return Response(_asset("index.html"), media_type=ASSETS["index.html"], headers=_HEADERS)


@router.get("/page/config.json")
async def page_config(request: Request):
    """Open on purpose: tells the page whether to ask for a key. Holds no secret and no model detail."""
    return JSONResponse({"auth_required": needs_key(request.app.state.keys)}, headers=_HEADERS)


@router.get("/page/{name}")
async def asset(name: str):
    if name not in ASSETS or name == "index.html":
        return JSONResponse({"error": {"message": f"no page asset {name!r}", "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}}, status_code=404)
    return Response(_asset(name), media_type=ASSETS[name], headers=_HEADERS)


def supported_sizes(info, max_pixels: int) -> list[str]:
    """Size presets for a model: its default size first, then common aspect ratios at the same pixel count
    (rounded to the size multiple, within max_side and SD35_MAX_PIXELS), then a half-side draft size."""
    d, m = info.sampling, info.size_multiple
    area = min(d.width * d.height, max_pixels)

    def fit(w: float, h: float) -> str | None:
        w, h = max(gen.MIN_SIZE, round(w / m) * m), max(gen.MIN_SIZE, round(h / m) * m)
        if w * h > max_pixels:  # rounding up went over the limit: round down instead
            scale = math.sqrt(max_pixels / (w * h))
            w, h = max(gen.MIN_SIZE, math.floor(w * scale / m) * m), max(gen.MIN_SIZE, math.floor(h * scale / m) * m)
        if max(w, h) > info.max_side or w * h > max_pixels:
            return None
        return f"{w}x{h}"

    sizes = [fit(d.width, d.height) if d.width * d.height <= max_pixels else None]
    sizes += [fit(math.sqrt(area * a / b), math.sqrt(area * b / a)) for a, b in RATIOS]
    sizes.append(fit(d.width / 2, d.height / 2))
    return list(dict.fromkeys(s for s in sizes if s))


def model_card(settings, worker) -> dict:
    """sd35's extension of GET /v1/models/{id}: what a client may ask of the loaded model (the page
    builds its size presets and field bounds from it). `ready: false` while the model loads."""
    card = {"ready": worker.state == "ready", "state": worker.state, "max_pixels": settings.max_pixels,
            "max_steps": settings.max_steps, "max_n": 10, "max_partial_images": 3}
    runtime = getattr(worker, "runtime", None)
    if worker.state == "ready" and runtime is not None:
        info, d = runtime.info, runtime.info.sampling
        card.update(family=info.family, size_multiple=info.size_multiple, max_side=info.max_side,
                    min_side=gen.MIN_SIZE, sizes=supported_sizes(info, settings.max_pixels),
                    defaults={"size": f"{d.width}x{d.height}", "steps": min(d.steps, settings.max_steps),
                              "guidance_scale": d.guidance})
    return card
