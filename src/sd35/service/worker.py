"""The one GPU worker: owns the pipeline, takes jobs from a bounded queue, one at a time.

Why a single worker thread: diffusers pipelines are not thread-safe — two requests in one pipeline
corrupt the shared scheduler state — and one GPU runs one generation at a time anyway. HTTP handlers
only enqueue a job and await its future, so the event loop stays free for /healthz, /metrics and 429s.

The queue is bounded (SD35_QUEUE_SIZE): a burst beyond it is pushed back with 429 + Retry-After instead
of piling up until every request times out. A job that outlives its deadline is stopped at the next
denoising step (504), so a stuck client never holds the GPU. A CUDA OOM fails only its own job (503),
after the cached memory is released, and the next job runs normally; the CPU allocator's "can't allocate
memory" (and Python's MemoryError) is treated the same way.

The worker also reports progress (a heartbeat at every step and every idle second) for systemd's
watchdog: a GPU hung inside a kernel stops the heartbeat, systemd restarts the unit.

A worker that cannot go on must not look ready: when an exception escapes a job's handling (or releasing
memory fails), or CUDA reports a sticky error (a device-side assert, an illegal address: every later
kernel fails too), the worker turns "failed" (/readyz 503), every job waiting gets a JSON 503 at once,
and `on_failed` makes the process exit non-zero, so systemd restarts it and Ray replaces the replica.
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

from sd35.inference import generate as gen
from sd35.errors import Sd35Error
from sd35.runtime import Cancelled, Runtime
from sd35.settings import Settings
from sd35.service import batching, images, notify
from sd35.service import quotas, scheduler  # sharing: the fair queue (issue 27)
from sd35.service.keepalive import KeepAlive  # sharing: SD35_KEEP_ALIVE (issue 27)

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: come back in `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is not loaded (yet, or it failed to load)."""


class OutOfMemory(Exception):
    """CUDA ran out of memory for this job; the cache was released and the worker goes on."""


class ShuttingDown(Exception):
    """The service is stopping: the job was not started, or was stopped at a step, within the grace."""


class WorkerFailed(Exception):
    """The GPU worker died (an unexpected fault or a sticky CUDA error): no job can run in this process."""


# CUDA errors after which the context is unusable: every later kernel fails with the same error.
STICKY_CUDA = ("device-side assert", "illegal memory access", "illegal address", "illegal instruction",
               "unspecified launch failure", "misaligned address", "CUDA error: an illegal",
               "uncorrectable ECC error", "CUDA driver version is insufficient", "cudaErrorLaunchFailure")


@dataclass
class Job:
    request: gen.GenerationRequest
    n: int
    deadline: float  # time.monotonic() after which the job is abandoned
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_latents: object = None  # callable(batch, step, latents) for streamed previews
    batches: int = 1  # n runs in batches of SD35_MAX_IMAGES
    done_steps: int = 0  # denoising steps finished (over all batches)
    key: str = "anonymous"  # sharing: the API key's name (its turn, cap and quota: scheduler.py)
    ref: str | None = None  # sharing: the request id its owner sees in GET /v1/queue
    queued_at: float = field(default_factory=time.monotonic)  # batching: the window counts from here
    share: float = 1.0  # batching: its part of a shared batch's GPU-seconds (by images)

    @property
    def total_steps(self) -> int:
        return self.request.steps * self.batches

    @property
    def work(self) -> float:
        """Pixel-steps still to do: what Retry-After is computed from."""
        r = self.request
        left = max(0, self.total_steps - self.done_steps) / max(1, self.total_steps)
        return r.width * r.height * r.steps * self.n * left


