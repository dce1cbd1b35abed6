"""`sd35 serve` over real loopback HTTP on the tiny model: the official openai client, hostile input,
bursts, OOM, timeouts, auth, SIGTERM drain, sd_notify, and the systemd unit."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from helpers import free_port, read_in_background, sd35_cmd

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"


def call(url: str, method: str = "GET", body=None, headers=None, key: str | None = KEY, timeout: float = 60):
    """One HTTP request; returns (status, headers, parsed JSON or text)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, e.headers
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


class InProcessServer:
    """uvicorn in a thread, serving create_app(settings) on a free loopback port."""

    def __init__(self, settings):
        import uvicorn

        from sd35.service.app import create_app

        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if call(self.url + "/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("service did not become ready")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from sd35.weights import tiny
    from sd35.settings import Settings

    cache = tmp_path_factory.mktemp("svc-cache")
    tiny.ensure(cache)
    settings = Settings(_env_file=None, model="tiny", cache_dir=cache, device="cpu", port=free_port(), api_key=KEY,
                        queue_size=2, max_pixels=512 * 512, max_images=4, max_steps=400, request_timeout=60)
    with InProcessServer(settings) as srv:
        yield srv


def test_openai_client_generates_two_images(service):
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(prompt="a red cube", n=2, size="128x128", response_format="b64_json",
                                    extra_body={"seed": 11, "steps": 2, "guidance_scale": 3.0})
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert img.size == (128, 128) and img.format == "PNG"
    assert result.data[0].b64_json != result.data[1].b64_json
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_same_seed_same_image_over_http(service):
    body = {"prompt": "a cube", "size": "128x128", "seed": 5, "steps": 2}
    a, b = call(service.url + "/v1/images/generations", "POST", body), call(service.url + "/v1/images/generations",
                                                                             "POST", body)
    assert a[0] == b[0] == 200 and a[2]["data"][0]["b64_json"] == b[2]["data"][0]["b64_json"]
    assert a[2]["sd35"]["seed"] == 5 and a[2]["sd35"]["precision"] == "fp8-weight"
    assert "random weights" in a[2]["sd35"]["notice"]


HOSTILE = [
    ({"prompt": "x", "size": "128"}, 400, "size"),
    ({"prompt": "x", "size": "100x100"}, 400, "size"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ({"prompt": "x", "size": "-128x128"}, 400, "size"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 1000000}, 400, "n"),
    ({"prompt": "x", "n": "two"}, 400, "n"),
    ({"prompt": "x", "steps": 0}, 400, "steps"),
    ({"prompt": "x", "steps": 10**9}, 400, "steps"),
    ({"prompt": "x", "guidance_scale": 1e309}, 400, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 2**80}, 400, "seed"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed"),
    ({"prompt": "x" * 32001}, 400, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 32001}, 400, "negative_prompt"),
    ({"prompt": "a \ud800 b"}, 400, "prompt"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, 400, "negative_prompt"),
    ({"prompt": "a\u0000b"}, 400, "prompt"),
    ({"prompt": "x", "user": "\ud83d"}, 400, "user"),
    ({"prompt": "x", "size": "2048x128"}, 400, "size"),  # over the tiny MMDiT's 1536 px position embedding
    ({"prompt": "x", "size": "1792x1024"}, 400, "size"),
    ({"prompt": "x", "size": "128x128 "}, 400, "size"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "quality": "ultra"}, 400, "quality"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format"),
    ({"prompt": "x", "output_compression": 101}, 400, "output_compression"),
    ({"prompt": "x", "background": "transparent"}, 400, "background"),
    ({"prompt": "x", "partial_images": 4, "stream": True}, 400, "partial_images"),
    ({"prompt": "x", "moderation": "none"}, 400, "moderation"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": "x", "stream": "maybe"}, 400, "stream"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": None}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ([1, 2, 3], 400, None),
    ("just a string", 400, None),
    (b"{not json", 400, None),
    (b"", 400, None),
]


