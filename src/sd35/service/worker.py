"""The one GPU worker: owns the pipeline, takes jobs from a bounded queue, one at a time.

Why a single worker thread: diffusers pipelines are not thread-safe — two requests in one pipeline
corrupt the shared scheduler state — and one GPU runs one generation at a time anyway. HTTP handlers
only enqueue a job and await its future, so the event loop stays free for /healthz, /metrics and 429s.

The queue is bounded (SD35_QUEUE_SIZE): a burst beyond it is pushed back with 429 + Retry-After instead
of piling up until every request times out. A job that outlives its deadline is stopped at the next
denoising step (504), so a stuck client never holds the GPU. A CUDA OOM fails only its own job (503),
after the cached memory is released, and the next job runs normally.

The worker also reports progress (a heartbeat at every step and every idle second) for systemd's
watchdog: a GPU hung inside a kernel stops the heartbeat, systemd restarts the unit.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from .. import generate as gen
from ..errors import Sd35Error
from ..load import LoadedPipeline, load
from ..settings import Settings
from . import notify

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: come back in `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is not loaded (yet, or it failed to load)."""


class Cancelled(Exception):
    """The job passed its deadline (or its client gave up) and was stopped at a step boundary."""


class OutOfMemory(Exception):
    """CUDA ran out of memory for this job; the cache was released and the worker goes on."""


@dataclass
class Job:
    request: gen.GenerationRequest
    n: int
    deadline: float  # time.monotonic() after which the job is abandoned
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, settings: Settings, *, loader=load):
        self.settings = settings
        self.loader = loader
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.queue_size)
        self.state = "starting"  # starting | loading | warming up | ready | failed | stopped
        self.loaded: LoadedPipeline | None = None
        self.error: Exception | None = None
        self.heartbeat = time.monotonic()
        self.busy = False
        self.avg_job_seconds = 5.0  # refined by an exponential moving average of real jobs
        self.on_failed = None  # callable(exc), set by the server to stop itself
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd35-gpu-worker", daemon=True)

    # --- called from the event loop -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: gen.GenerationRequest, n: int, timeout: float) -> Job:
        if self.state != "ready":
            raise NotReady(self.state)
        job = Job(request, n, time.monotonic() + timeout)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(self.retry_after()) from None
        return job

    def retry_after(self) -> int:
        waiting = self.queue.qsize() + (1 if self.busy else 0)
        return max(1, math.ceil(self.avg_job_seconds * max(1, waiting)))

    def stop(self, timeout: float) -> None:
        """Let the queued jobs finish (up to `timeout` seconds), then stop the thread."""
        deadline = time.monotonic() + timeout
        while (self.busy or not self.queue.empty()) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.state = "stopped"

    # --- the worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - any load failure ends the service cleanly
            self.state, self.error = "failed", exc
            notify.notify(f"STATUS=failed to load: {exc}".splitlines()[0])
            log.error("model failed to load: %s", exc)
            if self.on_failed:
                self.on_failed(exc)
            return
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                job = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self._process(job)

    def _load(self) -> None:
        s = self.settings
        self.state = "loading"
        notify.notify(f"STATUS=loading {s.model} ({s.precision})", "EXTEND_TIMEOUT_USEC=60000000")
        stop_extending = threading.Event()

        started = time.monotonic()

        def extend():  # keep systemd's start timeout (and the watchdog) quiet during a long first load, but
            while not stop_extending.wait(20):  # only up to SD35_LOAD_TIMEOUT: a hung load must still fail
                if time.monotonic() - started > s.load_timeout:
                    notify.notify(f"STATUS=load exceeded SD35_LOAD_TIMEOUT={s.load_timeout:g}s")
                    log.error("loading has taken over %.0f s; no longer extending systemd's start timeout",
                              s.load_timeout)
                    return
                self.heartbeat = time.monotonic()
                notify.notify("EXTEND_TIMEOUT_USEC=60000000", f"STATUS=still loading {s.model}")

        threading.Thread(target=extend, name="sd35-extend-timeout", daemon=True).start()
        try:
            self.loaded = self.loader(s)
            if s.breaks:  # SD35_BREAK in a service: stop in diffusers during a request (attach first)
                from .. import debug

                breaks = debug.parse(s.breaks)
                debug.validate(breaks, self.loaded.pipe)
                debug.arm(self.loaded.pipe, breaks, s.output_dir)
            if s.warmup:
                self.state = "warming up"
                notify.notify("STATUS=warming up")
                d = self.loaded.source.defaults
                t = time.perf_counter()
                gen.run(self.loaded, gen.GenerationRequest("warm-up", steps=1, guidance=d["guidance"],
                                                           height=min(d["height"], 512), width=min(d["width"], 512)),
                        on_step=self._beat)
                log.info("warm-up took %.2f s", time.perf_counter() - t)
        finally:
            stop_extending.set()
        self.state = "ready"
        p = self.loaded.plan
        notify.notify("READY=1", f"STATUS=ready: {s.model} {p.transformer} on {self.loaded.device}")
        log.info("ready: %s, %s on %s", s.model, p.transformer, self.loaded.device)

    def _beat(self, step: int, total: int) -> None:
        self.heartbeat = time.monotonic()

    def _process(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its client already gave up
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            job.future.set_exception(Cancelled("deadline passed while queued"))
            return

        def on_step(step: int, total: int) -> None:
            self.heartbeat = time.monotonic()
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                raise Cancelled(f"stopped at step {step}/{total}")

        self.busy = True
        started = time.perf_counter()
        try:
            result = gen.run(self.loaded, job.request, num_images=job.n, on_step=on_step)
        except Cancelled as exc:
            job.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - every failure goes to its own request
            if _is_oom(exc):
                self._release_memory()
                log.warning("job %s: CUDA out of memory; memory released", job.id)
                job.future.set_exception(OutOfMemory(str(exc).splitlines()[0] if str(exc) else "out of memory"))
            elif isinstance(exc, Sd35Error):
                job.future.set_exception(exc)
            else:
                log.exception("job %s failed", job.id)
                job.future.set_exception(exc)
        else:
            seconds = time.perf_counter() - started
            self.avg_job_seconds = 0.8 * self.avg_job_seconds + 0.2 * seconds
            job.future.set_result(result)
        finally:
            self.busy = False
            self.heartbeat = time.monotonic()

    def _release_memory(self) -> None:
        import torch

        self.loaded.pipe.maybe_free_model_hooks()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "CUDA out of memory" in str(exc)
