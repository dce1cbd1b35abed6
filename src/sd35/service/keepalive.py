"""SD35_KEEP_ALIVE: release the pipeline after an idle spell, reload it on the next request.

Why: a loaded SD3.5 Large holds ~20 GB of GPU memory (and its host copy) around the clock, even at night,
even while a teammate needs that card for a debugging session. Like Ollama's OLLAMA_KEEP_ALIVE, the
service lets go after SD35_KEEP_ALIVE of idleness (`90s`, `30m`, `2h`; `0` = as soon as the queue is
empty; `forever`, the default, never). Released, the service stays up and ready (/readyz 200 with
`"loaded": false`, `sd35_model_loaded` 0); requests are checked as usual (the model's limits and the
tokenizers are kept: a few MB) and the first one reloads the model — from the pre-quantized FP8 store and
the compile cache that is seconds, not the first load's minutes. While it reloads, /readyz and the page
say "waking up".

What release frees: the runtime's pipeline (every weight), the breakpoint harness that points into it,
torch.compile's compiled graphs (they hold the modules), then gc, torch.cuda.empty_cache() (GPU memory
back to the driver) and glibc's malloc_trim (freed host pages back to the OS, so RSS drops).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import threading
import time
from types import SimpleNamespace

from sd35.settings import duration_seconds

log = logging.getLogger(__name__)
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


class KeepAlive:
    def __init__(self, settings):
        self.seconds = duration_seconds(settings.keep_alive)  # None: forever
        self.loaded = True
        self.waking = False
        self.releases = 0
        self.last_release: dict = {}  # what the last release/reload measured (seconds, rss)
        self.load_error: str | None = None  # the last reload's failure, until one succeeds
        self._since: float | None = None  # loaded (or reloaded) at: idle time counts from here at the earliest
        self._lock = threading.Lock()

    def idle(self, worker) -> None:
        """Called by the worker thread when no job came: release once idle for SD35_KEEP_ALIVE."""
        if self.seconds is None or not self.loaded or worker.busy or worker.runtime is None:
            return
        now = time.monotonic()
        self._since = self._since or now
        if now - max(worker.queue.last_activity, self._since) >= self.seconds and worker.queue.empty():
            self.release(worker)

    def release(self, worker) -> None:
        started = time.perf_counter()
        runtime = worker.runtime
        with self._lock:
            pipe = runtime.loaded.pipe
            keep = SimpleNamespace(**{name: getattr(pipe, name, None) for name in TOKENIZERS})
            runtime.loaded = dataclasses.replace(runtime.loaded, pipe=keep)
            runtime.harness = None
            del pipe
        _free_memory(compiled=getattr(runtime.compile, "mode", "off") != "off")
        self.releases += 1
        self.last_release = {"release_seconds": round(time.perf_counter() - started, 3), "rss_bytes": rss_bytes()}
        self.loaded = False
        log.info("idle for SD35_KEEP_ALIVE=%s: model released (RSS now %.0f MiB)", worker.settings.keep_alive,
                 self.last_release["rss_bytes"] / 2 ** 20)

    def wake(self, worker, job) -> bool:
        """Before a job: reload a released model. False (the job failed with the load's error) when it fails."""
        if self.loaded:
            return True
        self.waking = True
        started = time.perf_counter()
        try:
            worker.runtime = worker.loader(worker.settings)
        except Exception as exc:  # noqa: BLE001 - the job gets the load's error; the next one tries again
            log.error("reloading the model failed: %s", exc)
            self.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc.with_traceback(None))
            return False
        finally:
            self.waking = False
        self.loaded, self.load_error, self._since = True, None, time.monotonic()
        self.last_release["reload_seconds"] = round(time.perf_counter() - started, 3)
        log.info("model reloaded in %.2f s", self.last_release["reload_seconds"])
        return True

    def describe(self) -> dict:
        """What /readyz adds: loaded, waking_up, keep_alive."""
        return {"loaded": self.loaded, "waking_up": self.waking,
                "keep_alive": "forever" if self.seconds is None else self.seconds}


def _free_memory(compiled: bool) -> None:
    if compiled:
        try:
            import torch._dynamo

            torch._dynamo.reset()  # compiled graphs hold the modules they were traced from
        except Exception:  # noqa: BLE001 - nothing compiled, nothing to drop
            pass
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed pages go back when the allocator decides


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
