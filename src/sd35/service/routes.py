"""The generation endpoint: OpenAI's /v1/images/generations (and `answer`, which /v1/images/edits shares).
What clients and monitors read about the service (/v1/models, image links, /healthz, /readyz, /metrics) is
in status.py.

Every request is checked up front (text, size against the loaded model, n, steps, guidance, enums) and
refused with a 4xx naming the field and the allowed values before it can reach the GPU queue. Jobs that
fail map to 503 (out of memory, shutting down) or 504 (deadline); a client that disconnects cancels its
job at the next denoising step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from sd35.inference import generate as gen
from sd35.errors import InputError, NonFiniteOutput, Sd35Error
from sd35.models import expand_alias
from sd35.runtime import edit_size
from sd35.service import images, imagestore, loras, stream
from sd35.service.schemas import ErrorBody, ImageGenerationRequest, ImagesResponse, error_body, has_lone_surrogate
from sd35.runtime import Cancelled
from sd35.service.worker import Busy, NotReady, OutOfMemory, ShuttingDown, WorkerFailed
from sd35.service import queueview
from sd35.service.scheduler import KeyBusy, QuotaExceeded, Withdrawn  # sharing (issue 27)

log = logging.getLogger(__name__)
router = APIRouter()
_SIZE = re.compile(r"^([1-9][0-9]{1,4})x([1-9][0-9]{1,4})$")
STEP_WINDOW = 1.0  # seconds past the shutdown grace a running job gets to reach its next step
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 415, 429, 500, 503, 504)}


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


@dataclass
class Plan:
    """A checked request: what the worker runs and what the response reports."""

    request: gen.GenerationRequest
    n: int
    size: str
    quality: str
    output_format: str
    output_compression: int | None
    response_format: str
    text_tokens: int
    revised_prompt: str
    notes: list[str] = field(default_factory=list)
    kind: str = "image_generation"  # or image_edit: the name of the streamed events
    image_tokens: int = 0  # an edit's input image, in OpenAI's usage block


def _text(value: str | None, name: str) -> JSONResponse | None:
    if value is None:
        return None
    if has_lone_surrogate(value):
        return _bad(f"{name} contains an unpaired UTF-16 surrogate (e.g. \\ud800 without its partner); send valid "
                    "Unicode text", name)
    if "\x00" in value:
        return _bad(f"{name} must not contain NUL (\\u0000) characters", name)
    return None


def _check(body: ImageGenerationRequest, settings, runtime, reader: images.PromptReader,
           edit: dict | None = None) -> Plan | JSONResponse:
    """Validate a generation request against the model and the service's limits; a JSONResponse means
    refused (4xx naming the field and the allowed values)."""
    defaults = runtime.info.sampling
    # 1. Text fields, the model, the enums and numbers that need no model.
    for name in ("prompt", "negative_prompt", "model", "user", "safety_identifier"):
        if (refused := _text(getattr(body, name), name)) is not None:
            return refused
    if body.model is not None and expand_alias(body.model) not in {expand_alias(m) for m in served_model_ids(settings)}:
        return error(404, f"model {body.model!r} is not served here; this service serves "
                     f"{' = '.join(served_model_ids(settings))} (GET /v1/models)",
                     "invalid_request_error", "model", "model_not_found")
    if not body.prompt.strip():
        return _bad("prompt must not be empty", "prompt")
    for name in ("prompt", "negative_prompt"):
        value = getattr(body, name)
        if value is not None and len(value) > settings.max_prompt_chars:
            return _bad(f"{name} is {len(value)} characters; the limit is {settings.max_prompt_chars} "
                        "(the encoders read at most 256 tokens anyway)", name, "prompt_too_long")
    if body.background == "transparent":
        return _bad("background 'transparent' is not supported: Stable Diffusion 3.5 makes RGB images without an "
                    "alpha channel; use 'opaque' or 'auto'", "background")
    if body.steps is not None and not 1 <= body.steps <= settings.max_steps:
        return _bad(f"steps must be from 1 to {settings.max_steps} (got {body.steps})", "steps")
    if body.guidance_scale is not None and not math.isfinite(body.guidance_scale):
        return _bad("guidance_scale must be a finite number", "guidance_scale")
    # 2. The size, against the loaded MMDiT's position embedding and SD35_MAX_PIXELS.
    width, height = defaults.width, defaults.height
    if edit is not None:  # an edit's "auto" size: its input's, rounded to what the model takes
        width, height = edit_size(runtime.info, edit["image"], None, None, settings.max_pixels)
    if body.size not in (None, "auto"):
        m = _SIZE.match(body.size)
        if not m:
            return _bad(f'size must be "auto" or "WIDTHxHEIGHT", e.g. "{width}x{height}" (got {body.size!r})', "size")
        width, height = int(m.group(1)), int(m.group(2))
    side = runtime.info.max_side  # what the MMDiT's position embedding covers
    if max(width, height) > side:
        return _bad(f"size {width}x{height}: this model supports at most {side} px per side "
                    f"(its position embedding), e.g. \"{min(side, width)}x{min(side, height)}\"", "size")
    if width * height > settings.max_pixels:
        return _bad(f"size {width}x{height} is {width * height} pixels; the limit is {settings.max_pixels} "
                    "(SD35_MAX_PIXELS)", "size")
    # 3. The request against the loaded model (steps from quality, LoRAs, an edit's inputs).
    prompt, notes = images.cap_text(body.prompt)
    negative, negative_notes = images.cap_text(body.negative_prompt or "")
    notes += [f"negative_{note}" for note in negative_notes]
    quality = images.resolve_quality(body.quality)
    steps = body.steps if body.steps is not None else min(settings.max_steps,
                                                          images.quality_steps(quality, defaults.steps))
    try:
        req = runtime.check(prompt=prompt, negative_prompt=negative, steps=steps,
                            guidance=body.guidance_scale, height=height, width=width, seed=body.seed, **(edit or {}),
                            **loras.picks(body))
    except InputError as exc:
        param = {"height": "size", "width": "size", "guidance": "guidance_scale"}.get(exc.param, exc.param)
        return _bad(exc.cause, param)
    # 4. What the tokenizers read (usage, revised_prompt, truncation notes).
    try:
        tokens, revised, prompt_notes = reader.read(req.prompt)
        notes += prompt_notes
    except ValueError as exc:
        return _bad(f"prompt: {exc}", "prompt")
    if req.negative_prompt:
        try:
            neg_tokens, _, neg_notes = reader.read(req.negative_prompt)
        except ValueError as exc:
            return _bad(f"negative_prompt: {exc}", "negative_prompt")
        tokens += neg_tokens
        notes += [f"negative_{note}" for note in neg_notes]
    # 5. The answer's form: format, the link store's room, notes on fields without effect.
    fmt = body.output_format or "png"
    if body.response_format == "url" and not body.stream and \
            imagestore.stored_bound(width, height, body.n) > settings.image_store_bytes:
        return _bad(f"{body.n} image(s) of {width}x{height} may need {imagestore.stored_bound(width, height, body.n)} "
                    f"bytes, more than the link store holds (SD35_IMAGE_STORE_BYTES={settings.image_store_bytes}); "
                    "use response_format b64_json, or ask for fewer or smaller images", "response_format",
                    "too_large_for_url")
    if body.output_compression is not None and fmt == "png":
        notes.append("output_compression applies to jpeg and webp; png is lossless")
    if body.style is not None:
        notes.append("style has no effect on Stable Diffusion 3.5; describe the style in the prompt")
    plan = Plan(req, body.n, f"{width}x{height}", quality, fmt, body.output_compression,
                body.response_format or "b64_json", tokens, revised, notes)
    if req.edit is not None:
        plan.kind, plan.image_tokens = "image_edit", images.image_tokens(*req.edit.source_size)
    return plan


def _job_error(exc: BaseException, settings) -> JSONResponse:
    """A failed job → the response its client gets (OpenAI's error shape); anything unexpected re-raised
    (the middleware turns it into a 500 with a request id)."""
    if isinstance(exc, Withdrawn):  # sharing: its owner cancelled it while queued
        return queueview.withdrawn()
    if isinstance(exc, (asyncio.TimeoutError, Cancelled)):
        return error(504, f"generation did not finish within {settings.request_timeout:g} s (SD35_REQUEST_TIMEOUT)",
                     "server_error", None, "timeout")
    if isinstance(exc, OutOfMemory):
        return error(503, "the service ran out of memory for this request; memory was released — retry, or ask "
                     "for fewer pixels or a smaller n", "server_error", None, "out_of_memory",
                     headers={"Retry-After": "1"})
    if isinstance(exc, WorkerFailed):
        return error(503, "the GPU worker failed and the service is restarting; retry in a moment", "server_error",
                     None, "worker_failed", headers={"Retry-After": "10"})
    if isinstance(exc, ShuttingDown):
        return error(503, "the service is restarting and could not finish this request; retry in a moment",
                     "server_error", None, "shutting_down", headers={"Retry-After": "10"})
    if isinstance(exc, NonFiniteOutput):  # the model's fault, not the request's: no black image, a 500
        return error(500, f"{exc.cause} {exc.fix}", "server_error", None, "nonfinite_output")
    if isinstance(exc, Sd35Error):
        return _bad(f"{exc.cause} {exc.fix}".strip(), getattr(exc, "param", None))
    raise exc


def _error_dict(exc: BaseException, settings) -> dict:
    try:
        return json.loads(_job_error(exc, settings).body)
    except Exception:  # noqa: BLE001 - mid-stream there is no status code left to send: an error event
        log.exception("streamed job failed")
        return error_body("internal error; the server log has the details", "server_error", None, "internal_error")


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()


class ClientGone(Exception):
    """The client closed the connection while its job waited or ran."""


def cut_off(worker) -> bool:
    """SIGTERM's grace is over (plus a moment for the running job to reach its step boundary): answer
    now, whatever the GPU is doing, so every client gets its 503 before uvicorn gives up on it."""
    end = worker.shutdown_deadline
    return end is not None and time.monotonic() > end + STEP_WINDOW


async def _wait(job, request: Request):
    """Await the job; stop it at its next step if the client disconnects, the deadline passes or the
    shutdown grace ends."""
    worker = request.app.state.worker
    done = asyncio.wrap_future(job.future)
    done.add_done_callback(_retrieve)  # a job stopped for a client that left: nobody reads its exception
    while True:
        left = job.deadline - time.monotonic()
        if left <= 0 and not done.done():
            job.cancelled.set()
            raise asyncio.TimeoutError
        if cut_off(worker) and not done.done():
            job.cancelled.set()
            raise ShuttingDown("the shutdown grace ended")
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout=max(0.01, min(0.5, left)))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise ClientGone from None


def _queue_wait(started: float, result) -> float:
    """Seconds the job waited for the GPU: its time since submit less the time its stages took."""
    return max(0.0, time.monotonic() - started - sum(result.timings.values()))


async def _finish(result, plan: Plan, request: Request, *, store: bool) -> tuple[list[dict], dict, dict]:
    """Encode the images (base64 too, off the event loop); `store`: keep them behind links (`url`), all of
    one response together. Returns the `data` items, the usage of one image and of all of them."""
    state = request.app.state
    fmt, compression = plan.output_format, plan.output_compression

    def encode_all() -> tuple[list[bytes], list[str | None]]:
        datas = [images.encode(im, fmt, compression) for im in result.images]
        return datas, [None if store else images.b64(d) for d in datas]

    encoded, b64s = await run_in_threadpool(encode_all)
    width, height = map(int, plan.size.split("x"))
    out_tokens = images.image_tokens(width, height)

    def usage(count: int) -> dict:
        inputs = plan.text_tokens + plan.image_tokens
        return {"input_tokens": inputs,
                "input_tokens_details": {"text_tokens": plan.text_tokens, "image_tokens": plan.image_tokens},
                "output_tokens": out_tokens * count, "total_tokens": inputs + out_tokens * count}

    if store:
        ids = state.images.put_all(encoded, images.MEDIA_TYPES[fmt])  # DoesNotFit: the caller says so
        items = [{"revised_prompt": plan.revised_prompt, "url": _url_for(request, i)} for i in ids]
    else:
        items = [{"revised_prompt": plan.revised_prompt, "b64_json": b} for b in b64s]
    state.metrics.images.inc(len(encoded))
    return items, usage(1), usage(len(encoded))


def _url_for(request: Request, image_id: str) -> str:
    path = f"/v1/images/{image_id}"
    try:
        return str(request.base_url).rstrip("/") + path
    except Exception:  # noqa: BLE001 - a Host header that makes no URL: a relative link still works
        return path


# One Server-Sent Event as OpenAPI before 3.2 describes a stream: `schema` is each event's fields; `data`
# holds the JSON of a partial or completed image (OpenAI's shape).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
    "retry": {"type": "integer"}}}
_GENERATE_RESPONSES = {**_ERRORS, 200: {"description": "The images (JSON), or with `stream: true` Server-Sent "
                                                       "Events: image_generation.partial_image, then "
                                                       "image_generation.completed",
                                        "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=_GENERATE_RESPONSES)
async def create_image(body: ImageGenerationRequest, request: Request):
    """OpenAI's image generation. `stream: true` answers with Server-Sent Events (partial images, then
    the final ones); otherwise JSON. Extensions: seed, steps, guidance_scale, negative_prompt."""
    return await answer(body, request)


async def answer(body: ImageGenerationRequest, request: Request, edit: dict | None = None,
                 notes: tuple[str, ...] = ()):
    """Check, queue, wait or stream, respond: a generation, or with `edit` (image, mask, strength: the
    Runtime.check fields) an edit (service/edits.py), whose `notes` join the plan's."""
    state = request.app.state
    settings, worker = state.settings, state.worker
    # 1. Refused before any work: shutting down, not ready, or the request itself (a 4xx naming the field).
    if worker.shutdown_deadline is not None:
        return _job_error(ShuttingDown(), settings)
    if worker.state != "ready":
        return error(503, f"the model is not ready ({worker.state})", "server_error", None, "model_not_ready",
                     headers={"Retry-After": "10"})
    if getattr(state, "prompt_reader", None) is None:
        state.prompt_reader = images.PromptReader(worker.runtime.pipe)
    plan = await run_in_threadpool(_check, body, settings, worker.runtime, state.prompt_reader, edit)
    if isinstance(plan, JSONResponse):
        return plan
    plan.notes.extend(notes)
    request.state.access = access = {"size": plan.size, "n": plan.n, "steps": plan.request.steps}  # access log
    # 2. Queued (this key's turn, cap and quota), or refused with a 429/503.
    started = time.monotonic()
    previews: asyncio.Queue = asyncio.Queue()
    on_latents = None
    if body.stream and body.partial_images:
        on_latents = stream.preview_callback(asyncio.get_running_loop(), previews, plan.request.denoising_steps,
                                             body.partial_images)
    try:
        job = worker.submit(plan.request, plan.n, settings.request_timeout, on_latents=on_latents,
                            **queueview.owner(request))  # sharing: the key's turn, cap and quota
    except (KeyBusy, QuotaExceeded) as exc:  # sharing: 429 for this key alone
        return queueview.refused(exc, settings)
    except Busy as exc:
        return error(429, f"the GPU queue is full ({settings.queue_size} waiting); retry after {exc.retry_after} s",
                     "rate_limit_error", None, "queue_full", headers={"Retry-After": str(exc.retry_after)})
    except ShuttingDown as exc:
        return _job_error(exc, settings)
    except NotReady:
        return error(503, "the model is not ready", "server_error", None, "model_not_ready",
                     headers={"Retry-After": "10"})
    log.info("job %s: n=%d size=%s steps=%d user=%r", job.id, plan.n, plan.size, plan.request.steps,
             body.safety_identifier or body.user)

    # 3. Streamed: previews, then the images, as OpenAI's events.
    if body.stream:
        async def finish(result) -> list[dict]:  # streamed images travel as base64 (OpenAI's events)
            access["queue_wait"] = _queue_wait(started, result)  # logged when the stream ends
            items, one, _ = await _finish(result, plan, request, store=False)
            state.metrics.latency.observe(time.monotonic() - started)
            return [{"b64_json": it["b64_json"], "usage": one} for it in items]

        return StreamingResponse(stream.events(job, previews, plan, finish, lambda exc: _error_dict(exc, settings),
                                               lambda: cut_off(worker)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    # 4. Or waited for, encoded (stored for url links) and answered as one JSON body.
    try:
        result = await _wait(job, request)
    except ClientGone:  # nobody reads this answer; the job was stopped at its next step
        return error(499, "client closed the request", "invalid_request_error", None, "client_closed")
    except Exception as exc:  # noqa: BLE001 - mapped to 503/504/400, anything else re-raised (500)
        return _job_error(exc, settings)
    access["queue_wait"] = _queue_wait(started, result)
    try:
        items, _, usage = await _finish(result, plan, request, store=plan.response_format == "url")
    except imagestore.DoesNotFit as exc:
        return _bad(f"the images of this response ({exc}) do not fit the link store (SD35_IMAGE_STORE_BYTES); use "
                    "response_format b64_json, or ask for fewer or smaller images", "response_format",
                    "too_large_for_url")
    state.metrics.latency.observe(time.monotonic() - started)
    loaded = worker.runtime.loaded
    r = plan.request
    # A JSONResponse is returned as is (the schema above documents it; re-validating 4 MB of base64 would
    # cost more than it checks).
    return JSONResponse({
        "created": int(time.time()),
        "data": items,
        "background": "opaque",
        "output_format": plan.output_format,
        "quality": plan.quality,
        "size": plan.size,
        "usage": usage,
        "sd35": {"seed": r.seed, "seeds": result.seeds, "steps": r.steps, "guidance_scale": r.guidance,
                 "size": plan.size, "quality": plan.quality, "precision": loaded.plan.transformer,
                 "emulated": loaded.plan.emulated, "device": loaded.device,
                 "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
                 "notes": plan.notes, "notice": loaded.source.notice, "lora": worker.runtime.lora_record(r),
                 **({"edit": r.edit.record()} if r.edit is not None else {}),
                 **({"batch": result.batch} if getattr(result, "batch", None) else {})},
    })