@pytest.mark.parametrize("body,status,param", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_requests_get_4xx_json_naming_the_field(service, body, status, param):
    code, headers, payload = call(service.url + "/v1/images/generations", "POST", body)
    assert code == status, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    assert payload["error"]["param"] == param
    assert headers["X-Request-ID"]


def test_wrong_content_type_and_bad_methods(service):
    code, _, payload = call(service.url + "/v1/images/generations", "POST", b"prompt=x",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 415 and payload["error"]["code"] == "unsupported_media_type"
    assert call(service.url + "/v1/images/generations", "GET")[0] == 405
    assert call(service.url + "/nope")[0] == 404
    # still serving after all of that
    assert call(service.url + "/v1/images/generations", "POST", {"prompt": "ok", "size": "128x128", "steps": 1})[0] == 200


def test_auth(service):
    url = service.url
    assert call(url + "/healthz", key=None)[0] == 200  # open
    for path in ("/readyz", "/metrics", "/v1/models", "/openapi.json"):
        code, headers, payload = call(url + path, key=None)
        assert code == 401 and payload["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
        assert call(url + path, key="wrong")[0] == 401
        assert call(url + path)[0] == 200
    assert call(url + "/v1/images/generations", "POST", {"prompt": "x"}, key=None)[0] == 401


def test_readyz_metrics_and_openapi(service):
    code, _, ready = call(service.url + "/readyz")
    assert code == 200 and ready["status"] == "ready" and ready["device"]["device"] == "cpu"
    assert ready["precision"]["transformer"] == "fp8-weight" and "reason" in json.dumps(ready["precision"])
    code, _, text = call(service.url + "/metrics")
    assert code == 200
    for name in ("sd35_requests_total", "sd35_queue_depth", "sd35_generation_latency_seconds_bucket",
                 "sd35_images_generated_total"):
        assert name in text
    code, _, schema = call(service.url + "/openapi.json")
    assert "/v1/images/generations" in schema["paths"]


def test_burst_against_a_small_queue_is_pushed_back_not_lost(service):
    body = {"prompt": "burst", "size": "128x128", "steps": 30, "seed": 1}

    def one(_):
        return call(service.url + "/v1/images/generations", "POST", body, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    codes = [r[0] for r in results]
    assert len(codes) == 16 and set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1 and codes.count(429) >= 1
    for code, headers, payload in results:
        if code == 429:
            assert int(headers["Retry-After"]) >= 1 and payload["error"]["code"] == "queue_full"
        else:
            assert len(payload["data"]) == 1
    assert call(service.url + "/v1/images/generations", "POST", {**body, "steps": 1})[0] == 200


def test_injected_oom_gives_503_and_the_next_request_200(service, monkeypatch):
    import torch

    from sd35.service import worker as worker_mod

    real_run = worker_mod.gen.run_many
    calls = {"n": 0}

    def oom_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(worker_mod.gen, "run_many", oom_once)
    body = {"prompt": "x", "size": "128x128", "steps": 1}
    code, headers, payload = call(service.url + "/v1/images/generations", "POST", body)
    assert code == 503 and payload["error"]["code"] == "out_of_memory" and headers["Retry-After"]
    assert "20.00 GiB" not in json.dumps(payload)  # no internals
    assert call(service.url + "/v1/images/generations", "POST", body)[0] == 200


def test_unexpected_error_is_500_with_request_id_and_no_internals(service, monkeypatch):
    from sd35.service import worker as worker_mod

    def boom(*a, **k):
        raise RuntimeError("secret internal detail /home/alice/.cache")

    monkeypatch.setattr(worker_mod.gen, "run_many", boom)
    code, headers, payload = call(service.url + "/v1/images/generations", "POST",
                                  {"prompt": "x", "size": "128x128", "steps": 1}, headers={"X-Request-ID": "req-42"})
    assert code == 500 and "req-42" in payload["error"]["message"] and headers["X-Request-ID"] == "req-42"
    assert "secret" not in json.dumps(payload)
    monkeypatch.undo()
    assert call(service.url + "/v1/images/generations", "POST", {"prompt": "x", "size": "128x128", "steps": 1})[0] == 200


def test_timeout_gives_504_and_frees_the_worker(service):
    settings = service.app.state.settings
    old = settings.request_timeout
    settings.request_timeout = 0.5
    try:
        code, _, payload = call(service.url + "/v1/images/generations", "POST",
                                {"prompt": "slow", "size": "512x512", "steps": 400})
    finally:
        settings.request_timeout = old
    assert code == 504 and payload["error"]["code"] == "timeout"
    started = time.time()
    assert call(service.url + "/v1/images/generations", "POST", {"prompt": "x", "size": "128x128", "steps": 1})[0] == 200
    assert time.time() - started < 20  # the abandoned job was stopped at a step, not run to the end


# --- the real process: preflight, SIGTERM drain, sd_notify ------------------------------------------------

def test_refuses_public_bind_without_key():
    r = subprocess.run(sd35_cmd() + ["serve", "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without an API key" in r.stderr and "SD35_API_KEY" in r.stderr
    assert "Traceback" not in r.stderr


def test_refuses_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run(sd35_cmd() + ["serve", "--port", str(s.getsockname()[1])], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "SD35_ALLOW_NO_KEY": "1"})
    assert r.returncode == 2 and "cannot listen" in r.stderr and "--port" in r.stderr


@pytest.mark.slow
def test_sigterm_drains_in_flight_request_and_notifies_systemd(tmp_path, tiny_cache):
    sock_path = tmp_path / "notify.sock"
    messages: list[str] = []
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(sock_path))
    ns.settimeout(0.2)
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            try:
                messages.extend(ns.recv(4096).decode().splitlines())
            except socket.timeout:
                pass

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000", "SD35_SHUTDOWN_GRACE": "60",
           "SD35_CACHE_DIR": str(tiny_cache), "SD35_DEVICE": "cpu", "SD35_ALLOW_NO_KEY": "1"}
    proc = subprocess.Popen(sd35_cmd() + ["serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = read_in_background(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while "READY=1" not in messages and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert "READY=1" in messages, messages
        assert call(url + "/readyz", key=None)[0] == 200
        result = {}

        def long_request():
            result["r"] = call(url + "/v1/images/generations", "POST",
                               {"prompt": "drain me", "size": "128x128", "steps": 40}, key=None, timeout=120)

        time.sleep(2.5)  # long enough for a few watchdog pings (WatchdogSec=2 s: one a second)
        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until the worker is really running it, then stop at once:
            if "sd35_worker_busy 1.0" in call(url + "/metrics", key=None)[2]:  # it is in flight however
                break  # fast or loaded the machine is
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        rc = proc.wait(timeout=90)
        out = output()
        assert rc == 0, out[-3000:]
        code, _, payload = result["r"]
        assert code == 200 and len(payload["data"]) == 1, (payload, out[-3000:])  # the in-flight request finished
        with pytest.raises(OSError):  # and nothing listens any more
            call(url + "/healthz", key=None, timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        collector.join(timeout=5)
        ns.close()
    assert any(m.startswith("STATUS=loading") for m in messages)
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages)
    assert messages.index("READY=1") > 0 and "WATCHDOG=1" in messages, messages
    assert "STOPPING=1" in messages and messages.index("STOPPING=1") > messages.index("READY=1")


# --- the unit -------------------------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed (.ci/run installs it)")
def test_unit_verifies_clean_and_is_hardened(tmp_path):
    unit = tmp_path / "sd35-api@0.service"
    shutil.copy(ROOT / "systemd" / "sd35-api@.service", unit)
    for path in (ROOT / "systemd" / "sd35-api@.service", unit):
        r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True)
    score = float(r.stdout.strip().splitlines()[-1].split("exposure level for")[1].split(":")[1].split()[0])
    assert score <= 3.0, r.stdout[-2000:]
    text = unit.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "CUDA_VISIBLE_DEVICES=%i", "EnvironmentFile=/etc/sd35/sd35.env",
                      "UMask=0002", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/srv/cache/huggingface",
                      "PrivateTmp=yes", "DevicePolicy=closed", "DeviceAllow=", "Restart=on-failure"):
        assert directive in text, directive
    env = (ROOT / "systemd" / "sd35.env.example").read_text()
    assert "HF_HUB_CACHE=/srv/cache/huggingface" in env and "HF_HUB_OFFLINE=1" in env


# --- every entry point refuses keyless serving on a non-loopback address ---------------------------------

def test_create_app_and_ray_replicas_refuse_a_public_address_without_a_key(tiny_cache):
    from sd35.errors import InputError
    from sd35.service.app import create_app
    from sd35.settings import Settings

    def settings(**extra):
        return Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", **extra)

    with pytest.raises(InputError, match="without an API key") as info:
        create_app(settings(host="0.0.0.0"))
    assert "SD35_API_KEY" in info.value.fix
    loopback = settings(host="127.0.0.1")
    with pytest.raises(InputError, match="without an API key"):  # a Ray replica is behind 0.0.0.0 proxies
        create_app(loopback, host="0.0.0.0")
    assert create_app(loopback).state.keys.names() == []  # loopback alone: allowed (preflight checks accounts)
    assert create_app(settings(host="0.0.0.0", allow_no_key=True)) is not None
    assert create_app(settings(host="0.0.0.0", api_key="k")).state.keys.names() == ["default"]
    pytest.importorskip("ray")
    from sd35.service import ray_app

    with pytest.raises(InputError, match="without an API key"):
        ray_app.replica_app(loopback)


# --- wrong tokens over HTTP --------------------------------------------------------------------------------

def test_wrong_tokens_over_http_are_401_and_a_valid_key_keeps_working(tmp_path, tiny_cache):
    from sd35.service import auth
    from sd35.settings import Settings

    keys = tmp_path / "api-keys"
    alice = auth.add(keys, "alice")
    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_keys_file=keys, api_key=KEY, warmup=False)
    with InProcessServer(settings) as srv:
        assert call(srv.url + "/v1/models", key=alice)[0] == 200
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: call(srv.url + "/v1/models", key=f"sd35_{i:012x}_{'x' * 43}")[0],
                                  range(300)))
        assert set(codes) == {401}
        assert call(srv.url + "/v1/models", key=alice)[0] == 200
        assert srv.app.state.keys.cached(alice) == (True, "alice")


