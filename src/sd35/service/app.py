"""The FastAPI application: auth, request ids, metrics, OpenAI-style errors, and the worker's lifespan.

Why errors are rewritten here: the official `openai` client and every OpenAI-compatible tool expect
`{"error": {"message", "type", "param", "code"}}`; FastAPI's default 422 `{"detail": [...]}` breaks them.
Validation problems become 400 naming the field; anything unexpected becomes a 500 with a request id
(the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd35 import __version__
from sd35.inference import compilation
from sd35.settings import Settings
from sd35.service import edits, loras, notify, openapi, page, queueview, status
from sd35.service.imagestore import make_store
from sd35.service.limits import BodyLimitMiddleware, CutOffMiddleware
from sd35.service.metrics import Metrics
from sd35.service.routes import error, router
from sd35.service.worker import Worker

log = logging.getLogger(__name__)
access_log = logging.getLogger("sd35.access")  # one line per request: who, what, how long
OPEN_PATHS = {"/healthz"}  # everything else needs the API key when one is set
JSON_BODY_PATHS = {"/v1/images/generations"}
AUTH_THREADS = 1  # scrypt checks (older key lines) at once (16 MiB, one core each), on their own limiter
#                  that checks requests and encodes images; one, so a flood of wrong keys holds one core at most
AUTH_WAITING = 64  # first-sight tokens waiting for a check beyond which a new one is told to retry (429)
WRONG_KEYS_PER_S, WRONG_KEYS_BURST, WRONG_KEYS_MAX_WAIT = 25.0, 25, 10.0  # answers to wrong keys: see Pace
KNOWN_PATHS = {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/loras", "/v1/queue", "/healthz", "/readyz",
               "/metrics", "/openapi.json",
               "/docs"}


def progressing(worker: Worker, limit: float) -> bool:
    """The worker made progress within `limit` s (a step, an idle second), or is compiling — a compile has no
    steps to beat with — for less than SD35_LOAD_TIMEOUT (a compile hung past that is a hang)."""
    if worker.state == "failed":
        return False
    compiling = compilation.compiling_for()
    return time.monotonic() - worker.heartbeat < limit or (
        compiling is not None and compiling < worker.settings.load_timeout)


def _watchdog(worker: Worker, stop: threading.Event) -> None:
    """Ping systemd's watchdog while the GPU worker makes progress (`progressing`)."""
    interval = notify.watchdog_interval()
    if interval is None:
        return
    limit = interval * 2  # WatchdogSec
    while not stop.wait(interval):
        if progressing(worker, limit):
            notify.notify("WATCHDOG=1")
        else:
            log.error("GPU worker made no progress for %.0f s: withholding the watchdog ping", limit)


class Pace:
    """Answers to wrong or missing keys: at most `rate` a second for the whole service (`burst` at once);
    the rest wait their turn, asleep (at most `max_wait` s). A generic cell-rate algorithm, one float.

    Why: a wrong key costs no hashing any more, yet a flood of them still costs the event loop, the access log
    and the GIL a share of every generation — measured 3.5x (random keys) to 10x (a real key id) a valid
    user's latency on a 2-core box, two clients flooding. Per-address limits cannot help: every tunnelled
    user comes from 127.0.0.1. Paced, a flood of closed-loop clients sends `rate` requests/s however many
    they are (a client holding N connections: N / max_wait at most), a valid key never waits, and a typo
    is answered at once unless a flood is on."""

    def __init__(self, rate: float, burst: int, max_wait: float, clock=time.monotonic):
        self.rate, self.tau, self.max_wait, self.clock = rate, (burst - 1) / rate, max_wait, clock
        self.tat = 0.0  # the theoretical arrival time of the next answer

    def delay(self) -> float:
        """Seconds this answer waits (and its slot taken)."""
        now = self.clock()
        tat = max(self.tat, now)
        wait = min(self.max_wait, max(0.0, tat - now - self.tau))
        self.tat = min(tat, now + self.tau + self.max_wait) + 1 / self.rate
        return wait


