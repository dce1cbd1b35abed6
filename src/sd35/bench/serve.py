"""`sd35 bench serve`: what the service adds to a generation (goal ≤ 5 %), and how it behaves under a burst.

Why a real `sd35 serve` process on loopback rather than the app in a thread: PyTorch's CPU thread pool belongs
to the thread that first uses it, so timing a second thread of the same process would measure an artefact
(about 2x slower small matmuls on CPU), not the service. Direct and HTTP calls alternate, so drift on a
shared machine hits both alike. (`--ray`, 1 vs 2 Ray Serve replicas, is `bench/ray.py`.)
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile of `values` (what p50/p95 mean in every bench report)."""
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


class _Service:
    """A `sd35 serve` child process with `settings` on a free loopback port and a one-off API key (the service
    refuses to run keyless where other accounts can log in, and auth is part of the overhead measured)."""

    def __init__(self, settings, queue_size: int, extra_env: dict | None = None):
        import os
        import secrets
        import socket
        import subprocess
        import sys
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        key = secrets.token_urlsafe(24)
        env = {**os.environ, "SD35_MODEL": settings.model, "SD35_PRECISION": settings.precision,
               "SD35_T5": settings.t5, "SD35_DEVICE": settings.device, "SD35_CACHE_DIR": str(settings.cache_dir),
               "SD35_QUEUE_SIZE": str(queue_size), "SD35_HOST": "127.0.0.1", "SD35_PORT": str(port),
               "SD35_API_KEY": key, **(extra_env or {})}
        self.url, self.auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        # Its log goes to a file: an unread pipe fills with access-log lines and would stall the server.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "sd35", "serve"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.log, text=True)

    def wait_ready(self, timeout: float = 600) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"sd35 serve exited: {self.log.read()[-2000:]}")
            try:
                req = urllib.request.Request(self.url + "/readyz", headers=self.auth)
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)

    def post(self, seed: int, *, steps: int, size: int) -> tuple[int, float]:
        """One generation over HTTP: (status code, seconds)."""
        import urllib.error
        import urllib.request

        body = json.dumps({"prompt": "benchmark prompt", "size": f"{size}x{size}", "steps": steps, "seed": seed,
                           "guidance_scale": 4.5}).encode()
        r = urllib.request.Request(self.url + "/v1/images/generations", data=body,
                                   headers={"Content-Type": "application/json", **self.auth})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(r, timeout=600) as resp:
                resp.read()
                code = resp.status
        except urllib.error.HTTPError as e:
            e.read()
            code = e.code
        return code, time.perf_counter() - t

    def stop(self) -> None:
        import signal
        import subprocess

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _burst(post, n: int, total: int | None = None) -> dict:
    """`total` (default `n`) requests from `n` clients at once, each sending its next when the last is
    answered: status counts, images/s and the served requests' p50/p95."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(post, range(total or n)))
    seconds = time.perf_counter() - t0
    ok = [lat for code, lat in results if code == 200]
    return {"concurrent": n, "requests": total or n, "seconds": round(seconds, 3),
            "status_counts": {str(c): sum(1 for x, _ in results if x == c) for c in sorted({x for x, _ in results})},
            "images_per_s": round(len(ok) / seconds, 3),
            "served_p50_s": round(percentile(ok, 0.5), 4) if ok else None,
            "served_p95_s": round(percentile(ok, 0.95), 4) if ok else None}


def _sweep(post, levels, rounds: int) -> list[dict]:
    """At each concurrency c, c closed-loop clients send `rounds` requests each (c ≤ queue size + 1: every
    request is served): latency p50/p95 and images/s against concurrency."""
    return [_burst(post, c, total=c * rounds) for c in levels]


def serve_overhead(settings, *, requests: int = 20, steps: int = 4, size: int = 128, burst: int = 16,
                   queue_size: int = 4, levels=(1, 2, 4), rounds: int = 2) -> dict:
    """Latency of `requests` sequential generations called directly (in this process, as `sd35 generate`
    does) vs. through a real `sd35 serve` process on loopback, a burst of `burst` concurrent requests
    against a queue of `queue_size`, then the concurrency sweep (`levels`, `rounds` requests per client)."""
    import statistics

    from sd35.inference import generate as gen
    from sd35.runtime import Runtime

    # 1. A real `sd35 serve` process with the same settings, on loopback.
    service = _Service(settings, queue_size)
    try:
        service.wait_ready()

        def post(seed: int):
            return service.post(seed, steps=steps, size=size)

        # 2. The same model loaded here, called directly as `sd35 generate` does.
        rt = Runtime.load(settings, breaks=[])

        def direct_call(seed: int) -> float:
            t = time.perf_counter()
            rt.generate(gen.GenerationRequest("benchmark prompt", steps=steps, guidance=4.5, height=size,
                                              width=size, seed=seed))
            return time.perf_counter() - t

        direct_call(0), post(0)  # warm-up of both paths
        # 3. Alternate direct and HTTP calls, so drift on a shared machine hits both alike.
        direct, http = [], []
        for i in range(requests):
            direct.append(direct_call(i))
            http.append(post(i)[1])
        # 4. A burst against the bounded queue.
        burst_row = _burst(post, burst)
        # 5. Latency and throughput against concurrency.
        sweep = _sweep(post, [c for c in levels if c <= queue_size + 1], rounds)
    finally:
        service.stop()

    d_mean, h_mean = statistics.mean(direct), statistics.mean(http)
    d50, h50 = percentile(direct, 0.5), percentile(http, 0.5)
    return {
        "model": settings.model, "device": rt.device, "precision": rt.loaded.plan.transformer,
        "steps": steps, "size": f"{size}x{size}", "requests": requests,
        "direct_mean_s": round(d_mean, 4), "direct_p50_s": round(d50, 4),
        "http_mean_s": round(h_mean, 4), "http_p50_s": round(h50, 4),
        "http_p95_s": round(percentile(http, 0.95), 4),
        "overhead_mean": round((h_mean - d_mean) / d_mean, 4), "overhead_p50": round((h50 - d50) / d50, 4),
        "goal_overhead_max": 0.05,
        "burst": {**burst_row, "queue_size": queue_size}, "sweep": sweep,
    }
