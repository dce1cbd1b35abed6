"""The same service on Ray Serve: one replica per GPU, many boxes, Serve's router in front.

Why Ray Serve and not a load balancer of our own: adding a box should mean "join the Ray cluster", and
replacing a dead replica, spreading requests over the least loaded ones and scaling on load are what
Serve already does. Each replica runs the *unchanged* FastAPI app of `sd35 serve` (`create_app`: the
OpenAI routes, streaming, the web page, API keys and access log, /metrics) with its own GPU worker, so
every behaviour the single-box service has, a replica has.

How the pieces map (docs/scale-out.md has the long form):
  - one replica = one `Worker` = one GPU (`ray_actor_options={"num_gpus": 1}` when the cluster has GPUs;
    CPU replicas of `SD35_RAY_CPUS` cores otherwise, e.g. the tiny model in the tests);
  - readiness: the replica's ASGI lifespan startup returns only once the model is loaded *and warmed up*
    (a failed load fails the replica's start, and Serve retries it); `check_health` fails when the worker
    has failed or its thread died, and Serve replaces the replica;
  - queueing: each replica keeps its bounded queue (SD35_QUEUE_SIZE) and its 429 + Retry-After. Serve may
    send a replica up to SD35_QUEUE_SIZE + 1 + HEADROOM requests at once (`max_ongoing_requests`: the
    running job, the queue, and room for /healthz, /metrics, the page), so a full replica answers 429
    itself, fast, with the Retry-After its measured rate gives. Only when every replica is at
    `max_ongoing_requests` do requests wait in Serve's router, up to `max_queued_requests`
    (max_ongoing_requests x max replicas); past that Serve's router answers — configured (backpressure_config)
    to answer like us, 429 + Retry-After (ROUTER_RETRY_AFTER), with a plain-text body, not our JSON error;
  - autoscaling: on ongoing requests per replica (running + queued in the worker + waiting in Serve's
    router), `target_ongoing_requests` = SD35_RAY_TARGET_ONGOING, from SD35_RAY_REPLICAS up to
    SD35_RAY_MAX_REPLICAS (equal by default: a fixed count);
  - settings: a replica reads the SD35_* / HF_* variables of its runtime environment (`up` below copies the
    caller's environment and .env; deploy/ray/serve.yaml and deploy/k8s/rayservice.yaml list them).

Entry points: `app(args)` is the Serve application builder (`import_path: sd35.service.ray_app:app`);
`python -m sd35.service.ray_app up|down` deploys to / removes from a running Ray cluster (`make serve-ray`);
`… stop` stops the loopback Ray of RAY_ADDRESS that `make serve-ray` started, and no other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ray import serve

from sd35.settings import Settings, load_settings

log = logging.getLogger(__name__)
APP_NAME = "sd35"
DEPLOYMENT = "SD35"
HEADROOM = 4  # concurrent non-generation requests (/healthz, /metrics, the page) a full replica still takes
ROUTER_RETRY_AFTER = 10  # seconds, on Serve's own 429 (its router queue full): our 10 s per job before a measure
ENV_PREFIXES = ("SD35_",)
ENV_NAMES = ("HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")


async def wait_ready(worker, timeout: float) -> None:
    """Return once the worker is ready (model loaded + warmed up); raise if it failed, stopped or timed out."""
    deadline = time.monotonic() + timeout
    while worker.state != "ready":
        if worker.state in ("failed", "stopped"):
            raise RuntimeError(f"the model failed to load: {worker.error}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model was not ready after SD35_LOAD_TIMEOUT={timeout:g}s ({worker.state})")
        await asyncio.sleep(0.2)


def replica_app(settings: Settings):
    """`create_app` with its lifespan extended: startup completes only when the model is warm."""
    from sd35.service.app import create_app

    app = create_app(settings)
    worker = app.state.worker
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            await wait_ready(worker, settings.load_timeout)
            yield state

    app.router.lifespan_context = lifespan
    return app


@serve.deployment
@serve.ingress()
class SD35:
    """One replica: the FastAPI app and its GPU worker (built in the replica, not pickled from the driver)."""

    def __init__(self, overrides: dict | None = None):
        from sd35 import logs

        logs.configure(False)  # our log lines (the access log too) to the replica's stderr: Ray's worker-*.err
        self.settings = Settings(**(overrides or {}))

    def __serve_build_asgi_app__(self):
        self.fastapi = replica_app(self.settings)
        return self.fastapi

    def check_health(self) -> None:
        worker = self.fastapi.state.worker
        if worker.state in ("failed", "stopped") or (worker.state == "ready" and not worker._thread.is_alive()):
            raise RuntimeError(f"the GPU worker is {worker.state}: {worker.error}")


def use_gpus(settings: Settings) -> bool:
    """One GPU per replica when SD35_DEVICE asks for CUDA, or (auto) when the cluster has GPUs."""
    if settings.device == "cpu":
        return False
    if settings.device.startswith("cuda"):
        return True
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def deployment_options(settings: Settings, gpus: bool) -> dict[str, Any]:
    """Serve's options from our settings (the mapping is the module docstring's)."""
    replicas = settings.ray_replicas
    most = max(replicas, settings.ray_max_replicas or replicas)
    actor: dict[str, Any] = {"num_cpus": settings.ray_cpus}
    if gpus:
        actor["num_gpus"] = 1
    return {
        "name": DEPLOYMENT,
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.queue_size + 1 + HEADROOM,
        # A burst waits in the router for a moment before each request is assigned: room for what the
        # replicas can hold, so they (not the router) answer a burst's excess.
        "max_queued_requests": (settings.queue_size + 1 + HEADROOM) * most,
        # Past max_queued_requests Serve's router refuses; by default with 503 and no Retry-After. Ours is 429.
        "backpressure_config": {"status_code": 429, "retry_after_s": ROUTER_RETRY_AFTER},
        "autoscaling_config": {"min_replicas": replicas, "initial_replicas": replicas, "max_replicas": most,
                               "target_ongoing_requests": settings.ray_target_ongoing},
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # Serve's SIGTERM to a replica runs the lifespan shutdown: the worker's one grace, then its answers.
        "graceful_shutdown_timeout_s": settings.shutdown_grace + 5,
    }


def build(settings: Settings, env: dict[str, str] | None = None):
    """The Serve application for these settings. `env` (SD35_*/HF_* variables) goes to every replica."""
    gpus = use_gpus(settings)
    options = deployment_options(settings, gpus)
    from ray.serve.config import BackpressureConfig

    options["backpressure_config"] = BackpressureConfig(**options["backpressure_config"])
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    # A GPU replica sees only its own GPU (CUDA_VISIBLE_DEVICES): cuda:N would name one it cannot see.
    overrides = {"device": "cuda"} if gpus and settings.device != "auto" else {}
    return SD35.options(**options).bind(overrides)


def app(args: dict):
    """Serve's application builder (`import_path: sd35.service.ray_app:app`): settings from the environment
    (the config's runtime_env) and `args` (setting names, e.g. `{ray_replicas: 2}`)."""
    settings = Settings(**(args or {}))
    if not settings.image_store_dir and max(settings.ray_replicas, settings.ray_max_replicas or 0) > 1:
        log.warning("SD35_IMAGE_STORE_DIR is not set: a `response_format: url` link works only on the replica "
                    "that made it (set it to a directory every replica mounts)")
    return build(settings)


def local_image_dir() -> Path:
    """`make serve-ray`'s store for `response_format: url` images when SD35_IMAGE_STORE_DIR is unset: one box,
    so a folder in /tmp every replica sees — made 0700 and refused unless it is a real directory of ours
    that no one else can open (a predictable name in /tmp: another account could have made it first)."""
    path = Path(tempfile.gettempdir()) / f"sd35-images-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        st, error = None, exc.strerror
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        from sd35.errors import Sd35Error

        raise Sd35Error(f"{path} cannot hold the replicas' url images: "
                        + (error if st is None else "not a directory of yours, or others can open it"),
                        "set SD35_IMAGE_STORE_DIR to a directory only you can open (mode 0700)")
    return path


def collect_env(settings_env_file: str | None = None) -> dict[str, str]:
    """SD35_* and HF_* variables of this process and of the .env file, for the replicas' runtime_env."""
    from sd35.settings import dotenv_values

    env: dict[str, str] = dotenv_values(settings_env_file)
    env.update(os.environ)
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def up(settings: Settings, address: str | None = None) -> str:
    """Deploy to a running Ray cluster (RAY_ADDRESS, default `auto`); returns the base URL once warm."""
    import ray

    from sd35.service.server import preflight

    preflight(settings)  # API keys, precision, the port: the same refusals as `sd35 serve`
    env = collect_env()
    if not settings.image_store_dir:  # one box: every replica shares /tmp, so url links work on each
        env["SD35_IMAGE_STORE_DIR"] = str(local_image_dir())
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace="sd35", log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build(settings, env), name=APP_NAME, route_prefix="/")
    except Exception as exc:  # noqa: BLE001 - Serve gave up on the replicas (a failed load, no resources)
        from sd35.errors import Sd35Error

        raise Sd35Error(f"the app did not start on Ray Serve: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                        "read the replica logs (/tmp/ray/session_latest/logs/serve/replica_sd35_*.log), run "
                        "`sd35 generate` with the same settings to see a load error alone, and `make "
                        "serve-ray-stop`") from None
    return f"http://{settings.host}:{settings.port}"


