"""`sd35 bench serve --ray`: the same load against 1 and then 2 Ray Serve replicas, side by side.

Why a closed loop (each client sends its next request when the last one is answered, and waits out a 429's
Retry-After): throughput with more replicas is only comparable when both runs do the same work. An open
burst would just measure how many requests each queue refuses.

What the ratio means: each replica is one GPU worker. On a box with 2+ GPUs, 2 replicas should approach 2x
the images/s of one; on a CPU-only machine the replicas share the same cores (on 2 cores the ratio says
little: PyTorch in one replica already uses both).
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from sd35.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _load(url: str, key: str, *, requests: int, concurrency: int, steps: int, size: int) -> dict:
    """`requests` generations from `concurrency` closed-loop clients; 429/503 are retried after Retry-After."""
    import httpx

    body = {"prompt": "a lighthouse at dusk, oil painting", "size": f"{size}x{size}", "steps": steps}
    latencies: list[float] = []
    refused = {"429": 0, "503": 0}
    left = list(range(requests))

    def client(_: int) -> None:
        with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {key}"}) as http:
            while left:
                try:
                    seed = left.pop()
                except IndexError:
                    return
                while True:
                    t = time.perf_counter()
                    r = http.post(url + "/v1/images/generations", json={**body, "seed": seed})
                    if r.status_code in (429, 503):
                        refused[str(r.status_code)] += 1
                        time.sleep(min(float(r.headers.get("retry-after") or 1), 2.0))
                        continue
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - t)
                    break

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    seconds = time.perf_counter() - t0
    return {"images": len(latencies), "seconds": round(seconds, 3), "images_per_s": round(len(latencies) / seconds, 3),
            "p50_s": round(_percentile(latencies, 0.5), 3), "p95_s": round(_percentile(latencies, 0.95), 3),
            "mean_s": round(statistics.mean(latencies), 3), "refused": refused}


def compare(settings: Settings, *, replicas: tuple[int, ...] = (1, 2), requests: int = 16, concurrency: int = 4,
            steps: int = 4, size: int = 128) -> dict:
    """Start a loopback single-node Ray here, run the same load against each replica count, stop it."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single node, everything on 127.0.0.1
    import ray
    from ray import serve
    from ray._private import ray_constants

    from sd35.service import ray_app

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set

    key = secrets.token_urlsafe(24)
    env = ray_app.collect_env()
    env.update({"SD35_API_KEY": key, "SD35_WARMUP": "1"})
    env.pop("SD35_API_KEYS_FILE", None)
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=max(cpus, max(replicas) * settings.ray_cpus), include_dashboard=False,
             log_to_driver=False, namespace="sd35-bench", object_store_memory=200 * 1024 * 1024)
    runs = []
    try:
        # A port found free can be taken by one of Ray's own processes before Serve's proxy binds it: try again.
        for attempt in range(4):
            port = _free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                break
            except Exception as exc:  # noqa: BLE001 - ray wraps the proxy's bind error
                if "Failed to bind" not in str(exc) or attempt == 3:
                    raise
                serve.shutdown()
        url = f"http://127.0.0.1:{port}"
        gpus = None
        for n in replicas:
            s = settings.model_copy(update={"ray_replicas": n, "ray_max_replicas": n, "host": "127.0.0.1",
                                            "port": port})
            t = time.perf_counter()
            serve.run(ray_app.build(s, env), name=ray_app.APP_NAME, route_prefix="/")
            ready_s = time.perf_counter() - t
            gpus = ray_app.use_gpus(s)
            result = _load(url, key, requests=requests, concurrency=concurrency, steps=steps, size=size)
            runs.append({"replicas": n, "ready_s": round(ready_s, 2), **result})
            serve.delete(ray_app.APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    base = runs[0]["images_per_s"] or 1e-9
    return {"model": settings.model, "device": "one GPU per replica" if gpus else f"CPU ({cpus} cores, shared)",
            "steps": steps, "size": f"{size}x{size}", "requests": requests, "concurrency": concurrency,
            "runs": runs, "speedup": {str(r["replicas"]): round(r["images_per_s"] / base, 3) for r in runs},
            "note": None if gpus else "CPU replicas share the same cores: the ratio says little here; run it on a "
                                      "box with 2+ GPUs"}
