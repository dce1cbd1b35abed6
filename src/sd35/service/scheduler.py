"""The fair queue in front of the one GPU worker: turns per API key, priorities, per-key caps and quotas.

Why not FIFO: one person who scripts 200 generations would hold the GPU for an hour while everybody else
gets 429s. Here each key has its own line, and the next job comes from the key that has waited longest
for a turn (a key's wait starts when its previous job finished, or when it queued its first); each key's
own jobs keep their order. A submits 8 then B submits 1: A1, B1, A2, … — B's job finishes second.

Priorities come from the keys file (`priority=batch`, quotas.py): interactive keys go first, but while
batch work waits, at most INTERACTIVE_RUN interactive jobs run in a row before one batch job does — batch
is slowed, never starved; interactive work waits for at most one batch job.

Limits, each refused up front with a 429 naming the key's own situation:
- SD35_QUEUE_PER_KEY: the most jobs one key may have waiting (others keep their room); `Retry-After`
  is when that key's next job should start.
- a daily image quota per key (`daily_images=N`): images done today (the ledger, which survives
  restarts) + this key's queued and running images + the new request > N → `quota_exceeded`, with the
  reset time (00:00 UTC).
- SD35_QUEUE_SIZE stays the total: past it `queue.Full`, which the worker turns into its Busy.

The class offers what the worker used from `queue.Queue` (put_nowait, get, get_nowait, qsize, empty,
mutex, queue) so the worker swaps it in with one line; usage (images, GPU-seconds per key) is recorded
when a job's future completes, to the ledger and to listeners (the metrics).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import queue
import threading
import time
from collections import deque

from sd35.service.quotas import Ledger, Policy, reset_at

log = logging.getLogger(__name__)
INTERACTIVE_RUN = 3  # interactive jobs in a row while batch work waits, then one batch job
DEFAULT_JOB_SECONDS = 10.0  # per job, before the worker has measured its rate


class KeyBusy(Exception):
    """This key has SD35_QUEUE_PER_KEY jobs waiting; the others are unaffected."""

    def __init__(self, key: str, waiting: int, retry_after: int):
        super().__init__(f"key {key!r} has {waiting} jobs waiting")
        self.key, self.waiting, self.retry_after = key, waiting, retry_after


class QuotaExceeded(Exception):
    """This key's daily image quota would be passed by the request."""

    def __init__(self, key: str, limit: int, used: int, pending: int, resets: dt.datetime):
        super().__init__(f"key {key!r} used {used} of {limit} images today")
        self.key, self.limit, self.used, self.pending, self.resets = key, limit, used, pending, resets

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil((self.resets - dt.datetime.now(dt.timezone.utc)).total_seconds()))


class Withdrawn(Exception):
    """Its owner cancelled the job while it was still queued (DELETE /v1/queue/{id})."""


def pick(waiting: dict[str, deque], turns: dict[str, float], priority, streak: int) -> tuple[str | None, int]:
    """The key whose job runs next, and the new count of interactive jobs run in a row while batch waited."""
    keys = [k for k, jobs in waiting.items() if jobs]
    interactive = [k for k in keys if priority(k) != "batch"]
    batch = [k for k in keys if priority(k) == "batch"]
    if interactive and (not batch or streak < INTERACTIVE_RUN):
        return min(interactive, key=lambda k: turns.get(k, 0.0)), (streak + 1 if batch else 0)
    if batch:
        return min(batch, key=lambda k: turns.get(k, 0.0)), 0
    return None, 0


