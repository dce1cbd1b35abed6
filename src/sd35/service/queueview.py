"""A queue people can see: GET /v1/queue, DELETE /v1/queue/{id}, and the 429s of the fair queue.

Why: "is it my turn yet?" was a guess — the page said "waiting for the GPU" and nothing else. Now each key
sees its own jobs (prompt, position, estimated start and end, from the worker's measured pixel-steps
per second) and, for everybody else, totals only: how many jobs, from how many keys — never their prompts.
A job is identified by its request id (the `X-Request-Id` its client sent, or the one the service made
up and returned); its owner — the same key, nobody else — can withdraw it while it still waits.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sd35.service.scheduler import DEFAULT_JOB_SECONDS, KeyBusy, QuotaExceeded
from sd35.service.schemas import error_body

router = APIRouter()
ANONYMOUS = "anonymous"  # the key name when the service runs without keys (loopback, one user)


def _error(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, None, code), status_code=status, headers=headers)


def owner(request: Request) -> dict:
    """worker.submit's key= and ref= for this request (GuardMiddleware put them in the scope's state)."""
    return {"key": getattr(request.state, "key", None) or ANONYMOUS, "ref": getattr(request.state, "request_id", None)}


def refused(exc: Exception, settings) -> JSONResponse:
    """The fair queue's refusals → 429 with Retry-After (this key only; the others are unaffected)."""
    if isinstance(exc, QuotaExceeded):
        resets = exc.resets.strftime("%Y-%m-%dT%H:%M:%SZ")
        more = f" (+{exc.pending} queued or running)" if exc.pending else ""
        return _error(429, f"key {exc.key!r} has used {exc.used}{more} of its {exc.limit} images for today; the "
                      f"quota resets at {resets} (00:00 UTC) — ask the admin for more: sd35 keys set {exc.key} "
                      "--daily-images N", "rate_limit_error", "quota_exceeded",
                      {"Retry-After": str(exc.retry_after), "X-Quota-Reset": resets})
    assert isinstance(exc, KeyBusy)
    per_key = settings.queue_per_key or settings.queue_size
    return _error(429, f"key {exc.key!r} already has {exc.waiting} jobs waiting (SD35_QUEUE_PER_KEY={per_key}); "
                  f"retry after {exc.retry_after} s — other keys are not affected", "rate_limit_error",
                  "key_queue_full", {"Retry-After": str(exc.retry_after)})


def withdrawn() -> JSONResponse:
    return _error(409, "this job was cancelled by its owner while it waited (DELETE /v1/queue/{id})",
                  "invalid_request_error", "cancelled")


def _item(job, position: int, start: float, end: float, now: float) -> dict:
    r = job.request
    return {"id": job.ref or job.id, "state": "running" if position == 0 else "queued", "position": position,
            "prompt": r.prompt, "n": job.n, "size": f"{r.width}x{r.height}", "steps": r.steps,
            "estimated_start_s": round(start, 1), "estimated_end_s": round(end, 1),
            "estimated_start_at": int(now + start), "estimated_end_at": int(now + end)}


@router.get("/v1/queue")
async def get_queue(request: Request):
    """Your jobs (position 1 runs next; 0 = running now) with estimated start and end in seconds from now,
    and totals for everybody else's (no prompts)."""
    worker = request.app.state.worker
    key = owner(request)["key"]
    q = worker.queue
    estimates = q.estimates()
    rate, _ = q.status()
    running = q.running()  # one job, or several sharing a batch (SD35_BATCH_WINDOW_MS)
    now = time.time()
    mine, others, other_keys = [], 0, set()
    for job in running:
        if job.key == key:
            mine.append(_item(job, 0, 0.0, job.work / rate if rate else DEFAULT_JOB_SECONDS, now))
    for position, (job, start, end) in enumerate(estimates, 1):
        if job.key == key:
            mine.append(_item(job, position, start, end, now))
        else:
            others += 1
            other_keys.add(job.key)
    running_other = sum(1 for job in running if job.key != key)
    return {"object": "queue", "key": key, "data": mine,
            "others": {"queued": others, "keys": len(other_keys), "running": running_other},
            "total": {"queued": len(estimates), "running": len(running)},
            **worker.keep_alive.describe()}


@router.delete("/v1/queue/{job_id}")
async def cancel_queued(job_id: str, request: Request):
    """Withdraw one of your jobs while it still waits; its request then answers 409 `cancelled`."""
    worker = request.app.state.worker
    key = owner(request)["key"]
    if worker.queue.withdraw(key, job_id):
        return {"id": job_id, "object": "queue.job", "cancelled": True}
    if any(job.key == key and job_id in (job.ref, job.id) for job in worker.queue.running()):
        return _error(409, f"job {job_id!r} is already running; close its request to stop it at the next step",
                      "invalid_request_error", "already_running")
    return _error(404, f"you have no queued job {job_id!r} (GET /v1/queue lists yours)", "invalid_request_error",
                  "not_found")