def down(address: str | None = None) -> None:
    import ray

    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace="sd35", log_to_driver=False)
    serve.shutdown()


def local_node_processes(port: int, uid: int | None = None, host: str = "127.0.0.1") -> list:
    """The processes of the loopback Ray whose GCS is 127.0.0.1:`port` (the one `make serve-ray` starts),
    with their children (the raylet's agents and workers, whose command lines Ray rewrites to `ray::…`).

    Why not `ray stop`: it stops every Ray process on the machine that the account may signal — on a shared
    box, another session's cluster too (and all of them, as root). Each of ours names the GCS in its command
    line: `--gcs_server_port=PORT` (the GCS), `…=127.0.0.1:PORT` (raylet, monitor, dashboard, log monitor,
    client server)."""
    import psutil

    uid = os.getuid() if uid is None else uid
    marks = (f"--gcs_server_port={port}", f"={host}:{port}")
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            args, uids = proc.info["cmdline"] or [], proc.info["uids"]
            if proc.pid in me or uids is None or uids.real != uid:
                continue
            if any(a == marks[0] or a.endswith(marks[1]) for a in args):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    return [p for pid, p in found.items() if pid not in me]


def stop_local(port: int, grace: float = 10.0, host: str = "127.0.0.1") -> int:
    """SIGTERM the loopback Ray of `port` (`local_node_processes`), SIGKILL what is left after `grace` s.
    Returns how many processes there were."""
    import psutil

    procs = local_node_processes(port, host=host)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def local_port(address: str | None) -> int:
    """The GCS port of RAY_ADDRESS when it is a loopback address (`stop` never touches another machine's)."""
    from sd35.errors import InputError
    from sd35.net import is_loopback

    host, _, port = (address or "").rpartition(":")
    if not port.isdigit() or not host or not is_loopback(host):
        raise InputError(f"RAY_ADDRESS={address or ''!r} is not a loopback Ray (127.0.0.1:PORT)",
                        "`stop` only stops the local Ray that `make serve-ray` started: run it through "
                        "`make serve-ray-stop` (RAY_PORT as for serve-ray)")
    return int(port)