class GuardMiddleware:
    """Request ids, API-key auth, the JSON content-type check, 500s with an id, request metrics and the
    access log (`sd35.access`: key name, status, size × n × steps, queue wait, duration — the generation
    route leaves its part in `request.state.access`).

    A plain ASGI middleware (not `@app.middleware("http")`, whose task-group plumbing costs about a
    millisecond per request): it answers refused requests itself and passes the rest through untouched.
    """

    def __init__(self, app, settings: Settings, metrics: Metrics, keys=None):
        from sd35.service.auth import KeyRing

        self.app, self.settings, self.metrics = app, settings, metrics
        self.keys = keys if keys is not None else KeyRing([], None)
        self._auth_limiter = None  # anyio.CapacityLimiter(AUTH_THREADS), made in the event loop
        self.pace = Pace(WRONG_KEYS_PER_S, WRONG_KEYS_BURST, WRONG_KEYS_MAX_WAIT)  # 401s and auth 429s

    async def _identify(self, token: str):
        """A first-sight token naming an older (scrypt) key line: its one scrypt on the auth limiter. Returns a name, None, or "busy" when the
        limiter's queue is full (a flood of wrong tokens: they wait, not the pool every request needs)."""
        import anyio

        if self._auth_limiter is None:
            self._auth_limiter = anyio.CapacityLimiter(AUTH_THREADS)
        if self._auth_limiter.statistics().tasks_waiting >= AUTH_WAITING:
            return "busy"
        return await anyio.to_thread.run_sync(self.keys.identify, token, limiter=self._auth_limiter)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        path, method = scope["path"], scope["method"]
        status = {"code": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        started = time.monotonic()
        refused, who = None, "-"
        if self.keys and path not in OPEN_PATHS and not (method in ("GET", "HEAD") and path in page.PAGE_PATHS):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            known, name = self.keys.cached(token) if token else (True, None)
            if not known:  # first sight of a token naming a scrypt line: one scrypt, on the auth limiter
                name = await self._identify(token)
            if name in ("busy", None):  # a flood of wrong keys paces itself (Pace); valid keys never wait
                wait = self.pace.delay()
                if wait:
                    await asyncio.sleep(wait)
            if name == "busy":
                refused = error(429, "too many API keys are being checked right now; retry in a second",
                                "rate_limit_error", None, "auth_busy", headers={"Retry-After": "1"})
            elif name is None:
                refused = error(401, "missing or wrong API key: send `Authorization: Bearer <your key>` (ask the "
                                "admin for one: `sd35 keys add NAME`)", "invalid_request_error", None,
                                "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            else:
                who = name
                scope.setdefault("state", {})["key"] = name  # sharing: whose turn/quota (queueview.owner)
        scope.setdefault("state", {})["request_id"] = request_id  # sharing: the job's id in GET /v1/queue
        if refused is None and method == "POST" and path in JSON_BODY_PATHS:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                refused = error(415, f"Content-Type must be application/json (got {ctype or 'none'!r})",
                                "invalid_request_error", None, "unsupported_media_type")
        try:
            if refused is not None:
                await refused(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - a 500 with an id, the traceback in the log
            log.exception("request %s %s %s failed", request_id, method, path)
            if not status["started"]:
                await error(500, f"internal error (request id {request_id}); the server log has the details",
                            "server_error", None, "internal_error")(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (path if path in KNOWN_PATHS else "unmatched")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            job = (scope.get("state") or {}).get("access") or {}
            what = (f" size={job['size']} n={job['n']} steps={job['steps']}" if "size" in job else "") + (
                f" queue_wait={job['queue_wait']:.3f}s" if "queue_wait" in job else "")
            access_log.info("key=%s status=%s %s %s%s duration=%.3fs id=%s", who, status["code"], method, path,
                            what, time.monotonic() - started, request_id)


def refuse_keyless(settings: Settings, keys, host: str) -> None:
    """Every entry point (sd35 serve, create_app, a Ray replica) refuses to serve a non-loopback address
    with no key, unless SD35_ALLOW_NO_KEY says a proxy in front authenticates."""
    from sd35.errors import InputError
    from sd35.net import is_loopback

    if not keys and not settings.allow_no_key and not is_loopback(host):
        raise InputError(
            f"refusing to serve on {host}:{settings.port} without an API key: anyone who can reach that address "
            "could use the GPU.",
            "create per-user keys (`sd35 keys add NAME`, SD35_API_KEYS_FILE) or set SD35_API_KEY (clients send "
            "`Authorization: Bearer <key>`), bind 127.0.0.1 and use an SSH tunnel, or pass --allow-no-key "
            "(SD35_ALLOW_NO_KEY=1) if a proxy in front does authentication.", param="host")


def create_app(settings: Settings, worker: Worker | None = None, *, host: str | None = None) -> FastAPI:
    """The app. `host`: the address clients reach it on (default SD35_HOST; a Ray replica passes its
    proxy's, which is reachable from other nodes): keyless on a non-loopback one is refused here."""
    from sd35.service.auth import load as load_keys

    keys = load_keys(settings)  # an unreadable or broken keys file fails here, before anything starts
    refuse_keyless(settings, keys, host or settings.host)
    worker = worker or Worker(settings)
    stop_watchdog = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        threading.Thread(target=_watchdog, args=(worker, stop_watchdog), name="sd35-watchdog", daemon=True).start()
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; the worker's one grace began at
        # SIGTERM (server.py), so this only stops it at a step boundary and joins it.
        notify.notify("STOPPING=1", "STATUS=stopping")
        stop_watchdog.set()
        # In a thread: the event loop must stay free to write the 503s of requests cut off by the grace.
        await asyncio.to_thread(worker.stop, timeout=settings.shutdown_grace)

    app = FastAPI(title="sd35 image API", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible image generation with Stable Diffusion 3.5 (bf16 / FP8).")
    app.state.settings = settings
    app.state.worker = worker
    app.state.metrics = Metrics(worker)
    app.state.started = int(time.time())
    app.state.images = make_store(settings)
    app.include_router(router)
    app.include_router(status.router)  # /v1/models, image links, /healthz, /readyz, /metrics
    app.include_router(edits.router)  # POST /v1/images/edits (multipart), answered by routes.answer
    app.include_router(loras.router)  # GET /v1/loras: what SD35_LORA_DIR offers
    app.include_router(queueview.router)  # GET /v1/queue, DELETE /v1/queue/{id} (sharing)
    app.include_router(page.router)  # GET /: the team's web page (its paths are open: page.PAGE_PATHS)
    app.openapi = lambda: app.openapi_schema or setattr(app, "openapi_schema", openapi.build(app)) \
        or app.openapi_schema

    app.state.keys = keys
    worker.queue.policies = {e.name: e.policy for e in keys.entries}  # sharing: priority, quota
    # The last added runs first: the guard (auth, content type, ids, metrics, access log), the body limits,
    # then the shutdown's last-resort 503.
    app.add_middleware(CutOffMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=app.state.metrics, keys=app.state.keys)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON", "invalid_request_error", None, "invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        msg = first.get("msg", "invalid request")
        if not loc:
            msg = f"the request body must be a JSON object with a prompt: {msg}"
        return error(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", "invalid_request_error", param,
                     "missing_field" if first.get("type") == "missing" else "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(exc.status_code, str(exc.detail), type_, None, {404: "not_found", 405: "method_not_allowed"}
                     .get(exc.status_code), headers=getattr(exc, "headers", None))

    return app
