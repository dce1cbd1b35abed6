"""The endpoints: OpenAI's /v1/images/generations and /v1/models, plus /healthz, /readyz, /metrics.

Every request is checked up front (size, n, steps, guidance, prompt length, model) and refused with a
4xx naming the field before it can reach the GPU queue.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import generate as gen
from ..errors import InputError
from ..models import expand_alias
from ..runtime import Runtime
from .schemas import ErrorBody, ImageGenerationRequest, ImagesResponse, error_body
from .worker import Busy, Cancelled, NotReady, OutOfMemory

router = APIRouter()
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 415, 429, 500, 503, 504)}


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _bad(message: str, param: str | None, code: str = "invalid_value") -> JSONResponse:
    return error(400, message, "invalid_request_error", param, code)


def served_model_ids(settings) -> list[str]:
    ids = [settings.model]
    full = expand_alias(settings.model)
    if full != settings.model:
        ids.append(full)
    return ids


def _check(body: ImageGenerationRequest, settings, runtime) -> tuple[gen.GenerationRequest, str] | JSONResponse:
    """Validate a generation request against the service's limits; a JSONResponse means refused."""
    if body.model is not None and expand_alias(body.model) not in {expand_alias(m) for m in served_model_ids(settings)}:
        return error(404, f"model {body.model!r} is not served here; GET /v1/models lists the served model",
                     "invalid_request_error", "model", "model_not_found")
    if not body.prompt.strip():
        return _bad("prompt must not be empty", "prompt")
    if len(body.prompt) > settings.max_prompt_chars:
        return _bad(f"prompt is {len(body.prompt)} characters; the limit is {settings.max_prompt_chars}", "prompt",
                    "prompt_too_long")
    if not 1 <= body.n <= settings.max_images:
        return _bad(f"n must be from 1 to {settings.max_images} (got {body.n})", "n")
    if body.steps is not None and not 1 <= body.steps <= settings.max_steps:
        return _bad(f"steps must be from 1 to {settings.max_steps} (got {body.steps})", "steps")
    if body.guidance_scale is not None and not math.isfinite(body.guidance_scale):
        return _bad("guidance_scale must be a finite number", "guidance_scale")
    width, height = runtime.info.sampling.width, runtime.info.sampling.height
    if body.size is not None:
        m = _SIZE.match(body.size)
        if not m:
            return _bad(f'size must be "WIDTHxHEIGHT", e.g. "{width}x{height}" (got {body.size!r})', "size")
        width, height = int(m.group(1)), int(m.group(2))
    if width * height > settings.max_pixels:
        return _bad(f"size {width}x{height} is {width * height} pixels; the limit is {settings.max_pixels}", "size")
    try:
        req = runtime.check(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                            guidance=body.guidance_scale, height=height, width=width, seed=body.seed)
    except InputError as exc:
        param = {"height": "size", "width": "size", "guidance": "guidance_scale"}.get(exc.param, exc.param)
        return _bad(exc.cause, param)
    return req, f"{width}x{height}"


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
async def create_image(body: ImageGenerationRequest, request: Request):
    """Generate images (OpenAI Images API). Extensions: negative_prompt, seed, steps, guidance_scale."""
    state = request.app.state
    settings, worker = state.settings, state.worker
    if worker.state != "ready":
        return error(503, f"the model is not ready ({worker.state})", "server_error", None, "model_not_ready",
                     headers={"Retry-After": "10"})
    checked = _check(body, settings, worker.runtime)
    if isinstance(checked, JSONResponse):
        return checked
    req, size = checked
    request.state.access = access = {"size": size, "n": body.n, "steps": req.steps}  # for the access log
    started = time.monotonic()
    try:
        job = worker.submit(req, body.n, settings.request_timeout)
    except Busy as exc:
        return error(429, f"the GPU queue is full ({settings.queue_size} waiting); retry after {exc.retry_after} s",
                     "rate_limit_error", None, "queue_full", headers={"Retry-After": str(exc.retry_after)})
    except NotReady:
        return error(503, "the model is not ready", "server_error", None, "model_not_ready",
                     headers={"Retry-After": "10"})
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(job.future),
                                        timeout=max(0.0, job.deadline - time.monotonic()))
    except (asyncio.TimeoutError, Cancelled):
        job.cancelled.set()
        return error(504, f"generation did not finish within {settings.request_timeout:g} s", "server_error", None,
                     "timeout")
    except OutOfMemory:
        return error(503, "the GPU ran out of memory for this request; memory was released — retry, or ask for "
                     "fewer pixels or a smaller n", "server_error", None, "out_of_memory", headers={"Retry-After": "1"})
    access["queue_wait"] = max(0.0, time.monotonic() - started - sum(result.timings.values()))
    images = await run_in_threadpool(lambda: [base64.b64encode(Runtime.encode(im)).decode() for im in result.images])
    state.metrics.images.inc(len(images))
    state.metrics.latency.observe(time.monotonic() - started)
    loaded = worker.runtime.loaded
    # A JSONResponse is returned as is (the schema above documents it; re-validating 4 MB of base64 would
    # cost more than it checks).
    return JSONResponse({
        "created": int(time.time()),
        "data": [{"b64_json": b, "revised_prompt": None} for b in images],
        "sd35": {"seed": req.seed, "seeds": result.seeds, "steps": req.steps, "guidance_scale": req.guidance, "size": size,
                 "precision": loaded.plan.transformer, "device": loaded.device,
                 "timings_s": {k: round(v, 4) for k, v in result.timings.items()}, "notice": loaded.source.notice},
    })


@router.get("/v1/models")
async def list_models(request: Request):
    settings = request.app.state.settings
    created = request.app.state.started
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "sd35"}
                                       for m in served_model_ids(settings)]}


@router.get("/healthz")
async def healthz():
    """Alive (the process answers). No auth, no model needed: for load balancers and HEALTHCHECK."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready to generate: the model is loaded and warmed up. Reports the real device and precision."""
    worker = request.app.state.worker
    if worker.state != "ready":
        body = {"status": worker.state}
        if worker.error is not None:
            body["error"] = str(worker.error).splitlines()[0]
        return JSONResponse(body, status_code=503)
    loaded = worker.runtime.loaded
    return {"status": "ready", "model": loaded.source.requested, "commit": loaded.source.commit,
            "device": loaded.hardware.as_dict(), "precision": loaded.plan.as_dict(), "queue_size":
            request.app.state.settings.queue_size, "queue_depth": worker.queue.qsize()}


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