def main(argv: list[str]) -> int:
    from sd35.errors import Sd35Error

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["up"]:
        from pydantic import ValidationError

        try:
            settings = load_settings()
            url = up(settings)
        except ValidationError as exc:
            print(f"error: invalid setting: SD35_{'.'.join(map(str, exc.errors()[0]['loc'])).upper()}: {exc.errors()[0]['msg']}\n"
                  "fix: correct it in .env or the environment (.env.example documents each SD35_* key)",
                  file=sys.stderr)
            return 2
        except Sd35Error as exc:
            print(f"error: {exc.cause}" + (f"\nfix: {exc.fix}" if exc.fix else ""), file=sys.stderr)
            return exc.exit_code
        print(f"sd35 on Ray Serve: {url} ({settings.ray_replicas} replica(s) of {settings.model}); "
              "stop with `make serve-ray-stop`")
        return 0
    if argv[:1] == ["down"]:
        down()
        return 0
    if argv[:1] == ["stop"]:
        try:
            port = local_port(os.environ.get("RAY_ADDRESS"))
        except Sd35Error as exc:
            print(f"error: {exc.cause}\nfix: {exc.fix}", file=sys.stderr)
            return exc.exit_code
        print(f"stopped the local Ray on 127.0.0.1:{port} ({stop_local(port)} process(es))")
        return 0
    print("usage: python -m sd35.service.ray_app up|down|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