class Worker:
    def __init__(self, settings: Settings, *, loader=None):
        self.settings = settings
        # settings -> Runtime (tests pass a fake). "serve": SD35_COMPILE=auto compiles on CUDA, in the warm-up.
        self.loader = loader or (lambda s: Runtime.load(s, purpose="serve"))
        # sharing: turns per API key instead of FIFO (scheduler.py); usage goes to the ledger in SD35_STATE_DIR.
        self.queue = scheduler.FairQueue(settings.queue_size, settings.queue_per_key,
                                         ledger=quotas.Ledger(quotas.state_dir(settings)),
                                         status=lambda: (self.rate, self.current))
        self.keep_alive = KeepAlive(settings)  # sharing: release when idle, reload on the next job
        self.state = "starting"  # starting | loading | warming up | ready | failed | stopped
        self.runtime: Runtime | None = None
        self.error: Exception | None = None
        self.heartbeat = time.monotonic()
        self.busy = False
        self.rate: float | None = None  # pixel-steps per second, measured from finished jobs (and warm-up)
        self._rate_jobs = 0  # finished jobs in self.rate
        self.current: Job | None = None
        self.shutdown_deadline: float | None = None  # time.monotonic() when SIGTERM's grace ends
        self.on_failed = None  # callable(exc), set by the server to stop itself
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd35-gpu-worker", daemon=True)

    # --- called from the event loop -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: gen.GenerationRequest, n: int, timeout: float, on_latents=None,
               key: str = "anonymous", ref: str | None = None) -> Job:
        if self.shutdown_deadline is not None:
            raise ShuttingDown("the service is shutting down")
        if self.state != "ready":
            raise NotReady(self.state)
        job = Job(request, n, time.monotonic() + timeout, on_latents=on_latents,
                  batches=math.ceil(n / self.settings.max_images), key=key, ref=ref)
        try:  # sharing: also raises scheduler.KeyBusy / QuotaExceeded (the routes answer 429)
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(self.retry_after()) from None
        if self.state == "failed":  # it died between the check above and the put: nobody will take the job
            self._fail_queued(WorkerFailed(f"the GPU worker failed: {self.error}"))
        return job

    def work_ahead(self) -> float:
        """Pixel-steps of the running job's remaining steps and of every queued job."""
        with self.queue.mutex:
            queued = list(self.queue.queue)
        current = self.current
        return sum(j.work for j in queued) + (current.work if current is not None else 0.0)

    def retry_after(self) -> int:
        """Seconds until the work ahead is done at the measured rate (10 s per job before any measure)."""
        if not self.rate:
            return max(1, 10 * (self.queue.qsize() + (1 if self.busy else 0)))
        return max(1, math.ceil(self.work_ahead() / self.rate))

    def drain(self, grace: float) -> None:
        """SIGTERM: refuse new jobs; what runs and waits may finish until now + `grace`, no later (the
        running job is then stopped at its next step, the queued ones refused with 503)."""
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + grace

    def stop(self, timeout: float) -> None:
        """Drain (if SIGTERM did not start it) and stop the thread at a step boundary, joined: a thread
        left inside torch while the interpreter exits aborts the process (exit 134)."""
        self.drain(timeout)
        # unfinished_tasks counts a job from its put to its task_done, so a job the worker has just taken
        # (not yet `busy`) still counts: it finishes within the grace, or stops at a step with a 503.
        while self.queue.unfinished_tasks and self._thread.is_alive() and time.monotonic() < self.shutdown_deadline:
            time.sleep(0.05)
        self._stop.set()  # a running job stops at its next step with ShuttingDown (503), never Cancelled (504)
        self._thread.join(timeout=max(5.0, self.shutdown_deadline - time.monotonic()))
        self._fail_queued(ShuttingDown("the service stopped before this job could start"))
        self.state = "stopped"

    def _fail_queued(self, exc: Exception) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            self.queue.task_done()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)

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
        job = None
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    job = self.queue.get(timeout=0.5)
                except queue.Empty:
                    job = None
                    self.keep_alive.idle(self)  # sharing: release after SD35_KEEP_ALIVE of idleness
                    continue
                if not self.keep_alive.wake(self, job):  # sharing: reload a released model first
                    self.queue.task_done()
                    continue
                self.current = job
                jobs = batching.gather(self.queue, job, self.settings)  # SD35_BATCH_WINDOW_MS: others join
                try:
                    self._process(jobs)
                finally:
                    self.current = None
                    for _ in jobs:
                        self.queue.task_done()
        except BaseException as exc:  # noqa: BLE001 - a fault in the loop itself: never a silent dead thread
            self._die(exc, job=job)

    def _die(self, exc: BaseException, job: Job | None = None) -> None:
        """No job can run any more: not ready, every waiting client answered (503) now, the process told."""
        self.state, self.error = "failed", exc
        log.error("the GPU worker failed: %s: %s; refusing jobs, the process exits", type(exc).__name__,
                  str(exc).splitlines()[0] if str(exc) else "")
        notify.notify(f"STATUS=GPU worker failed: {type(exc).__name__}")
        failed = WorkerFailed(f"the GPU worker failed ({type(exc).__name__})")
        if job is not None and not job.future.done():
            try:
                job.future.set_exception(failed)
            except concurrent.futures.InvalidStateError:  # its client cancelled it meanwhile
                pass
        self._fail_queued(failed)
        if self.on_failed:
            self.on_failed(exc)

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
            # The runtime loads the model and arms SD35_BREAK (a service stops in diffusers during a request).
            self.runtime = self.loader(s)
            if s.warmup:
                self.state = "warming up"
                notify.notify("STATUS=warming up")
                t = time.perf_counter()
                warm = self.runtime.warm_up(on_step=self._beat)
                seconds = time.perf_counter() - t
                h, w = warm.images[0].height, warm.images[0].width
                self.rate = h * w / seconds  # a first (pessimistic: encode + decode included) measure
                log.info("warm-up took %.2f s", seconds)
        finally:
            stop_extending.set()
        self.state = "ready"
        p = self.runtime.loaded.plan
        notify.notify("READY=1", f"STATUS=ready: {s.model} {p.transformer} on {self.runtime.device}")
        log.info("ready: %s, %s on %s", s.model, p.transformer, self.runtime.device)

    def _beat(self, step: int, total: int) -> None:
        self.heartbeat = time.monotonic()

    def _admit(self, job: Job) -> bool:
        """Whether JOB may still start; if not, its request gets why."""
        if not job.future.set_running_or_notify_cancel():
            return False  # its client already gave up
        if self._past_shutdown() or self._stop.is_set():
            job.future.set_exception(ShuttingDown("the shutdown grace ended before this job could start"))
            return False
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            job.future.set_exception(Cancelled("deadline passed while queued"))
            return False
        return True

    def _process(self, jobs: list[Job]) -> None:
        """Run one job, or several sharing a batch (batching.py); every job's future gets its own answer."""
        # 1. Jobs whose client left, whose deadline passed or that the shutdown overtook are answered now.
        live = [job for job in jobs if self._admit(job)]
        members = list(live)  # the batch's rows, in order; `live` loses a job that leaves mid-run
        if not live:
            return

        # 2. Every step: the heartbeat, the shutdown, and each job's deadline and cancel. One job that leaves
        #    a shared batch is answered at once and the others go on; the last one stops the run.
        def on_step(step: int, total: int) -> None:
            self.heartbeat = time.monotonic()
            if self._past_shutdown() or self._stop.is_set():
                raise ShuttingDown(f"stopped at step {step}/{total}: the shutdown grace ended")
            for job in list(live):
                job.done_steps += 1
                if job.cancelled.is_set() or time.monotonic() > job.deadline:
                    if len(live) == 1:
                        raise Cancelled(f"stopped at step {step}/{total}")
                    live.remove(job)
                    _answer(job, exc=Cancelled(f"left its batch at step {step}/{total}"))

        # 3. Run: alone (n in batches of SD35_MAX_IMAGES) or together.
        self.busy = True
        started = time.perf_counter()
        oom = sticky = None
        results: list = []
        try:
            if len(members) == 1:
                results = [images.run_batched(self.runtime, members[0].request, members[0].n,
                                              self.settings.max_images, on_step=on_step,
                                              on_latents=members[0].on_latents)]
            else:
                results = batching.run(self.runtime, members, on_step=on_step)
        except (Cancelled, ShuttingDown) as exc:
            for job in live:
                _answer(job, exc=exc.with_traceback(None))
        except Exception as exc:  # noqa: BLE001 - every failure goes to its own requests
            if _is_oom(exc):
                oom = str(exc).splitlines()[0] if str(exc) else "out of memory"
            elif _is_sticky_cuda(exc):
                sticky = exc.with_traceback(None)
            else:
                if not isinstance(exc, Sd35Error):
                    log.exception("job %s failed", members[0].id)
                for job in live:
                    _answer(job, exc=exc.with_traceback(None))  # its frames hold the activations
        else:
            # 4. The measured rate (pixel-steps per second) and each job's own answer.
            seconds = time.perf_counter() - started
            measured = sum(j.request.width * j.request.height * j.request.steps * j.n for j in members) / \
                max(seconds, 1e-6)
            # The warm-up's figure (one step carrying a whole encode + decode) only stands in until the
            # first real job; then a moving average of real jobs.
            self.rate = measured if self._rate_jobs == 0 else 0.7 * self.rate + 0.3 * measured
            self._rate_jobs += 1
            for job, result in zip(members, results):
                if job in live:
                    _answer(job, exc=result) if isinstance(result, Exception) else _answer(job, result=result)
        finally:
            self.busy = False
            self.heartbeat = time.monotonic()
        del results
        # 5. A broken CUDA context ends the process; an OOM fails these jobs, after the memory is released.
        if sticky is not None:  # the CUDA context is broken: this process can run no job any more
            for job in live[1:]:
                _answer(job, exc=WorkerFailed(f"the GPU worker failed ({type(sticky).__name__})"))
            self._die(sticky, job=live[0])
            self._stop.set()
            return
        if oom is not None:
            # Outside the except block: the exception, its traceback and their frames (which hold the
            # step's activations) are gone, so gc + empty_cache can really give the memory back.
            self._release_memory()
            log.warning("job %s: out of memory; memory released", ", ".join(j.id for j in live))
            for job in live:
                _answer(job, exc=OutOfMemory(oom))

    def _past_shutdown(self) -> bool:
        return self.shutdown_deadline is not None and time.monotonic() > self.shutdown_deadline

    def _release_memory(self) -> None:
        import torch

        self.runtime.pipe.maybe_free_model_hooks()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _answer(job: Job, *, result=None, exc: BaseException | None = None) -> None:
    """Give JOB's request its result or error, once (its client may have cancelled it meanwhile)."""
    if job.future.done():
        return
    try:
        job.future.set_exception(exc) if exc is not None else job.future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OOM, and the CPU allocator's (torch: "DefaultCPUAllocator: can't allocate memory"; numpy,
    PIL: MemoryError): one job asked for more than there is, the next can run."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    text = str(exc)
    return isinstance(exc, (oom, MemoryError)) or "CUDA out of memory" in text or "can't allocate memory" in text


def _is_sticky_cuda(exc: BaseException) -> bool:
    """An error that leaves the CUDA context unusable (every later kernel fails): the process must go."""
    import torch

    accel = getattr(torch, "AcceleratorError", None)
    text = str(exc)
    return (accel is not None and isinstance(exc, accel) and "out of memory" not in text) or \
        any(marker in text for marker in STICKY_CUDA)