# --- a dead worker must not look ready ---------------------------------------------------------------------

def _fresh(tiny_cache, **extra):
    from sd35.settings import Settings

    return InProcessServer(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                                    api_key=KEY, warmup=False, request_timeout=300, **extra))


def _two_requests(srv, started: threading.Event):
    """One job held inside the worker (it waits for `started`'s partner) and one queued behind it."""
    body = {"prompt": "x", "size": "128x128", "steps": 1}
    pool = ThreadPoolExecutor(2)  # not `with`: leaving it would wait for both answers, i.e. for the fault
    first = pool.submit(call, srv.url + "/v1/images/generations", "POST", body)
    assert started.wait(30)
    second = pool.submit(call, srv.url + "/v1/images/generations", "POST", body)
    deadline = time.time() + 10
    while srv.app.state.worker.queue.qsize() < 1 and time.time() < deadline:
        time.sleep(0.02)
    pool.shutdown(wait=False)  # the two calls go on; _assert_dead waits for their answers
    return first, second


def _assert_dead(srv, failures, first, second, t0):
    for f in (first, second):
        code, headers, payload = f.result(timeout=60)
        assert code == 503 and payload["error"]["code"] == "worker_failed" and headers["Retry-After"], payload
    assert time.time() - t0 < 30  # at once, not after SD35_REQUEST_TIMEOUT (300 s) with a 504
    code, _, payload = call(srv.url + "/readyz")
    assert code == 503 and payload["status"] == "failed"
    code, _, payload = call(srv.url + "/v1/images/generations", "POST", {"prompt": "x", "size": "128x128", "steps": 1})
    assert code == 503 and "error" in payload
    deadline = time.time() + 10  # the waiting clients are answered first, then the server is told
    while not failures and time.time() < deadline:
        time.sleep(0.02)
    assert len(failures) == 1  # the server was told: `sd35 serve` exits non-zero, systemd restarts it
    assert "sd35_ready 0.0" in call(srv.url + "/metrics")[2]


