"""`sd35 bench serve --batch-window MS`: images/s and p50/p95 at 8 concurrent clients, without and with
batching across requests (SD35_BATCH_WINDOW_MS), and how far each batched image is from the same request
served unbatched (PSNR).

Why two real `sd35 serve` processes, one after the other: the same reasons as serve.py (a thread of this
process would time PyTorch's thread pool, not the service), and never side by side, so each has the machine
to itself. Every client sends its own prompt and seed, so the batches mix prompts the way a team's do; the
same (prompt, seed) goes to both services, so each image has a twin to compare with.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

from sd35.bench.serve import _Service, percentile
from sd35.errors import InputError

PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, studio light", "a city street in rain",
           "an astronaut riding a horse", "a watercolor of a forest", "a macro photo of a bee", "a castle on a hill")


def _post(service: _Service, i: int, *, steps: int, size: int) -> dict:
    """Request i (its own prompt and seed): status, seconds, the PNG and the batch it shared."""
    import urllib.error
    import urllib.request

    body = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "size": f"{size}x{size}", "steps": steps, "seed": i,
                       "guidance_scale": 4.5, "output_format": "png"}).encode()
    r = urllib.request.Request(service.url + "/v1/images/generations", data=body,
                               headers={"Content-Type": "application/json", **service.auth})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(r, timeout=600) as resp:
            answer = json.loads(resp.read())
            code = resp.status
    except urllib.error.HTTPError as e:
        e.read()
        return {"code": e.code, "seconds": time.perf_counter() - t}
    return {"code": code, "seconds": time.perf_counter() - t, "png": base64.b64decode(answer["data"][0]["b64_json"]),
            "batch": answer["sd35"].get("batch")}


def _psnr(a: bytes, b: bytes) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _case(settings, window_ms: int, *, clients: int, requests: int, steps: int, size: int,
          max_images: int) -> tuple[dict, dict]:
    service = _Service(settings, queue_size=2 * clients, extra_env={
        "SD35_BATCH_WINDOW_MS": str(window_ms), "SD35_MAX_IMAGES": str(max_images), "SD35_QUEUE_PER_KEY": "0"})
    try:
        service.wait_ready()
        for i in range(2):  # warm-up: alone, then (with the window) as a batch of clients
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda k: _post(service, 10_000 + k, steps=steps, size=size), range(clients if i else 1)))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:  # closed loop: each client sends its next when answered
            answers = list(pool.map(lambda i: _post(service, i, steps=steps, size=size), range(requests)))
        seconds = time.perf_counter() - t0
    finally:
        service.stop()
    ok = [a for a in answers if a["code"] == 200]
    latencies = [a["seconds"] for a in ok]
    shared = [a["batch"]["requests"] if a.get("batch") else 1 for a in ok]
    row = {"batch_window_ms": window_ms, "requests": requests, "seconds": round(seconds, 3),
           "status_counts": {str(c): sum(1 for a in answers if a["code"] == c) for c in {a["code"] for a in answers}},
           "images_per_s": round(len(ok) / seconds, 3),
           "p50_s": round(percentile(latencies, 0.5), 4) if ok else None,
           "p95_s": round(percentile(latencies, 0.95), 4) if ok else None,
           "mean_requests_per_batch": round(sum(shared) / len(shared), 2) if shared else None}
    return row, {i: a["png"] for i, a in enumerate(answers) if a["code"] == 200}


def batch_window(settings, *, window_ms: int, clients: int = 8, requests: int = 24, steps: int = 4,
                 size: int = 128, max_images: int = 8) -> dict:
    """`requests` generations from `clients` closed-loop clients against a service without batching, then
    one with SD35_BATCH_WINDOW_MS=`window_ms` (SD35_MAX_IMAGES=`max_images`); the same requests both times."""
    from sd35.runtime import precheck

    if clients < 1 or requests < clients:
        raise InputError(f"--clients {clients} and --requests {requests}: need 1 <= clients <= requests.",
                         f"pass --clients 8 --requests {max(24, clients)}.")
    precheck(settings, prompt=PROMPTS[0], steps=steps, guidance=4.5, height=size, width=size, seed=0)  # before loads
    off, off_png = _case(settings, 0, clients=clients, requests=requests, steps=steps, size=size,
                         max_images=max_images)
    on, on_png = _case(settings, window_ms, clients=clients, requests=requests, steps=steps, size=size,
                       max_images=max_images)
    scores = [_psnr(off_png[i], on_png[i]) for i in sorted(set(off_png) & set(on_png))]
    finite = [s for s in scores if math.isfinite(s)]
    return {
        "model": settings.model, "precision": settings.precision, "device": settings.device,
        "steps": steps, "size": f"{size}x{size}", "clients": clients, "max_images": max_images,
        "unbatched": off, "batched": on,
        "speedup_images_per_s": round(on["images_per_s"] / off["images_per_s"], 3) if off["images_per_s"] else None,
        "psnr_vs_unbatched": {"images": len(scores), "identical": len(scores) - len(finite),
                              "min_db": round(min(finite), 2) if finite else None,
                              "mean_db": round(sum(finite) / len(finite), 2) if finite else None},
    }