class FairQueue:
    def __init__(self, capacity: int, per_key: int = 0, *, ledger: Ledger | None = None,
                 status=None, clock=time.monotonic):
        self.capacity = capacity
        self.per_key = per_key or capacity
        self.ledger = ledger
        self.policies: dict[str, Policy] = {}  # key name -> Policy, from the keys file (app.py)
        self.listeners: list = []  # callable(key, images, gpu_seconds) after every job
        self.status = status or (lambda: (None, None))  # () -> (rate in pixel-steps/s, the running job)
        self.clock = clock
        self.mutex = threading.RLock()
        self._ready = threading.Condition(self.mutex)
        self._waiting: dict[str, deque] = {}
        self._turns: dict[str, float] = {}  # key -> when it started waiting for its next turn
        self._running: dict[str, list] = {}  # key -> its jobs on the GPU (several when batched)
        self._streak = 0
        self.unfinished_tasks = 0  # as queue.Queue: a job counts from its put to the worker's task_done
        self.last_activity = clock()  # a job taken or finished (SD35_KEEP_ALIVE counts idle time from it)

    # --- the queue.Queue surface the worker uses ---------------------------------------------------------

    def policy(self, key: str) -> Policy:
        return self.policies.get(key, Policy())

    def put_nowait(self, job) -> None:
        key = job.key
        with self.mutex:
            mine = self._waiting.get(key, ())
            limit = self.policy(key).daily_images
            if limit is not None:
                used = self.ledger.images_today(key) if self.ledger else 0
                pending = sum(j.n for j in mine) + sum(j.n for j in self._running.get(key, ()))
                if used + pending + job.n > limit:
                    raise QuotaExceeded(key, limit, used, pending, reset_at())
            if self.qsize() >= self.capacity:  # everybody's limit first: a lone user sees queue_full as before
                raise queue.Full
            if len(mine) >= self.per_key:
                raise KeyBusy(key, len(mine), self._retry_for(key))
            if not mine and key not in self._running:
                self._turns[key] = self.clock()
            self._waiting.setdefault(key, deque()).append(job)
            self.unfinished_tasks += 1
            self._ready.notify_all()

    def put(self, job, block: bool = False, timeout: float | None = None) -> None:
        """queue.Queue's put, never blocking: a full queue is refused at once (the worker's Busy)."""
        self.put_nowait(job)

    def get(self, block: bool = True, timeout: float | None = None):
        with self._ready:
            end = None if timeout is None else self.clock() + timeout
            while True:
                job = self._take()
                if job is not None:
                    return job
                left = None if end is None else end - self.clock()
                if not block or (left is not None and left <= 0):
                    raise queue.Empty
                self._ready.wait(left)

    def get_nowait(self):
        return self.get(block=False)

    def task_done(self) -> None:
        """A job taken with `get` is finished (or refused): Worker.stop waits for none to be left."""
        with self.mutex:
            self.unfinished_tasks = max(0, self.unfinished_tasks - 1)

    def qsize(self) -> int:
        with self.mutex:
            return sum(len(jobs) for jobs in self._waiting.values())

    def running(self) -> list:
        """The jobs on the GPU now: one, or several sharing a batch."""
        with self.mutex:
            return [job for jobs in self._running.values() for job in jobs]

    def empty(self) -> bool:
        return self.qsize() == 0

    @property
    def queue(self) -> list:
        """The waiting jobs in the order they are expected to run."""
        with self.mutex:
            return self.order()

    # --- picking, finishing --------------------------------------------------------------------------------

    def _take(self):
        while True:
            key, self._streak = pick(self._waiting, self._turns, lambda k: self.policy(k).priority, self._streak)
            if key is None:
                return None
            job = self._waiting[key].popleft()
            if not self._waiting[key]:
                del self._waiting[key]
            if job.future.done():  # its client gave up (or it was withdrawn) while it waited
                self.unfinished_tasks = max(0, self.unfinished_tasks - 1)
                continue
            self._start(job)
            return job

    def _start(self, job) -> None:
        self._turns[job.key] = math.inf  # on the GPU: not waiting for a turn
        self._running.setdefault(job.key, []).append(job)
        self.last_activity = started = self.clock()
        job.future.add_done_callback(lambda f, job=job: self._finished(job, f, started))

    # --- batching (SD35_BATCH_WINDOW_MS, service/batching.py) ---------------------------------------------

    def join(self, fits, room: int) -> list:
        """Waiting jobs that `fits(job)` lets share the running batch, in the order their turns would come
        (`order`), up to `room` images; they leave the queue and count as running (each still finishes,
        and is accounted, on its own). A job that does not fit is passed over, keeping its place."""
        with self.mutex:
            joined = []
            for job in self.order():
                if job.future.done() or job.n > room or not fits(job):
                    continue
                self._waiting[job.key].remove(job)
                if not self._waiting[job.key]:
                    del self._waiting[job.key]
                self._start(job)
                joined.append(job)
                room -= job.n
            return joined

    def wait_for_jobs(self, timeout: float) -> None:
        """Sleep until a job is queued or `timeout` seconds pass (the batch window's wait)."""
        with self._ready:
            self._ready.wait(max(0.0, timeout))

    def _finished(self, job, future, started: float) -> None:
        seconds = max(0.0, self.clock() - started)
        images = 0
        if not future.cancelled() and future.exception() is None:
            images = len(getattr(future.result(), "images", ()) or ())
        seconds *= getattr(job, "share", 1.0)  # a batch's time is shared by its jobs, in proportion to images
        with self.mutex:
            mine = self._running.get(job.key, [])
            if job in mine:
                mine.remove(job)
            if not mine:
                self._running.pop(job.key, None)
            now = self.last_activity = self.clock()
            if job.key in self._running:
                pass  # another of its jobs is still on the GPU (a batch): not yet back in line
            elif job.key in self._waiting:
                self._turns[job.key] = now  # back in line: its wait starts now
            else:
                self._turns.pop(job.key, None)
        if self.ledger is not None:
            try:
                self.ledger.record(job.key, images, seconds)
            except OSError as exc:
                log.error("could not record usage of key %r in %s: %s", job.key, self.ledger.path, exc)
        for listener in self.listeners:
            listener(job.key, images, seconds)

    def withdraw(self, key: str, ref: str) -> bool:
        """Remove KEY's queued job REF; its request gets `Withdrawn`. False when it is not waiting (any more)."""
        with self.mutex:
            jobs = self._waiting.get(key, ())
            job = next((j for j in jobs if j.ref == ref or j.id == ref), None)
            if job is None:
                return False
            jobs.remove(job)
            self.unfinished_tasks = max(0, self.unfinished_tasks - 1)
            if not jobs:
                del self._waiting[key]
                self._turns.pop(key, None)
        job.cancelled.set()
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(Withdrawn("cancelled by its owner while queued"))
        return True

    def drain(self) -> list:
        """Every waiting job, removed (the worker's shutdown fails them)."""
        with self.mutex:
            jobs = [j for key in list(self._waiting) for j in self._waiting.pop(key)]
            self.unfinished_tasks = max(0, self.unfinished_tasks - len(jobs))
            self._turns = {k: v for k, v in self._turns.items() if k in self._running}
            return jobs

    # --- what clients see: order and estimates ---------------------------------------------------------

    def order(self) -> list:
        """The waiting jobs in the order `pick` will run them, were nothing else to arrive."""
        with self.mutex:
            waiting = {k: deque(v) for k, v in self._waiting.items()}
            out, tick = [], self.clock()
            # The running key is back in line when its job ends: after every key waiting now.
            turns = {k: (tick if v == math.inf else v) for k, v in self._turns.items()}
            streak = self._streak
            while True:
                key, streak = pick(waiting, turns, lambda k: self.policy(k).priority, streak)
                if key is None:
                    return out
                out.append(waiting[key].popleft())
                tick += 1.0  # the key's next wait starts after every wait already running
                turns[key] = tick

    def estimates(self) -> list[tuple[object, float, float]]:
        """(job, seconds until it starts, seconds until it ends) for every waiting job, in order."""
        rate, current = self.status()
        per_job = (lambda j: j.work / rate) if rate else (lambda j: DEFAULT_JOB_SECONDS)
        at = per_job(current) if current is not None else 0.0
        out = []
        for job in self.order():
            took = per_job(job)
            out.append((job, at, at + took))
            at += took
        return out

    def _retry_for(self, key: str) -> int:
        """Seconds until KEY's first waiting job should start (a place frees up for it then)."""
        for job, start, _ in self.estimates():
            if job.key == key:
                return max(1, math.ceil(start))
        return 1