def test_an_exception_escaping_the_job_kills_the_worker_visibly(tiny_cache):
    with _fresh(tiny_cache) as srv:
        worker, failures = srv.app.state.worker, []
        worker.on_failed = failures.append
        started, go = threading.Event(), threading.Event()

        def broken_process(job):  # a bug outside the per-job try: it escapes _process
            started.set()
            go.wait(30)
            raise RuntimeError("a bug in the worker loop")

        worker._process = broken_process
        first, second = _two_requests(srv, started)
        t0 = time.time()
        go.set()
        _assert_dead(srv, failures, first, second, t0)


def test_release_memory_failing_after_an_oom_kills_the_worker_visibly(tiny_cache, monkeypatch):
    import torch

    from sd35.service import worker as worker_mod

    with _fresh(tiny_cache) as srv:
        worker, failures = srv.app.state.worker, []
        worker.on_failed = failures.append
        started, go = threading.Event(), threading.Event()

        def oom(*a, **k):
            started.set()
            go.wait(30)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        def release():
            raise RuntimeError("CUDA error: cannot release (injected)")

        monkeypatch.setattr(worker_mod.gen, "run_many", oom)
        worker._release_memory = release
        first, second = _two_requests(srv, started)
        t0 = time.time()
        go.set()
        _assert_dead(srv, failures, first, second, t0)


