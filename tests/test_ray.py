"""The service on Ray Serve (issue #16): a local Ray on 127.0.0.1 with 2 CPU replicas of the tiny model,
the official openai client, a replica killed mid-run and replaced, a clean stop; the Serve options our
settings map to; the Serve config and the KubeRay RayService manifest (a structural check, see below)."""

from __future__ import annotations

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from helpers import free_port
from test_service import KEY

ROOT = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray", reason="ray is not installed (the `ray` extra: pip install -e '.[ray]')")
yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of ray) is not installed")


# --- the options our settings map to (fast) ----------------------------------------------------------------

def test_deployment_options_map_queue_replicas_and_gpus():
    from sd35.service import ray_app
    from sd35.settings import Settings

    s = Settings(_env_file=None, queue_size=4, ray_replicas=2, ray_max_replicas=6, ray_target_ongoing=3,
                 ray_cpus=2, shutdown_grace=30)
    o = ray_app.deployment_options(s, gpus=True)
    assert o["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert o["max_ongoing_requests"] == 4 + 1 + ray_app.HEADROOM  # the worker answers 429 before Serve queues
    assert o["max_queued_requests"] == (4 + 1 + ray_app.HEADROOM) * 6
    assert o["backpressure_config"] == {"status_code": 429, "retry_after_s": ray_app.ROUTER_RETRY_AFTER}
    assert o["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 6,
                                       "target_ongoing_requests": 3}
    assert o["graceful_shutdown_timeout_s"] == 35
    cpu = ray_app.deployment_options(Settings(_env_file=None), gpus=False)
    assert cpu["ray_actor_options"] == {"num_cpus": 1}
    assert cpu["autoscaling_config"]["max_replicas"] == 1  # SD35_RAY_MAX_REPLICAS unset: a fixed count
    assert ray_app.use_gpus(Settings(_env_file=None, device="cpu")) is False
    assert ray_app.use_gpus(Settings(_env_file=None, device="cuda:3")) is True


def test_collect_env_copies_sd35_and_hf_variables_and_dotenv(tmp_path, monkeypatch):
    from sd35.service import ray_app

    (tmp_path / ".env").write_text("SD35_MODEL=medium\nSD35_QUEUE_SIZE=2\nOTHER=x\n")
    monkeypatch.setenv("SD35_QUEUE_SIZE", "7")
    monkeypatch.setenv("UNRELATED", "y")
    env = ray_app.collect_env(str(tmp_path / ".env"))
    assert env["SD35_MODEL"] == "medium" and env["SD35_QUEUE_SIZE"] == "7"  # the environment wins over .env
    assert "OTHER" not in env and "UNRELATED" not in env and "HF_HUB_CACHE" in env


def test_replica_readiness_waits_for_the_warm_model_and_fails_with_the_load():
    """The replica's start (its lifespan) returns only once the worker is ready; a failed load fails it."""
    import asyncio
    import threading

    from sd35.service import ray_app

    class FakeWorker:
        state, error = "loading", None

    w = FakeWorker()
    threading.Timer(0.5, lambda: setattr(w, "state", "ready")).start()
    asyncio.run(ray_app.wait_ready(w, timeout=30))
    assert w.state == "ready"
    w.state, w.error = "failed", RuntimeError("no such model")
    with pytest.raises(RuntimeError, match="failed to load: no such model"):
        asyncio.run(ray_app.wait_ready(w, timeout=30))
    w.state = "loading"
    with pytest.raises(RuntimeError, match="not ready after SD35_LOAD_TIMEOUT"):
        asyncio.run(ray_app.wait_ready(w, timeout=0.3))


def test_make_serve_ray_starts_a_loopback_ray_with_token_auth_and_stops_it():
    import subprocess

    run = subprocess.run(["make", "-n", "-o", "setup", "-o", "browser", "serve-ray", "serve-ray-stop", "VENV=/v"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "/v/bin/ray get-auth-token --generate" in text and "umask 077" in text  # the token, made 0600
    assert text.index("get-auth-token") < text.index("ray start")
    assert "/v/bin/ray start --head" in text and "--include-dashboard=false" in text
    assert "RAY_AUTH_MODE=token" in text and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in text
    assert "-m sd35.service.ray_app up" in text and "-m sd35.service.ray_app down" in text
    assert "-m sd35.service.ray_app stop" in text and "ray stop" not in text  # only our Ray, never every Ray


def test_make_serve_ray_makes_the_token_in_a_clean_home_and_leaves_a_busy_port_alone(tmp_path):
    """For real, from an empty HOME: the token is made (0600 in a 0700 ~/.ray) before anything else; a
    RAY_PORT already taken (an earlier serve-ray) stops it with exit 2 before `ray start`, and what holds the
    port is not touched."""
    import socket
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    make = ["make", "-C", str(ROOT), "-o", "setup", "-o", "browser", "serve-ray",
            f"VENV={Path(sys.executable).parent.parent}"]
    token = home / ".ray" / "auth_token"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        tokens = []
        for _ in range(2):  # made once, then kept (a running cluster keeps its token)
            run = subprocess.run([*make, f"RAY_PORT={port}"], env=_clean_env(home), capture_output=True,
                                 text=True, timeout=300)
            assert run.returncode == 2, run.stdout + run.stderr
            assert f"127.0.0.1:{port} is in use" in run.stderr and "fix: make serve-ray-stop" in run.stderr
            assert "ray start" not in run.stdout and "Traceback" not in run.stderr
            assert token.stat().st_mode & 0o777 == 0o600 and (home / ".ray").stat().st_mode & 0o777 == 0o700
            tokens.append(token.read_text())
        held.getsockname()  # still open: nothing stopped what holds the port
    assert len(tokens[0].strip()) >= 32 and tokens[1] == tokens[0]


def test_stop_local_stops_that_ray_and_its_children_only(tmp_path):
    """`ray_app stop` finds the processes naming our GCS (127.0.0.1:PORT, --gcs_server_port=PORT) and their
    children; a process naming another port is left alone."""
    import subprocess
    import sys

    from sd35.service import ray_app

    sleeper = "import time; time.sleep(120)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(120)"
    ours = [subprocess.Popen([sys.executable, "-c", child, "--gcs-address=127.0.0.1:26399"]),
            subprocess.Popen([sys.executable, "-c", sleeper, "--gcs_server_port=26399"])]
    other = subprocess.Popen([sys.executable, "-c", sleeper, "--gcs-address=127.0.0.1:26398"])
    try:
        deadline = time.monotonic() + 30
        while len(ray_app.local_node_processes(26399)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        found = {p.pid for p in ray_app.local_node_processes(26399)}
        assert {p.pid for p in ours} <= found and other.pid not in found and len(found) == 3
        assert ray_app.stop_local(26399, grace=5) == 3
        for p in ours:
            assert p.wait(timeout=10) is not None
        assert other.poll() is None and ray_app.local_node_processes(26399) == []
    finally:
        for p in [*ours, other]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_stop_refuses_a_ray_that_is_not_on_loopback(monkeypatch):
    from sd35.service import ray_app

    assert ray_app.local_port("127.0.0.1:6390") == 6390
    for bad in (None, "", "auto", "10.0.0.5:6379", "127.0.0.1"):
        monkeypatch.setenv("RAY_ADDRESS", bad or "")
        assert ray_app.main(["stop"]) == 2


def test_dockerfile_ray_target_is_the_runtime_image_plus_the_pinned_ray_extra():
    import re

    text = (ROOT / "docker/Dockerfile").read_text()
    stages = {m.group(2): m.group(0)
              for m in re.finditer(r"^FROM (\S+) AS (\S+)$(.*?)(?=^FROM |\Z)", text, re.M | re.S)}
    ray_stage = stages["ray"]
    assert ray_stage.startswith("FROM runtime AS ray")  # the runtime image: its user, venv, HEALTHCHECK, CMD
    pip = [line for line in ray_stage.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert len(pip) == 1 and re.search(r"pip install -c \S*constraints\.txt ", pip[0]), pip
    assert re.search(r'"\S*\[[\w,]*\bray\b[\w,]*\]"', pip[0]), pip  # the `ray` extra of pyproject.toml
    assert "ray==" not in ray_stage  # the version comes from constraints.txt only
    users = re.findall(r"^USER (\S+)", ray_stage, re.M)
    assert users[-1] == "${USER_UID}:${USER_GID}"  # non-root at the end
    assert "wget" in ray_stage  # KubeRay's default probes exec wget
    build = "docker build -f docker/Dockerfile --target ray -t"
    assert build in text and build in (ROOT / "docs/scale-out.md").read_text()
    manifest = (ROOT / "deploy/k8s/rayservice.yaml").read_text()
    assert "--target ray" in manifest and "sd35-workspace:ray" in manifest
    assert re.search(r"^ray==\d", (ROOT / "constraints.txt").read_text(), re.M)


def test_docs_and_configs_use_commands_and_paths_that_exist():
    """docs/scale-out.md and deploy/: `sd35 cache prefetch` (there is no `download`), the cache at
    /srv/cache/huggingface as everywhere else, multi-node `ray start` lines that keep token auth on."""
    import re

    from typer.testing import CliRunner

    from sd35.cli import app as cli

    docs = (ROOT / "docs/scale-out.md").read_text()
    configs = [(ROOT / p).read_text() for p in ("deploy/ray/serve.yaml", "deploy/k8s/rayservice.yaml")]
    for text in (docs, *configs):
        assert "cache download" not in text
        for sub in re.findall(r"sd35 cache (\w+)", text):
            assert CliRunner().invoke(cli, ["cache", sub, "--help"]).exit_code == 0, sub
        assert "/srv/cache/huggingface/hub" not in text
    for text in configs:
        assert "HF_HUB_CACHE: /srv/cache/huggingface\n" in text and "SD35_IMAGE_STORE_DIR:" in text
    step3 = docs[docs.index("## Step 3"):docs.index("## Step 4")]
    assert "export RAY_AUTH_MODE=token" in step3 and "RAY_AUTH_MODE=disabled" not in step3
    assert "get-auth-token --generate" in step3 and "~/.ray/auth_token" in step3 and "RAY_AUTH_TOKEN_PATH" in step3
    assert "ray start --head" in step3 and "ray start --address=HEAD_IP:6379" in step3
    assert "pip install -c constraints.txt" not in docs  # step 4's old recipe (root-owned /opt/venv)


# --- the Serve config and the KubeRay manifest ---------------------------------------------------------------

def test_serve_config_builds_our_app():
    cfg = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "sd35.service.ray_app:app" and app["route_prefix"] == "/"
    assert all(k.startswith(("SD35_", "HF_")) for k in app["runtime_env"]["env_vars"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(cfg)  # Serve's own schema for config files
    # import_path names an application builder: one parameter (Serve passes `args`), returns an Application.
    import inspect

    from ray.serve import Application

    from sd35.service import ray_app

    assert len(inspect.signature(ray_app.app).parameters) == 1
    built = ray_app.app({"ray_replicas": 3, "device": "cpu", **app["args"]})
    assert isinstance(built, Application)


# Read from KubeRay's CRD (ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayservices.yaml at
# 026f143324c0b7c3cce38db3003b5d45e236fc2e): spec.serveConfigV2 is `type: string`; rayClusterConfig requires
# headGroupSpec; each workerGroupSpecs item requires these; a pod template's spec requires containers.
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"}


def test_rayservice_manifest_structure():
    """A structural check of the fields verified in KubeRay's RayService CRD (above): apiVersion/kind,
    serveConfigV2 as a string holding our Serve config, the head group and the GPU worker group's required
    fields and pod templates, the GPU and the shared cache volume. Not a validation against the full CRD
    schema (it is not vendored), and not applied to a cluster."""
    m = yaml.safe_load((ROOT / "deploy/k8s/rayservice.yaml").read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService" and m["metadata"]["name"]
    spec = m["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    assert serve_cfg["applications"][0]["import_path"] == "sd35.service.ray_app:app"
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert WORKER_GROUP_REQUIRED <= set(group), WORKER_GROUP_REQUIRED - set(group)
        assert group["template"]["spec"]["containers"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert isinstance(gpu["rayStartParams"], dict)
    assert gpu["maxReplicas"] >= gpu["replicas"] >= gpu["minReplicas"] >= 0
    pod = gpu["template"]["spec"]
    container = pod["containers"][0]
    for part in ("requests", "limits"):
        assert str(container["resources"][part]["nvidia.com/gpu"]) == "1"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {x["name"]: x["mountPath"] for x in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert claims and any(mounts.get(name) == env["HF_HUB_CACHE"] for name in claims)
    for v in serve_cfg["applications"][0]["runtime_env"]["env_vars"]:
        assert v.startswith(("SD35_", "HF_"))


# --- a local Ray with 2 CPU replicas (slow) ----------------------------------------------------------------

def replica_actors() -> dict[str, int]:
    """Live replica actors of our deployment, name -> PID. From the GCS (named actors) and each actor
    itself: the state API would need Ray's dashboard, which the test's Ray does not start."""
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] == "serve" and name.startswith("SERVE_REPLICA::sd35#SD35#"):
            try:
                actor = ray.get_actor(name, namespace="serve")
                found[name] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
            except Exception:  # noqa: BLE001 - a replica being replaced or stopped right now
                continue
    return found


@pytest.fixture(scope="module")
def ray_serve(tiny_cache, tmp_path_factory):
    from ray import serve

    from sd35.service import ray_app
    from sd35.settings import Settings

    port = free_port()
    env = {"SD35_CACHE_DIR": str(tiny_cache), "SD35_DEVICE": "cpu", "SD35_API_KEY": KEY, "SD35_QUEUE_SIZE": "4",
           "SD35_MAX_PIXELS": str(128 * 128), "SD35_REQUEST_TIMEOUT": "120", "SD35_SHUTDOWN_GRACE": "5",
           "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hf")), "SD35_ALLOW_NO_KEY": "0"}
    settings = Settings(_env_file=None, model="tiny", device="cpu", port=port, ray_replicas=2, ray_cpus=1,
                        queue_size=4, shutdown_grace=5)
    # Loopback only: Ray's single-node mode binds GCS, raylet and workers to 127.0.0.1 (it would otherwise
    # turn 127.0.0.1 into the node's network IP).
    from ray._private import ray_constants

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for Ray's child processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when `import ray` ran (collection), so set it here too
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             namespace="sd35-test", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app.build(settings, env), name=ray_app.APP_NAME, route_prefix="/")
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved[0]


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _generate(url, seed=1):
    r = _client(url).images.generate(prompt="a red cube", size="64x64", response_format="b64_json",
                                     extra_body={"steps": 2, "seed": seed})
    return Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_two_replicas_serve_openai_and_survive_a_killed_replica(ray_serve):
    import httpx

    url = ray_serve
    # 1. Two replicas, each warm (readiness = loaded + warmed up), behind Serve's proxy; auth is ours.
    before = replica_actors()
    assert len(before) == 2, before
    assert httpx.get(url + "/readyz", timeout=30).status_code == 401  # the app's API-key check runs in the replica
    ready = httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert ready["status"] == "ready" and ready["queue_size"] == 4
    # 2. The official openai client gets images, several at once over both replicas.
    with ThreadPoolExecutor(4) as pool:
        imgs = list(pool.map(lambda s: _generate(url, s), range(4)))
    assert all(im.size == (64, 64) for im in imgs)
    events = list(_client(url).images.generate(prompt="a red cube", size="64x64", stream=True, partial_images=1,
                                               extra_body={"steps": 2}))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    # 3. Past the replicas' queues (2 x (1 running + 4 queued)) the replicas themselves answer 429 with our
    #    error body and Retry-After, through Serve's proxy (max_ongoing_requests leaves them room to).
    def raw(seed):
        return httpx.post(url + "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                          json={"prompt": "a red cube", "size": "128x128", "steps": 20, "seed": seed})

    with ThreadPoolExecutor(16) as pool:
        burst = list(pool.map(raw, range(16)))
    codes = sorted(r.status_code for r in burst)
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    ours = 0
    for r in burst:
        if r.status_code == 429:  # ours (JSON, measured Retry-After) or, rarely, Serve's router's (plain text)
            assert int(r.headers["retry-after"]) >= 1
            ours += r.headers["content-type"].startswith("application/json") and \
                r.json()["error"]["code"] == "queue_full"
    assert ours >= 1, [(r.status_code, r.text[:80]) for r in burst]
    # 4. Kill one replica's process mid-run (SIGKILL: no drain), while requests are in flight.
    victim, victim_pid = next(iter(before.items()))
    with ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(_generate, url, 10 + i) for i in range(4)]
        time.sleep(0.5)
        os.kill(victim_pid, signal.SIGKILL)
        results = []
        for f in inflight:  # those on the killed replica may fail; the others must not
            try:
                results.append(f.result())
            except Exception as exc:  # noqa: BLE001 - counted below
                results.append(exc)
    assert any(isinstance(r, Image.Image) for r in results), results
    # 5. The following requests succeed (Serve routes them to the live replica, then to the new one) ...
    for i in range(3):
        assert _generate(url, 100 + i).size == (64, 64)
    # 6. ... and Serve replaces the dead replica with a new process.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        now = replica_actors()
        if len(now) == 2 and victim not in now and victim_pid not in now.values():
            break
        time.sleep(2)
    else:
        pytest.fail(f"Serve did not replace the killed replica: {replica_actors()}")
    from ray import serve

    deadline = time.monotonic() + 600
    while serve.status().applications["sd35"].status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
    assert serve.status().applications["sd35"].status == "RUNNING"
    assert _generate(url, 200).size == (64, 64)


@pytest.mark.slow
def test_ray_clean_stop(ray_serve):
    """Last in the module: deleting the app drains and stops every replica (lifespan shutdown)."""
    from ray import serve

    serve.delete("sd35")
    deadline = time.monotonic() + 120
    while replica_actors() and time.monotonic() < deadline:
        time.sleep(1)
    assert replica_actors() == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_serve_ray_compares_one_and_two_replicas(tiny_cache, tmp_path):
    """`sd35 bench serve --ray --json`: the same closed-loop load on 1 and 2 replicas, every request answered.
    Its own process and its own loopback Ray (the module's Ray has no app left after the clean stop)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "SD35_CACHE_DIR": str(tiny_cache), "SD35_DEVICE": "cpu", "SD35_MODEL": "tiny",
           "HF_HUB_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "sd35", "bench", "serve", "--ray", "--requests", "4", "--burst", "2",
                           "--steps", "2", "--size", "64", "--json"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [r["replicas"] for r in report["runs"]] == [1, 2]
    assert all(r["images"] == 4 and r["images_per_s"] > 0 for r in report["runs"])
    assert report["speedup"]["1"] == 1.0 and report["speedup"]["2"] > 0
    assert "ratio says little" in report["note"]  # CPU replicas share the cores


# --- `make serve-ray` for real, from a clean HOME; two nodes joined with the token (slow) -------------------------

def _ray_port() -> int:
    """A free port outside Ray's worker ports (10002-19999), for a GCS."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(21000, 29000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any RAY_*/SD35_* variable, with an empty HOME (no ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SD35_"))}
    env.update(HOME=str(home), **extra)
    return env


def _short_tmp() -> Path:
    """Ray's --temp-dir: short (its Unix socket paths must fit in 107 bytes), under /tmp, removed after."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="sd35r-", dir="/tmp"))


def _listeners_of(pids: set[int]) -> list[tuple[object, int, str]]:
    """(Listener, pid, command line) of each TCP listener those processes hold: sd35.net's view (doctor's)."""
    from sd35 import net

    procs = net.processes_by_inode()
    return [(x, procs[x.inode][0], procs[x.inode][1]) for x in net.tcp_listeners() or []
            if x.inode in procs and procs[x.inode][0] in pids]


def _grpc_code(port: int, token: str | None):
    """The status of a call to a replica's inter-deployment gRPC server (Serve's ASGIService), with or
    without Ray's token. Ray's interceptor refuses a call without it before the method runs."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=20, metadata=[("authorization", f"Bearer {token}")] if token else None)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


# The two real-cluster tests start Ray nodes whose start-up has fixed waits (15–30 s, not configurable in Ray
# 2.60): on a machine loaded far past its cores (load 13–15 on 2 cores) every start timed out; on a quiet one,
# or under `make test`'s own two workers, they pass (~1.5 min each). They run in every test run; a developer
# on a saturated box can leave them out with SD35_RAY_CLUSTER_TESTS=0.
RAY_CLUSTER = pytest.mark.skipif(os.environ.get("SD35_RAY_CLUSTER_TESTS") == "0",
                                 reason="real Ray cluster start-up left out: SD35_RAY_CLUSTER_TESTS=0")


@RAY_CLUSTER
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_make_serve_ray_from_a_clean_home(tiny_cache, tmp_path):
    """`make serve-ray` as a new account runs it: no ~/.ray, no token. It makes the token (0600), starts a
    loopback Ray and 2 replicas; what listens is what docs/scale-out.md says (loopback, except each replica's
    token-guarded gRPC); url links answer on every replica; `make serve-ray-stop` stops that Ray and no other."""
    import shutil
    import subprocess
    import sys

    import grpc
    import httpx

    from sd35 import net
    from sd35.ops.doctor import context, network
    from sd35.service import ray_app
    from sd35.settings import Settings

    home, ray_tmp = tmp_path / "home", _short_tmp()
    home.mkdir()
    ray_port, http_port = _ray_port(), free_port()
    env = _clean_env(home, SD35_CACHE_DIR=str(tiny_cache), SD35_DEVICE="cpu", SD35_API_KEY=KEY,
                     SD35_PORT=str(http_port), SD35_RAY_REPLICAS="2", SD35_MAX_PIXELS=str(128 * 128),
                     SD35_IMAGE_STORE_DIR=str(tmp_path / "images"), HF_HUB_CACHE=str(tmp_path / "hf"))
    make = ["make", "-C", str(ROOT), "-o", "setup", "-o", "browser", f"VENV={Path(sys.executable).parent.parent}",
            f"RAY_PORT={ray_port}", f"RAY_START_ARGS=--temp-dir={ray_tmp} --num-cpus=2"]
    try:
        run = subprocess.run([*make, "serve-ray"], env=env, capture_output=True, text=True, timeout=1200)
        # 1. The token: made by `ray get-auth-token --generate` before `ray start`, private.
        token_file = home / ".ray" / "auth_token"
        assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text().strip()) >= 32
        assert (home / ".ray").stat().st_mode & 0o077 == 0
        assert "no authentication token was found" not in run.stderr
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        url = f"http://127.0.0.1:{http_port}"
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/readyz", timeout=30).status_code == 401
        assert httpx.get(url + "/readyz", headers=auth, timeout=30).json()["status"] == "ready"
        # 2. What listens, from sd35.net's (doctor's) point of view.
        pids = {p.pid for p in ray_app.local_node_processes(ray_port)}
        found = _listeners_of(pids)
        wide = [(x, cmd) for x, _, cmd in found if not x.local_only]
        assert all(cmd.startswith("ray::ServeReplica") for _, cmd in wide), wide
        assert len({cmd for _, cmd in wide}) >= 1 and {x.host for x, _ in wide} <= {"::", "0.0.0.0"}, wide
        assert any(x.port == ray_port and x.local_only for x, _, _ in found)  # the GCS on loopback
        assert any(x.port == http_port and x.local_only for x, _, _ in found)  # Serve's proxy (SD35_HOST)
        token = token_file.read_text().strip()
        for x, _ in wide:  # each open port refuses a caller without the cluster's token
            assert _grpc_code(x.port, None) == grpc.StatusCode.UNAUTHENTICATED
            assert _grpc_code(x.port, "not-the-token") == grpc.StatusCode.UNAUTHENTICATED
            assert _grpc_code(x.port, token) != grpc.StatusCode.UNAUTHENTICATED
        check = network.check_listeners(context.Context(settings=Settings(_env_file=None, port=http_port)))
        for x, _, _ in found:  # doctor flags none of this Ray's listeners (the API asks for a key)
            assert f":{x.port} " not in check.finding and f":{x.port}," not in check.finding, check
        # 3. url links: 20 made over both replicas, each fetched several times (either replica may answer).
        def make_one(seed):
            r = httpx.post(url + "/v1/images/generations", headers=auth, timeout=300,
                           json={"prompt": "a red cube", "size": "64x64", "steps": 1, "seed": seed,
                                 "response_format": "url"})
            assert r.status_code == 200, r.text
            return r.json()["data"][0]["url"]

        with ThreadPoolExecutor(4) as pool:
            links = list(pool.map(make_one, range(20)))
        for link in links:
            bodies = {httpx.get(link, headers=auth, timeout=60).content for _ in range(3)}
            assert len(bodies) == 1 and Image.open(io.BytesIO(bodies.pop())).size == (64, 64)
        r = httpx.post(url + "/v1/images/generations", headers=auth, timeout=300,
                       json={"prompt": "a red cube", "size": "64x64", "steps": 1, "seed": 3})
        inline = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        linked = Image.open(io.BytesIO(httpx.get(links[3], headers=auth, timeout=60).content))
        assert list(inline.getdata()) == list(linked.getdata())
        bad = links[0][:-2] + ("zz" if not links[0].endswith("zz") else "yy")
        assert httpx.get(bad, headers=auth, timeout=60).status_code == 404
        # 4. The stop: this Ray's processes are gone.
        stop = subprocess.run([*make, "serve-ray-stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
        assert ray_app.local_node_processes(ray_port) == []
        assert net.port_free(ray_port) and net.port_free(http_port)
    finally:
        ray_app.stop_local(ray_port, grace=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@RAY_CLUSTER
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_join_with_the_token(tmp_path):
    """docs/scale-out.md step 3 on one machine: a head and a second node, both on loopback (127.0.0.2: Ray
    turns 127.0.0.1 into the machine's network address when it may form a cluster), token auth on. The second
    node gets a copy of the head's token (RAY_AUTH_TOKEN_PATH) and joins; with another token it cannot."""
    import shutil
    import subprocess
    import sys

    from sd35.service import ray_app

    ray = str(Path(sys.executable).with_name("ray"))
    head_home, node_home, tmp = tmp_path / "head", tmp_path / "node", _short_tmp()
    head_home.mkdir()
    node_home.mkdir()
    port = _ray_port()
    address = f"127.0.0.2:{port}"

    def sh(args, home, timeout=300, **extra):
        env = _clean_env(home, RAY_AUTH_MODE="token", **extra)
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        gen = sh(["sh", "-c", f"umask 077 && {ray} get-auth-token --generate >/dev/null"], head_home)
        assert gen.returncode == 0, gen.stderr
        token = head_home / ".ray" / "auth_token"
        assert token.stat().st_mode & 0o777 == 0o600
        head = sh([ray, "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--num-cpus=1",
                   "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}"], head_home, timeout=600)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        # A node with another token is refused.
        wrong = tmp_path / "wrong"
        wrong.write_text("0" * 64)
        wrong.chmod(0o600)
        try:
            refused = sh([ray, "start", f"--address={address}", "--node-ip-address=127.0.0.2", "--num-cpus=1",
                          "--disable-usage-stats"], node_home, timeout=240, RAY_AUTH_TOKEN_PATH=str(wrong))
            assert refused.returncode != 0, refused.stdout[-2000:]
        except subprocess.TimeoutExpired:
            pass  # still trying to get in after 4 minutes: not joined either (below: exactly two nodes)
        # The node with a copy of the token (how it reaches a node: docs/scale-out.md) joins.
        copy = node_home / "token"
        copy.write_text(token.read_text())
        copy.chmod(0o600)
        joined = sh([ray, "start", f"--address={address}", "--node-ip-address=127.0.0.2", "--num-cpus=1",
                     "--disable-usage-stats"], node_home, timeout=600, RAY_AUTH_TOKEN_PATH=str(copy))
        assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]
        probe = ("import ray, json; ray.init(address='%s', log_to_driver=False); "
                 "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))" % address)
        status = sh([sys.executable, "-c", probe], node_home, RAY_AUTH_TOKEN_PATH=str(copy))
        assert status.returncode == 0, status.stderr[-2000:]
        assert status.stdout.strip().splitlines()[-1] == '["127.0.0.2", "127.0.0.2"]'
        try:  # a driver with another token: refused (an error, or no answer until it gives up)
            denied = sh([sys.executable, "-c", probe], node_home, RAY_AUTH_TOKEN_PATH=str(wrong), timeout=120)
            assert denied.returncode != 0 and "127.0.0.2" not in denied.stdout
        except subprocess.TimeoutExpired:
            pass
    finally:
        # Both nodes' processes name the head's GCS (127.0.0.2:PORT) or are their children.
        ray_app.stop_local(port, grace=10, host="127.0.0.2")
        shutil.rmtree(tmp, ignore_errors=True)
