"""`sd35 bench keepalive`: what SD35_KEEP_ALIVE gives back and what it costs — the service process's RSS
(and GPU memory) loaded vs released, and the first image after a release vs a warm request.

Why a real `sd35 serve` process: RSS is a process's number, and only a separate process shows what the
release really returns to the OS (malloc_trim included). VRAM is the service's own
sd35_gpu_memory_reserved_bytes (0 on a CPU) plus nvidia-smi's per-process figure where there is one.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

from sd35.bench.serve import _Service


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _get(service, path: str) -> tuple[int, str]:
    req = urllib.request.Request(service.url + path, headers=service.auth)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read().decode()


def _vram(service) -> float:
    text = _get(service, "/metrics")[1]
    for line in text.splitlines():
        if line.startswith("sd35_gpu_memory_reserved_bytes "):
            return float(line.split()[1])
    return 0.0


def _wait_released(service, timeout: float) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if json.loads(_get(service, "/readyz")[1]).get("loaded") is False:
            return time.perf_counter() - t
        time.sleep(0.1)
    raise RuntimeError(f"the model was not released within {timeout:g} s")


def measure(settings, *, keep_alive: float = 3.0, cycles: int = 3, warm: int = 5, steps: int = 4,
            size: int = 128) -> dict:
    """`cycles` times: `warm` warm requests, wait for the release, one request that reloads."""
    # 1. A real service that releases after `keep_alive` idle seconds.
    service = _Service(settings, queue_size=4, extra_env={"SD35_KEEP_ALIVE": f"{keep_alive:g}s"})
    try:
        service.wait_ready()
        pid = service.proc.pid
        rows = []
        for cycle in range(cycles):
            # 2. Warm requests (the first of the first cycle also warms the HTTP path).
            warm_s = [service.post(cycle * 100 + i, steps=steps, size=size)[1] for i in range(warm)]
            rss_loaded, vram_loaded = _rss(pid), _vram(service)
            # 3. Idle until released; then what the process holds.
            _wait_released(service, keep_alive + 60)
            time.sleep(0.5)
            rss_released, vram_released = _rss(pid), _vram(service)
            # 4. The next request reloads the model.
            code, first_s = service.post(cycle * 100 + 99, steps=steps, size=size)
            if code != 200:
                raise RuntimeError(f"the request after the release got HTTP {code}")
            rows.append({"warm_median_s": round(statistics.median(warm_s[1:] or warm_s), 4),
                         "first_after_release_s": round(first_s, 4),
                         "rss_loaded_bytes": rss_loaded, "rss_released_bytes": rss_released,
                         "vram_reserved_loaded_bytes": vram_loaded, "vram_reserved_released_bytes": vram_released})
        return {"model": settings.model, "precision": settings.precision, "device": settings.device,
                "keep_alive_s": keep_alive, "steps": steps, "size": f"{size}x{size}", "cycles": rows,
                "rss_drop_bytes": int(statistics.median(r["rss_loaded_bytes"] - r["rss_released_bytes"] for r in rows)),
                "first_after_release_vs_warm_s": round(statistics.median(
                    r["first_after_release_s"] - r["warm_median_s"] for r in rows), 4)}
    finally:
        service.stop()


def release_rss(arch: str = "medium") -> dict:
    """Host RSS of a published transformer architecture (random bf16 weights, `bench/arch.py`) held as a
    runtime holds its pipeline, then released by the service's own KeepAlive.release: what a release gives
    back to the OS, without a gated download. (The tiny model's weights are a few MB: its RSS is torch.)"""
    import dataclasses
    from types import SimpleNamespace

    from sd35.bench.arch import build_transformer
    from sd35.service.keepalive import KeepAlive, rss_bytes

    @dataclasses.dataclass
    class Loaded:
        pipe: object

    before = rss_bytes()
    pipe = SimpleNamespace(transformer=build_transformer(arch), tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    loaded = rss_bytes()
    worker = SimpleNamespace(runtime=SimpleNamespace(loaded=Loaded(pipe), harness=None,
                                                     compile=SimpleNamespace(mode="off")),
                             settings=SimpleNamespace(keep_alive="0"))
    del pipe
    keep = KeepAlive(SimpleNamespace(keep_alive="0"))
    keep.release(worker)
    return {"arch": arch, "rss_before_bytes": before, "rss_loaded_bytes": loaded, "rss_released_bytes": rss_bytes(),
            "release_seconds": keep.last_release["release_seconds"]}
