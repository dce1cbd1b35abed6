"""The service process: preflight checks, uvicorn, and a clean exit.

Order of events:
  1. Preflight (before binding anything): refuse a non-loopback address without an API key, an
     impossible precision for this GPU, a busy port — each as a one-paragraph error, exit code 2.
  2. uvicorn starts: /healthz answers at once, /readyz says "loading" while the worker loads the model
     (STATUS= lines and EXTEND_TIMEOUT_USEC to systemd), warms up, then READY=1.
  3. SIGTERM/SIGINT: uvicorn stops accepting; running and queued jobs get SD35_SHUTDOWN_GRACE seconds
     *in total* (the worker's deadline starts at the signal); what is still running then stops at its
     next denoising step and its client gets a JSON 503. uvicorn waits for those answers (the grace +
     ANSWER_MARGIN), the worker thread is joined (never left inside torch: that aborts the process
     with exit 134), STOPPING=1, exit 0 — well inside the unit's TimeoutStopSec (90 s for a 60 s grace).
     If the model fails to load, exit 2 with its error.
"""

from __future__ import annotations

import logging
import socket

from sd35 import hardware, precision
from sd35.errors import InputError, Sd35Error
from sd35.settings import Settings

log = logging.getLogger(__name__)
ANSWER_MARGIN = 5.0  # seconds after the grace for the 503s of stopped jobs to be written
KEEP_ALIVE = 5  # seconds an idle keep-alive connection is kept


def preflight(settings: Settings) -> None:
    """Everything that can be refused before binding a port or loading a model."""
    from sd35.net import other_login_accounts
    from sd35.service import auth
    from sd35.service.app import refuse_keyless

    keys = auth.load(settings)  # a broken keys file fails here, before anything binds
    from sd35.service import quotas  # sharing: per-key usage must survive restarts

    quotas.Ledger(quotas.state_dir(settings)).check()
    if not keys and not settings.allow_no_key:
        refuse_keyless(settings, keys, settings.host)
        others = other_login_accounts()
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise InputError(
                f"refusing to serve without an API key: other accounts can log in to this machine ({shown}), and "
                f"127.0.0.1:{settings.port} is open to each of them — they could use the GPU and the access log "
                "could not say who.",
                "create per-user keys: `sudo /opt/sd35-workspace/.venv/bin/sd35 keys add NAME --group sd35` "
                "(appends to /etc/sd35/api-keys, SD35_API_KEYS_FILE, readable by the service's group `sd35` "
                "alone; docs/hosting.md) — or for yourself alone, SD35_API_KEY=<a long random "
                "string> in .env; or accept it with --allow-no-key (SD35_ALLOW_NO_KEY=1).",
                param="api_key",
            )
    if keys:
        log.info("API keys: %s", ", ".join(keys.names()))
    hw = hardware.detect(settings.device)
    precision.resolve(settings.precision, settings.t5, hw, emulate=settings.fp8_emulate)
    if not hw.is_cuda and settings.model != "tiny":
        log.warning("serving %s from the CPU (SD35_DEVICE=%s found no GPU): every request will take minutes. "
                    "On a GPU server set SD35_DEVICE=cuda:0 so a missing GPU fails the start instead.",
                    settings.model, settings.device)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, settings.port))
        except OSError as exc:
            raise InputError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}.",
                             f"stop what holds the port (`ss -ltnp 'sport = :{settings.port}'`) or pass --port.",
                             param="port") from None


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT. Returns the process exit code."""
    import uvicorn

    from sd35.service.app import create_app

    preflight(settings)
    from sd35.service.limits import header_timeout_protocol

    app = create_app(settings)
    worker = app.state.worker
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_grace + ANSWER_MARGIN,
                            timeout_keep_alive=KEEP_ALIVE, http=header_timeout_protocol(settings.header_timeout),
                            lifespan="on", workers=1)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.drain(settings.shutdown_grace)  # the one grace starts now, for the queue and the GPU
            super().handle_exit(sig, frame)

    server = Server(config)
    failure: list[BaseException] = []

    def on_failed(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app.state.worker.on_failed = on_failed
    if settings.allow_no_key and not app.state.keys:
        log.warning("serving on %s:%s without an API key (--allow-no-key): every account that reaches it can use "
                    "the GPU", settings.host, settings.port)
    # uvicorn drains on SIGTERM/SIGINT and then re-raises the signal to the handler it found installed;
    # ours makes that a clean exit 0 (systemd counts a signal death as a failure for Restart=on-failure).
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("stopped by %s", signal.Signals(signum).name))
    server.run()
    if worker._thread.is_alive():
        # The worker could not be stopped at a step boundary (a GPU kernel that never returns, or a load
        # that is still running): leaving the interpreter normally would run C++ destructors under a
        # live torch thread and abort. _exit skips them; the journal has the reason.
        log.error("the GPU worker did not stop within the shutdown grace; exiting without waiting for it")
        logging.shutdown()
        import os

        os._exit(2 if failure else 0)
    if failure:
        exc = failure[0]
        if isinstance(exc, Sd35Error):
            raise exc
        if worker.runtime is not None:  # it was serving: the worker died (a fault, a sticky CUDA error)
            raise Sd35Error(f"the GPU worker failed while serving: {type(exc).__name__}: {exc}".splitlines()[0],
                            "the service exits so systemd restarts it; if it repeats, the journal has the job and "
                            "`sd35 doctor` checks the GPU.")
        raise Sd35Error(f"the model failed to load: {type(exc).__name__}: {exc}",
                        "run `sd35 doctor`, then `sd35 generate` with the same settings to see the error alone.")
    return 0
