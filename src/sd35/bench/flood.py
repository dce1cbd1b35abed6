"""`sd35 bench serve --flood`: a valid user's latency while two clients send distinct wrong tokens.

Why: on a shared box every user arrives from 127.0.0.1 (an SSH tunnel), so per-address backoff cannot
shield a valid key from a flood — the service itself must make a wrong token cheap (service/auth.py: one
salted SHA-256 at most, inline; the scrypt of older key lines on its own limiter). This measures that promise end to end
on a real `sd35 serve` process with a real keys file: the valid user's generation and /v1/models latency
without and with the flood, in alternating rounds (goal: at most 1.2x), and, after 5,000 distinct wrong tokens, how long a
valid key takes to authenticate (goal: milliseconds).

Two kinds of wrong token are sent: `sd35_<id>_<secret>` with a key id that exists (one SHA-256 each: a
teammate who knows their own id) and random ones (no hashing at all).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

GOAL_RATIO = 1.2


def _call(url: str, token: str, body: dict | None = None) -> tuple[int, float]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {token}",
                                                          "Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        e.read()
        code = e.code
    return code, time.perf_counter() - t


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _flooded(measure, url: str, make, flooders: int) -> int:
    """Run `measure()` while `flooders` clients send wrong tokens made by `make` as fast as they are answered;
    returns how many they sent."""
    stop, sent = threading.Event(), [0]

    def flood():
        while not stop.is_set():
            try:
                _call(url + "/v1/models", make())
                sent[0] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(flooders)]
    for t in threads:
        t.start()
    try:
        measure()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    return sent[0]


def wrong_token_flood(settings, *, requests: int = 10, steps: int = 4, size: int = 128, flooders: int = 2,
                      distinct: int = 5000, rounds: int = 3) -> dict:
    """The measurement (docstring above). Returns a JSON-able report."""
    from sd35.service import auth

    # 1. A keys file with one valid key, and a real `sd35 serve` on a free loopback port.
    work = Path(tempfile.mkdtemp(prefix="sd35-bench-flood-"))
    keys = work / "api-keys"
    valid = auth.add(keys, "valid-user")
    known_id = valid.split("_")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SD35_MODEL": settings.model, "SD35_PRECISION": settings.precision,
           "SD35_DEVICE": settings.device, "SD35_CACHE_DIR": str(settings.cache_dir), "SD35_HOST": "127.0.0.1",
           "SD35_PORT": str(port), "SD35_API_KEYS_FILE": str(keys), "SD35_API_KEY": ""}
    log_file = (work / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sd35", "serve"], env=env, cwd=work, stdout=subprocess.DEVNULL,
                            stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    gen = {"prompt": "benchmark prompt", "size": f"{size}x{size}", "steps": steps, "seed": 0}

    def user_round(into: dict) -> None:
        g = [_call(url + "/v1/images/generations", valid, gen) for _ in range(requests)]
        m = [_call(url + "/v1/models", valid) for _ in range(requests)]
        assert all(c == 200 for c, _ in g + m), (g, m)
        into.setdefault("generation", []).extend(t for _, t in g)
        into.setdefault("models", []).extend(t for _, t in m)

    def summary(samples: dict) -> dict:
        return {"generation_p50_s": round(_p50(samples["generation"]), 4),
                "models_p50_s": round(_p50(samples["models"]), 5)}

    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"sd35 serve did not become ready: {(work / 'serve.log').read_text()[-2000:]}")
            try:
                if _call(url + "/readyz", valid)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        # 2. Once ready: a warm-up, then quiet and flooded rounds.
        user_round({})  # warm-up (the valid key's first check, the pipeline's first run)
        # Quiet and flooded rounds alternate (`rounds` times), so drift on a shared machine hits all alike.
        kinds = {"known_id": lambda: f"sd35_{known_id}_{secrets.token_urlsafe(32)}",
                 "random": lambda: f"sd35_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"}
        samples: dict = {"quiet": {}, **{kind: {} for kind in kinds}}
        sent = {kind: 0 for kind in kinds}
        for _ in range(rounds):
            user_round(samples["quiet"])
            for kind, make in kinds.items():
                sent[kind] += _flooded(lambda: user_round(samples[kind]), url, make, flooders)
        quiet = summary(samples["quiet"])
        results = {}
        for kind in kinds:
            results[kind] = {**summary(samples[kind]), "wrong_tokens_sent": sent[kind]}
            results[kind]["generation_ratio"] = round(results[kind]["generation_p50_s"] / quiet["generation_p50_s"], 3)
            results[kind]["models_ratio"] = round(results[kind]["models_p50_s"] / quiet["models_p50_s"], 3)
        # 3. After `distinct` distinct wrong tokens (16 clients; the service paces them: app.WRONG_KEYS_PER_S): a valid
        # key is still a cache hit
        from concurrent.futures import ThreadPoolExecutor

        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: _call(url + "/v1/models", f"sd35_{known_id if _ % 2 else secrets.token_hex(6)}_"
                                                         f"{secrets.token_urlsafe(32)}"), range(distinct)))
        distinct_s = time.perf_counter() - t
        after = [_call(url + "/v1/models", valid)[1] for _ in range(20)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
    return {"model": settings.model, "device": settings.device, "steps": steps, "size": f"{size}x{size}",
            "requests": requests, "rounds": rounds, "flooders": flooders, "quiet": quiet, "flood": results,
            "after_distinct_wrong_tokens": {"count": distinct, "seconds": round(distinct_s, 1),
                                            "answered_per_s": round(distinct / distinct_s, 1),
                                            "valid_models_p50_s": round(_p50(after), 5)},
            "goal_ratio_max": GOAL_RATIO}