def test_a_sticky_cuda_error_fails_readiness_and_every_waiting_request(tiny_cache, monkeypatch):
    from sd35.service import worker as worker_mod

    with _fresh(tiny_cache) as srv:
        worker, failures = srv.app.state.worker, []
        worker.on_failed = failures.append
        started, go = threading.Event(), threading.Event()

        def device_assert(*a, **k):
            started.set()
            go.wait(30)
            raise RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be ...")

        monkeypatch.setattr(worker_mod.gen, "run_many", device_assert)
        first, second = _two_requests(srv, started)
        t0 = time.time()
        go.set()
        _assert_dead(srv, failures, first, second, t0)


STICKY_SERVE = """
import sys
from sd35.inference import generate
def run_many(*a, **k):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")
generate.run_many = run_many
sys.argv = ["sd35", "serve", "--port", sys.argv[1]]
from sd35.cli import main
main()
"""


@pytest.mark.slow
def test_sd35_serve_exits_non_zero_after_a_sticky_cuda_error(tiny_cache):
    port = free_port()
    env = {**os.environ, "SD35_CACHE_DIR": str(tiny_cache), "SD35_DEVICE": "cpu", "SD35_WARMUP": "0",
           "SD35_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-c", STICKY_SERVE, str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = read_in_background(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if call(url + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        code, _, payload = call(url + "/v1/images/generations", "POST", {"prompt": "x", "size": "128x128", "steps": 1})
        assert code == 503 and payload["error"]["code"] == "worker_failed", payload
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = output()
    assert rc == 1, out[-3000:]
    assert "GPU worker failed" in out and "Traceback" not in out, out[-3000:]


# --- Worker.stop: a job just taken from the queue ----------------------------------------------------------

class _SlowRuntime:
    """Just enough of a Runtime for the Worker: `steps` steps of `step_s` seconds each."""

    def __init__(self, step_s: float):
        from types import SimpleNamespace

        self.step_s = step_s
        self.device = "cpu"
        self.loaded = SimpleNamespace(plan=SimpleNamespace(transformer="bf16"))
        self.pipe = SimpleNamespace(maybe_free_model_hooks=lambda: None)

    def generate(self, request, n=1, on_step=None, on_latents=None):
        from types import SimpleNamespace

        for i in range(request.steps):
            time.sleep(self.step_s)
            on_step(i + 1, request.steps)
        return SimpleNamespace(images=["img"] * n, seeds=[request.seed] * n, timings={"denoise": 0.0})


@pytest.mark.parametrize("grace, finishes", [(10.0, True), (0.3, False)])
def test_stop_right_after_a_job_is_taken_finishes_it_or_answers_503_never_504(grace, finishes):
    from sd35.inference.generate import GenerationRequest
    from sd35.service import worker as worker_mod
    from sd35.settings import Settings

    settings = Settings(_env_file=None, warmup=False, queue_size=2)
    worker = worker_mod.Worker(settings, loader=lambda s: _SlowRuntime(0.05))
    taken, go = threading.Event(), threading.Event()
    real = worker._process

    def held(job):  # the window between queue.get() and busy=True, held open
        taken.set()
        go.wait(10)
        real(job)

    worker._process = held
    worker.start()
    deadline = time.time() + 10
    while worker.state != "ready" and time.time() < deadline:
        time.sleep(0.01)
    job = worker.submit(GenerationRequest("x", steps=20, guidance=1.0, height=64, width=64, seed=0), 1, 60)
    assert taken.wait(10) and worker.queue.empty() and not worker.busy
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": grace})
    stopper.start()
    time.sleep(0.1)
    go.set()
    stopper.join(30)
    if finishes:
        assert job.future.result(timeout=5).images == ["img"]
    else:
        with pytest.raises(worker_mod.ShuttingDown):
            job.future.result(timeout=5)
    assert worker.state == "stopped"


@pytest.mark.root
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed (.ci/run installs it)")
def test_every_path_the_unit_writes_is_writable_under_its_sandbox(monkeypatch):
    """ProtectSystem=strict makes everything read-only but ReadWritePaths=, CacheDirectory= (/var/cache/X) and
    StateDirectory= (/var/lib/X): every folder the service writes, from the unit's and sd35.env's settings,
    must be inside one of them — and the compile cache private (CacheDirectoryMode=0700), never shared."""
    from sd35.inference import compilation
    from sd35.settings import Settings

    unit = ROOT / "systemd" / "sd35-api@.service"
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    lines = [ln.strip() for ln in unit.read_text().splitlines() if "=" in ln and not ln.lstrip().startswith("#")]
    directives: dict[str, list[str]] = {}
    for ln in lines:
        k, _, v = ln.partition("=")
        directives.setdefault(k, []).append(v)
    writable = [Path(p) for v in directives.get("ReadWritePaths", []) for p in v.split()]
    writable += [Path("/var/cache") / d for v in directives.get("CacheDirectory", []) for d in v.split()]
    writable += [Path("/var/lib") / d for v in directives.get("StateDirectory", []) for d in v.split()]
    assert directives.get("CacheDirectoryMode") == ["0700"] and directives.get("ProtectSystem") == ["strict"]
    env = {}
    for ln in (ROOT / "systemd" / "sd35.env.example").read_text().splitlines():
        if "=" in ln and not ln.startswith("#"):
            k, _, v = ln.partition("=")
            env[k.strip()] = v.strip()
    for v in directives["Environment"]:
        k, _, val = v.partition("=")
        env[k] = val
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HOME", "/nonexistent")  # ProtectHome=yes: nothing may fall back to ~
    s = Settings(_env_file=None)
    written = {"SD35_OUTPUT_DIR": s.output_dir, "SD35_CACHE_DIR": s.cache_dir, "HF_HUB_CACHE": s.hf_hub_cache,
               "SD35_QUANTIZED_DIR": s.quantized_dir or Path(s.hf_hub_cache) / "sd35-quantized",
               "SD35_COMPILE_CACHE": compilation.cache_root(s),
               "WorkingDirectory": Path(directives["WorkingDirectory"][0])}
    for name, path in written.items():
        assert any(Path(path) == w or w in Path(path).parents for w in writable), (name, path, writable)
    # the compile cache: in the private CacheDirectory, not under the team-writable ReadWritePaths
    compile_root = compilation.cache_root(s)
    shared = [Path(p) for v in directives.get("ReadWritePaths", []) for p in v.split()]
    assert not any(w == compile_root or w in compile_root.parents for w in shared), compile_root
    assert env.get("SD35_COMPILE_CACHE", "").startswith("/var/cache/")


# --- a real allocation failure (not an injected exception) -------------------------------------------------

@pytest.mark.slow
def test_a_real_cpu_allocation_failure_fails_that_job_alone_with_503(tiny_cache, tmp_path):
    """The service under a lowered address-space limit (RLIMIT_AS, set on the running process once it is
    warm): a request too big to fit gets the JSON 503 of an OOM — the CPU allocator's error is treated
    like CUDA's — and the next job works."""
    import resource

    port = free_port()
    env = {**os.environ, "SD35_CACHE_DIR": str(tiny_cache), "SD35_DEVICE": "cpu", "SD35_API_KEY": KEY,
           "SD35_MAX_PIXELS": str(1536 * 1536), "SD35_REQUEST_TIMEOUT": "300",
           "MALLOC_ARENA_MAX": "2"}  # no 64 MiB address-space reservation per new thread
    proc = subprocess.Popen(sd35_cmd() + ["serve", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = read_in_background(proc)
    url = f"http://127.0.0.1:{port}"
    small = {"prompt": "x", "size": "128x128", "steps": 1}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if call(url + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert call(url + "/v1/images/generations", "POST", small)[0] == 200  # threads and pools warm
        vm = next(int(ln.split()[1]) * 1024 for ln in open(f"/proc/{proc.pid}/status") if ln.startswith("VmSize"))
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))
        code, headers, payload = call(url + "/v1/images/generations", "POST",
                                      {"prompt": "x", "size": "1536x1536", "steps": 1}, timeout=300)
        assert code == 503 and payload["error"]["code"] == "out_of_memory" and headers["Retry-After"], payload
        code, _, payload = call(url + "/v1/images/generations", "POST", small)
        assert code == 200 and len(payload["data"]) == 1, payload
        assert call(url + "/readyz")[0] == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = output()
    assert "out of memory; memory released" in out and "Traceback" not in out, out[-3000:]


def test_the_images_healthcheck_passes_on_a_keyed_service(service):
    """docker/Dockerfile's HEALTHCHECK command, run as written against a service with SD35_API_KEY (compose
    always sets one): 0 while ready; without the key in its environment /readyz answers 401 and it fails."""
    import json as _json
    import re

    line = re.search(r'^\s*CMD (\["python3", "-c", .*\])$', (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    cmd = _json.loads(line.group(1))
    port = service.url.rsplit(":", 1)[1]
    ok = subprocess.run(cmd, env={"PATH": os.environ["PATH"], "SD35_PORT": port, "SD35_API_KEY": KEY},
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    keyless = subprocess.run(cmd, env={"PATH": os.environ["PATH"], "SD35_PORT": port}, capture_output=True,
                             text=True, timeout=30)
    assert keyless.returncode != 0 and "401" in keyless.stderr
