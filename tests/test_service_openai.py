"""The image API as clients use it today (issue #14): the official openai Python client (generate,
stream, errors), the Node SDK where node is installed, schemathesis against /openapi.json, hostile
connections (413/408/stalled headers), cancellation, Retry-After, OOM recovery and the one-grace SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from PIL import Image

from helpers import free_port, read_in_background, requires_gpu, sd35_cmd
from test_service import KEY, InProcessServer, call

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api(tiny_cache):
    from sd35.service.limits import header_timeout_protocol
    from sd35.settings import Settings

    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_key=KEY, queue_size=3, max_pixels=256 * 256, max_images=4, max_steps=400,
                        request_timeout=60, max_body_bytes=64 * 1024, body_timeout=1.0, header_timeout=1.0)
    srv = InProcessServer(settings)
    srv.server.config.http = header_timeout_protocol(settings.header_timeout)
    with srv:
        yield srv


@pytest.fixture()
def client(api):
    from openai import OpenAI

    return OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# --- the official Python client -------------------------------------------------------------------------

def test_client_stream_partial_images_then_completed(client):
    events = list(client.images.generate(prompt="a red cube", stream=True, partial_images=3, size="128x128",
                                         extra_body={"steps": 8, "seed": 3}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    previews = [png(e.b64_json) for e in events[:3]]
    assert all(p.size == (128, 128) and p.format == "PNG" for p in previews)
    assert len({e.b64_json for e in events[:3]}) == 3  # three different moments of the denoising
    done = events[-1]
    assert png(done.b64_json).size == (128, 128)
    assert done.size == "128x128" and done.output_format == "png" and done.background == "opaque"
    assert done.quality == "high" and done.created_at > 0
    assert done.usage.output_tokens == 64 and done.usage.total_tokens == done.usage.input_tokens + 64


def test_stream_final_image_equals_the_non_streamed_one(client):
    kwargs = dict(prompt="same", size="128x128", extra_body={"steps": 3, "seed": 9})
    streamed = list(client.images.generate(stream=True, partial_images=1, **kwargs))
    plain = client.images.generate(**kwargs)
    assert streamed[-1].b64_json == plain.data[0].b64_json


def test_stream_without_partials_and_with_n(client):
    import logging
    import re
    import time

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    access = logging.getLogger("sd35.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        events = list(client.images.generate(prompt="two", stream=True, n=2, size="64x64", extra_body={"steps": 1}))
        deadline = time.monotonic() + 5  # the line is written once the stream's last byte is sent
        while not any("POST /v1/images/generations" in x for x in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    # the access line of a streamed request carries queue_wait like any other
    assert any(re.search(r"status=200 POST /v1/images/generations size=64x64 n=2 steps=1 queue_wait=\d+\.\d+s", x)
               for x in lines), lines


def test_client_parity_fields(client):
    r = client.images.generate(prompt="a lighthouse", n=6, quality="low", output_format="webp", output_compression=40,
                               size="128x128", moderation="low", user="alice", style="vivid")
    assert len(r.data) == 6 and r.output_format == "webp" and r.quality == "low" and r.size == "128x128"
    assert r.background == "opaque" and r.created > 0
    assert all(png(d.b64_json).format == "WEBP" for d in r.data)
    assert r.data[0].revised_prompt == "a lighthouse"
    assert r.usage.output_tokens == 6 * 64 and r.usage.input_tokens > 0
    extra = r.model_extra["sd35"]
    assert extra["steps"] == 2  # quality low = half the tiny model's 4 recommended steps
    # one seed per image, consecutive across the batches of SD35_MAX_IMAGES=4
    assert extra["seeds"] == [extra["seed"] + i for i in range(6)]
    assert any("style" in note for note in extra["notes"])
    assert set(r.model_extra) == {"sd35"}  # our extras under one key


def test_quality_maps_to_steps(client):
    steps = {q: client.images.generate(prompt="q", quality=q, size="64x64").model_extra["sd35"]["steps"]
             for q in ("low", "medium", "high", "auto", "standard", "hd")}
    assert steps == {"low": 2, "medium": 3, "high": 4, "auto": 4, "standard": 3, "hd": 4}


def test_jpeg_and_auto_size(client):
    r = client.images.generate(prompt="j", output_format="jpeg", size="auto", extra_body={"steps": 1})
    img = png(r.data[0].b64_json)
    assert img.format == "JPEG" and img.size == (128, 128) and r.size == "128x128"


def test_url_response_is_served_behind_auth(client, api):
    r = client.images.generate(prompt="u", response_format="url", size="64x64", extra_body={"steps": 1})
    url = r.data[0].url
    assert url.startswith(api.url + "/v1/images/img_") and r.data[0].b64_json is None
    code, headers, _ = call(url, key=None)
    assert code == 401
    req = __import__("urllib.request").request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    with __import__("urllib.request").request.urlopen(req) as resp:
        assert resp.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(resp.read())).size == (64, 64)
    assert call(api.url + "/v1/images/img_nope")[0] == 404


def test_long_prompt_is_truncated_with_a_note(client):
    prompt = " ".join(f"word{i}" for i in range(600))
    r = client.images.generate(prompt=prompt, size="64x64", extra_body={"steps": 1})
    notes = r.model_extra["sd35"]["notes"]
    assert any("CLIP" in n for n in notes) and any("T5" in n for n in notes)
    assert isinstance(r.data[0].revised_prompt, str) and len(r.data[0].revised_prompt) < len(prompt)


def test_client_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", background="transparent")
    assert "alpha" in e.value.message and e.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", output_format="gif")
    assert "'png', 'jpeg' or 'webp'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="1792x1024")
    assert "1536" in e.value.message or "pixels" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="gpt-image-2")
    with pytest.raises(openai.AuthenticationError):
        type(client)(base_url=client.base_url, api_key="wrong", max_retries=0).images.generate(prompt="x")
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_stream_error_after_start_raises_in_the_client(client, api, monkeypatch):
    import openai
    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(api.app.state.worker.runtime, "generate", oom)
    with pytest.raises(openai.APIError) as e:
        list(client.images.generate(prompt="x", stream=True, size="64x64"))
    assert "out of memory" in str(e.value)


# --- Node SDK ---------------------------------------------------------------------------------------------

NODE_DIR = ROOT / ".cache" / "node-openai"  # gitignored; npm fills it on first use
NODE_OPENAI = "openai@6.49.0"  # the Node SDK version this test was written against


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("node") or not shutil.which("npm"), reason="node/npm not installed")
def test_node_sdk_generate_stream_and_errors(api):
    if not (NODE_DIR / "node_modules" / "openai").exists():
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR), NODE_OPENAI],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"npm could not install the openai SDK (offline?): {r.stderr[-300:]}")
    script = textwrap.dedent(f"""
        const OpenAI = require("openai");
        const client = new OpenAI({{ baseURL: "{api.url}/v1", apiKey: "{KEY}", maxRetries: 0 }});
        (async () => {{
          const out = {{}};
          const r = await client.images.generate({{ prompt: "node", size: "64x64", steps: 1 }});
          out.generate = [r.data.length, r.size, r.output_format, typeof r.data[0].b64_json];
          const stream = await client.images.generate({{ prompt: "node", size: "64x64", stream: true,
                                                        partial_images: 2, steps: 4 }});
          out.stream = [];
          for await (const ev of stream) out.stream.push([ev.type, ev.partial_image_index ?? null]);
          try {{ await client.images.generate({{ prompt: "x", background: "transparent" }}); }}
          catch (e) {{ out.error = [e.status, e.error && e.error.param]; }}
          console.log(JSON.stringify(out));
        }})().catch((e) => {{ console.error(e); process.exit(1); }});
    """)
    r = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["generate"] == [1, "64x64", "png", "string"]
    assert out["stream"] == [["image_generation.partial_image", 0], ["image_generation.partial_image", 1],
                             ["image_generation.completed", None]]
    assert out["error"] == [400, "background"]


# --- schemathesis ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(api):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    code, _, raw = call(api.url + "/openapi.json")
    assert code == 200
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=api.url)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    auth = {"Authorization": f"Bearer {KEY}"}
    seen: list[int] = []
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]  # valid requests, then invalid ones
    for operation, mode in [(o, m) for o in schema.get_all_operations() for m in modes]:
        op = operation.ok()

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            if isinstance(case.body, dict):  # keep generations small on the CPU: few steps, few images
                case.body["steps"] = min(int(case.body.get("steps") or 1), 2) if isinstance(
                    case.body.get("steps"), int) else case.body.get("steps", 1)
                if isinstance(case.body.get("n"), int):
                    case.body["n"] = min(case.body["n"], 2)
            response = case.call(headers=auth, timeout=60)
            seen.append(response.status_code)
            case.validate_response(response, checks=checks)

        try:
            run()
        except Unsatisfiable:  # no parameters to make invalid (GET /healthz, /metrics, ...)
            assert mode == GenerationMode.NEGATIVE
    # A streamed answer, always (the random cases above may or may not ask for one): each event must match
    # the documented event schema.
    streamed = schema["/v1/images/generations"]["POST"].Case(body={"prompt": "a", "stream": True, "steps": 1})
    response = streamed.call(headers=auth, timeout=60)
    assert response.headers["content-type"][0].startswith("text/event-stream"), response.headers
    streamed.validate_response(response, checks=checks)
    assert seen and not [c for c in seen if c >= 500], seen
    assert {200, 400, 404} <= set(seen), sorted(set(seen))
    print(sorted(set(seen)), len(seen))


# --- hostile connections --------------------------------------------------------------------------------

def raw(api, data: bytes, wait: float = 10.0) -> bytes:
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def test_body_over_the_limit_is_413(api):
    answer = raw(api, head("/v1/images/generations", "Content-Length: 1000000000\r\n"))
    assert answer.startswith(b"HTTP/1.1 413") and b"SD35_MAX_BODY_BYTES" in answer
    big = json.dumps({"prompt": "x" * 70000}).encode()
    code, _, payload = call(api.url + "/v1/images/generations", "POST", big)
    assert code == 413 and payload["error"]["code"] == "request_too_large"
    chunked = head("/v1/images/generations", "Transfer-Encoding: chunked\r\n")
    chunk = b"x" * 40000
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    assert raw(api, chunked + body).startswith(b"HTTP/1.1 413")


def test_stalled_body_gets_408_and_stalled_headers_are_cut(api):
    started = time.monotonic()
    answer = raw(api, head("/v1/images/generations", "Content-Length: 100\r\n") + b'{"prompt": ')
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 8
    started = time.monotonic()
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert s.recv(100) == b""  # closed by the server, not by our timeout
    assert time.monotonic() - started < 8
    assert call(api.url + "/healthz")[0] == 200


# --- cancellation, Retry-After, OOM ----------------------------------------------------------------------

def metric(api, name: str) -> float:
    text = call(api.url + "/metrics")[2]
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_client_disconnect_cancels_the_job(api):
    body = json.dumps({"prompt": "long", "size": "256x256", "steps": 400}).encode()
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head("/v1/images/generations", f"Content-Length: {len(body)}\r\n") + body)
        deadline = time.monotonic() + 20
        while metric(api, "sd35_worker_busy") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(api, "sd35_worker_busy") == 1.0
    started = time.monotonic()  # the socket is closed: the job stops at its next step
    while metric(api, "sd35_worker_busy") == 1.0 and time.monotonic() - started < 30:
        time.sleep(0.05)
    assert metric(api, "sd35_worker_busy") == 0.0 and time.monotonic() - started < 10


def test_stream_disconnect_cancels_the_job(api):
    body = json.dumps({"prompt": "long", "size": "256x256", "steps": 400, "stream": True,
                       "partial_images": 3}).encode()
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head("/v1/images/generations", f"Content-Length: {len(body)}\r\n") + body)
        assert s.recv(200).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 20
        while metric(api, "sd35_worker_busy") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
    started = time.monotonic()
    while metric(api, "sd35_worker_busy") == 1.0 and time.monotonic() - started < 30:
        time.sleep(0.05)
    assert metric(api, "sd35_worker_busy") == 0.0 and time.monotonic() - started < 10


def test_retry_after_is_the_work_ahead_at_the_measured_rate(tiny_cache):
    from sd35.inference import generate as gen
    from sd35.service.worker import Job, Worker
    from sd35.settings import Settings

    w = Worker(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", queue_size=8,
                        max_images=2))
    assert w.retry_after() == 1  # nothing ahead
    w.queue.put(Job(gen.GenerationRequest("a"), 1, 1e18))
    assert w.retry_after() == 10  # nothing measured yet: 10 s a job
    w.queue.get()
    w.rate = 128 * 128 * 10.0  # pixel-steps per second: a 128x128 step takes 0.1 s
    running = Job(gen.GenerationRequest("a", steps=20, height=128, width=128), 1, 1e18)
    running.done_steps = 10  # half done: 10 steps = 1 s left
    w.current = running
    w.queue.put(Job(gen.GenerationRequest("b", steps=10, height=256, width=256), 3, 1e18, batches=2))  # 4x the pixels, 10 steps, 3 images: 12 s
    assert w.work_ahead() == 128 * 128 * 10 + 256 * 256 * 10 * 3
    assert w.retry_after() == 1 + 12


def test_oom_frees_the_failed_steps_memory_before_empty_cache(api, monkeypatch):
    import torch

    held: dict = {}

    def oom(*a, **k):
        activations = torch.empty(4 * 1024 * 1024)  # stands for the step's activations
        held["ref"] = weakref.ref(activations)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    worker = api.app.state.worker
    seen: dict = {}
    real_release = worker._release_memory

    def release():
        seen["alive_at_release"] = held["ref"]() is not None
        real_release()

    monkeypatch.setattr(worker.runtime, "generate", oom)
    monkeypatch.setattr(worker, "_release_memory", release)
    code, headers, payload = call(api.url + "/v1/images/generations", "POST", {"prompt": "x", "size": "64x64"})
    assert code == 503 and payload["error"]["code"] == "out_of_memory" and headers["Retry-After"]
    assert seen == {"alive_at_release": False}


@pytest.mark.gpu
@requires_gpu
def test_oom_on_the_gpu_gives_the_memory_back(monkeypatch, tiny_cache):
    import types

    import torch

    from sd35.inference import generate as gen
    from sd35.service import worker as worker_mod
    from sd35.settings import Settings

    w = worker_mod.Worker(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cuda"))
    torch.cuda.empty_cache()
    base_allocated, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def oom(*a, **k):
        activations = torch.empty(256 * 1024 * 1024, device="cuda")  # 1 GiB held by the failing frame
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected after {activations.numel()} floats)")

    w.runtime = types.SimpleNamespace(pipe=types.SimpleNamespace(maybe_free_model_hooks=lambda: None), generate=oom)
    job = worker_mod.Job(gen.GenerationRequest("x"), 1, time.monotonic() + 60)
    w._process(job)
    assert isinstance(job.future.exception(), worker_mod.OutOfMemory)
    assert torch.cuda.memory_allocated() == base_allocated
    assert torch.cuda.memory_reserved() <= base_reserved  # empty_cache gave the 1 GiB back to the driver


# --- openapi ----------------------------------------------------------------------------------------------

def test_openapi_tells_the_truth(api):
    code, _, schema = call(api.url + "/openapi.json")
    assert code == 200 and "422" not in json.dumps(schema) and "HTTPValidationError" not in json.dumps(schema)
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "SD35_API_KEY (when the service has one)"}
    assert schema["security"] == [{"bearer": []}]
    req = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert req["n"]["minimum"] == 1 and req["n"]["maximum"] == 10
    assert req["prompt"]["minLength"] == 1 and req["prompt"]["maxLength"] == 32000
    size = json.dumps(req["size"])
    assert "auto|" in size
    assert json.dumps(req["steps"]).count("500") == 1
    gen = schema["paths"]["/v1/images/generations"]["post"]
    assert {"200", "400", "401", "404", "408", "413", "415", "429", "500", "503", "504"} <= set(gen["responses"])
    assert "text/event-stream" in gen["responses"]["200"]["content"]
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "/v1/models/{model_id}" in schema["paths"]


# --- one grace on SIGTERM ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_past_the_grace_answers_503_and_exits_0(tmp_path, tiny_cache):
    port = free_port()
    env = {**os.environ, "SD35_SHUTDOWN_GRACE": "3", "SD35_CACHE_DIR": str(tiny_cache), "SD35_DEVICE": "cpu",
           "SD35_ALLOW_NO_KEY": "1", "SD35_MAX_STEPS": "500", "SD35_MAX_PIXELS": str(512 * 512), "SD35_QUEUE_SIZE": "4"}
    proc = subprocess.Popen(sd35_cmd() + ["serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = read_in_background(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if call(url + "/readyz", key=None, timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        results: list = []

        def long_request():
            results.append(call(url + "/v1/images/generations", "POST",
                                {"prompt": "cut", "size": "512x512", "steps": 500}, key=None, timeout=120))

        threads = [threading.Thread(target=long_request) for _ in range(2)]  # one runs, one waits
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while time.time() < deadline and "sd35_worker_busy 1.0" not in call(url + "/metrics", key=None)[2]:
            time.sleep(0.05)
        time.sleep(0.5)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    out = output()
    assert rc == 0, out[-3000:]
    assert "terminate called" not in out and "Traceback" not in out, out[-3000:]
    assert took < 3 + 5 + 10, took  # one grace, the answer margin, and the join — not two graces
    assert len(results) == 2
    for code, headers, payload in results:
        assert code == 503 and payload["error"]["code"] == "shutting_down", payload


# --- sd35.preview ----------------------------------------------------------------------------------------

def test_preview_steps_are_evenly_spaced_before_the_last():
    from sd35.inference.preview import preview_steps

    assert preview_steps(28, 3) == [7, 14, 21]
    assert preview_steps(8, 1) == [4]
    assert preview_steps(2, 3) == [1]  # fewer steps than previews: the final image comes sooner
    assert preview_steps(1, 3) == [] and preview_steps(40, 0) == []


def test_latents_to_rgb_is_the_published_linear_map():
    import torch

    from sd35.inference.preview import SD3_LATENT_RGB_BIAS, SD3_LATENT_RGB_FACTORS, latents_to_rgb, to_pil

    zeros = latents_to_rgb(torch.zeros(1, 16, 4, 6))
    assert zeros.shape == (1, 4, 6, 3) and zeros.dtype == torch.uint8
    assert zeros[0, 0, 0].tolist() == [round((b + 1) * 127.5) for b in SD3_LATENT_RGB_BIAS]
    one = torch.zeros(1, 16, 1, 1)
    one[0, 2] = 1.0  # channel 2 alone: its row of factors plus the bias
    expected = [round((min(1, f + b) + 1) * 127.5) for f, b in zip(SD3_LATENT_RGB_FACTORS[2], SD3_LATENT_RGB_BIAS)]
    assert latents_to_rgb(one)[0, 0, 0].tolist() == expected
    assert to_pil(zeros[0], (48, 32)).size == (48, 32)
    with pytest.raises(ValueError):
        latents_to_rgb(torch.zeros(1, 4, 8, 8))


def test_a_32000_character_word_is_capped_before_the_tokenizers(client):
    r = client.images.generate(prompt="x" * 32000, size="64x64", extra_body={"steps": 1})
    notes = r.model_extra["sd35"]["notes"]
    assert any("32000 characters" in n for n in notes) and len(r.data[0].revised_prompt) <= 3000


# --- the link store never drops an image of a response in flight ---------------------------------------------

def test_a_response_never_evicts_its_own_images():
    from sd35.service.imagestore import DoesNotFit, ImageStore

    store = ImageStore(ttl=60, max_bytes=1000)
    older = store.put_all([b"o" * 300, b"p" * 300], "image/png")
    mine = store.put_all([b"a" * 400, b"b" * 400, b"c" * 200], "image/png")
    assert all(store.get(i) is not None for i in mine)  # all of this response, the older ones dropped
    assert all(store.get(i) is None for i in older)
    with pytest.raises(DoesNotFit):
        store.put_all([b"x" * 600, b"y" * 600], "image/png")
    assert all(store.get(i) is not None for i in mine)  # a refused response drops nothing


def test_url_responses_that_cannot_fit_are_refused_up_front_and_streams_never_break(client, api):
    store = api.app.state.images
    old = store.max_bytes
    store.max_bytes = 64 * 64 * 3 + 64 + 4096  # room for one 64x64 image
    settings = api.app.state.settings
    old_setting = settings.image_store_bytes
    settings.image_store_bytes = store.max_bytes
    try:
        body = {"prompt": "u", "size": "64x64", "steps": 1, "n": 3, "response_format": "url"}
        started = time.monotonic()
        code, _, payload = call(api.url + "/v1/images/generations", "POST", body)
        assert code == 400 and payload["error"]["param"] == "response_format", payload
        assert "SD35_IMAGE_STORE_BYTES" in payload["error"]["message"] and time.monotonic() - started < 60  # no GPU run
        r = client.images.generate(prompt="u", size="64x64", n=1, response_format="url", extra_body={"steps": 1})
        assert call(r.data[0].url)[0] == 200
        # streamed: the images travel in the events themselves, whatever the store holds
        events = list(client.images.generate(prompt="s", size="64x64", n=3, response_format="url", stream=True,
                                             extra_body={"steps": 1}))
        done = [e for e in events if e.type == "image_generation.completed"]
        assert len(done) == 3 and all(png(e.b64_json).size == (64, 64) for e in done)
    finally:
        store.max_bytes, settings.image_store_bytes = old, old_setting


# --- HTTP pipelining vs the header timeout ----------------------------------------------------------------

def test_pipelined_requests_outliving_the_header_timeout_are_both_answered(api, monkeypatch):
    from sd35.service import worker as worker_mod

    real = worker_mod.gen.run_many

    def slow(*a, **k):
        time.sleep(1.8)  # each longer than SD35_HEADER_TIMEOUT (1 s) of this fixture
        return real(*a, **k)

    monkeypatch.setattr(worker_mod.gen, "run_many", slow)
    payload = json.dumps({"prompt": "p", "size": "64x64", "steps": 1}).encode()
    one = head("/v1/images/generations", f"Content-Length: {len(payload)}\r\n") + payload
    answer = raw(api, one + one, wait=30)
    assert answer.count(b"HTTP/1.1 200") == 2, answer[:300]


def test_page_key_field_asks_for_a_personal_key(api):
    """Per-person keys come from `sd35 keys add`; the page must not send people looking for SD35_API_KEY."""
    status, _, page = call(api.url + "/", key=None)
    assert status == 200
    start = page.index('id="key-row"')
    field = page[start:page.index("</div>\n    <fieldset", start)]
    assert "sd35 keys add" in field and "SD35_API_KEY" not in field
