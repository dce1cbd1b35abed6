"""`sd35 bench serve --flood`: a valid user's latency while two clients send distinct wrong tokens.

Why: on a shared box every user arrives from 127.0.0.1 (an SSH tunnel), so per-address backoff cannot
shield a valid key from a flood — the service itself must make a wrong token cheap (service/auth.py: one
salted SHA-256 at most, inline; the scrypt of older key lines on its own limiter). This measures that promise end to end
on a real `sd35 serve` process with a real keys file: the valid user's generation and /v1/models latency
without and with the flood (goal: at most 1.2x), and, after 5,000 distinct wrong tokens, how long a
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


def wrong_token_flood(settings, *, requests: int = 10, steps: int = 4, size: int = 128, flooders: int = 2,
                      distinct: int = 5000) -> dict:
    """The measurement (docstring above). Returns a JSON-able report."""
    from sd35.service import auth

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

    def user_round() -> dict:
        g = [_call(url + "/v1/images/generations", valid, gen) for _ in range(requests)]
        m = [_call(url + "/v1/models", valid) for _ in range(requests)]
        assert all(c == 200 for c, _ in g + m), (g, m)
        return {"generation_p50_s": round(_p50([t for _, t in g]), 4), "models_p50_s": round(_p50([t for _, t in m]), 5)}

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
        user_round()  # warm-up (the valid key's first check, the pipeline's first run)
        quiet = user_round()
        results = {}
        for kind, make in (("known_id", lambda: f"sd35_{known_id}_{secrets.token_urlsafe(32)}"),
                           ("random", lambda: f"sd35_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}")):
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
                results[kind] = {**user_round()}
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
            results[kind]["wrong_tokens_sent"] = sent[0]
            results[kind]["generation_ratio"] = round(results[kind]["generation_p50_s"] / quiet["generation_p50_s"], 3)
            results[kind]["models_ratio"] = round(results[kind]["models_p50_s"] / quiet["models_p50_s"], 3)
        # after `distinct` distinct wrong tokens: a valid key is still a cache hit
        for _ in range(distinct):
            _call(url + "/v1/models", f"sd35_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}")
        after = [_call(url + "/v1/models", valid)[1] for _ in range(20)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
    return {"model": settings.model, "device": settings.device, "steps": steps, "size": f"{size}x{size}",
            "requests": requests, "flooders": flooders, "quiet": quiet, "flood": results,
            "after_distinct_wrong_tokens": {"count": distinct, "valid_models_p50_s": round(_p50(after), 5)},
            "goal_ratio_max": GOAL_RATIO}
