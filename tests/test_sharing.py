"""One GPU, a whole team (issue 27): fair turns per API key, priorities, per-key caps and daily quotas (the
scheduler on its own, then over HTTP), GET /v1/queue and cancel, SD35_KEEP_ALIVE release and reload,
`sd35 keys set|usage`, `sd35 gpus` with a faked nvidia-smi, and the dashboard/alerts against /metrics."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_cli

from sd35.inference import generate as gen
from sd35.service import quotas, scheduler
from sd35.service.worker import Job

ROOT = Path(__file__).resolve().parents[1]


# --- the scheduler alone: a fake worker takes jobs one at a time ---------------------------------------------

def job(key: str, n: int = 1, label: str = "") -> Job:
    request = gen.GenerationRequest(label or key, steps=4, guidance=1.0, height=128, width=128, seed=0)
    return Job(request, n, time.monotonic() + 60, key=key, ref=label or None)


def run_all(q: scheduler.FairQueue, first: list[Job] | None = None, arriving: dict | None = None) -> list[str]:
    """Take jobs until the queue is empty, like the worker; `arriving[i]` jobs are queued once the i-th job
    has started (while it runs). Returns the prompts in the order the jobs finished."""
    done, i = [], 0
    while True:
        try:
            j = q.get_nowait()
        except queue.Empty:
            return done
        for late in (arriving or {}).get(i, []):
            q.put_nowait(late)
        j.future.set_running_or_notify_cancel()
        j.future.set_result(SimpleNamespace(images=[None] * j.n))
        done.append(j.request.prompt)
        i += 1


def test_a_key_with_8_jobs_lets_a_later_key_finish_second():
    q = scheduler.FairQueue(capacity=20)
    for i in range(8):
        q.put_nowait(job("alice", label=f"A{i + 1}"))
    q.put_nowait(job("bob", label="B1"))
    order = run_all(q)
    assert order.index("B1") in (1, 2) and order[0] == "A1"
    assert [p for p in order if p.startswith("A")] == [f"A{i + 1}" for i in range(8)]  # a key's own order kept


def test_a_key_arriving_while_the_other_runs_gets_the_next_turn():
    q = scheduler.FairQueue(capacity=20)
    for i in range(8):
        q.put_nowait(job("alice", label=f"A{i + 1}"))
    order = run_all(q, arriving={0: [job("bob", label="B1")]})  # B queues while A1 runs
    assert order[:2] == ["A1", "B1"]
    # Three keys alternate: A, B, C, A, B, C, …
    q = scheduler.FairQueue(capacity=20)
    for i in range(3):
        for k in "ABC":
            q.put_nowait(job(k, label=f"{k}{i + 1}"))
    assert run_all(q) == ["A1", "B1", "C1", "A2", "B2", "C2", "A3", "B3", "C3"]


def test_batch_never_starves_interactive_and_interactive_never_starves_batch():
    q = scheduler.FairQueue(capacity=40)
    q.policies = {"robot": quotas.Policy("batch")}
    for i in range(10):
        q.put_nowait(job("robot", label=f"R{i + 1}"))
    q.put_nowait(job("alice", label="A1"))
    assert run_all(q).index("A1") <= 1  # interactive waits for at most the batch job already chosen
    # Two interactive keys keep the queue full; one batch job still runs within INTERACTIVE_RUN + 1 turns.
    q = scheduler.FairQueue(capacity=40)
    q.policies = {"robot": quotas.Policy("batch")}
    q.put_nowait(job("robot", label="R1"))
    for i in range(10):
        q.put_nowait(job("alice", label=f"A{i + 1}"))
        q.put_nowait(job("bob", label=f"B{i + 1}"))
    order = run_all(q)
    assert order.index("R1") == scheduler.INTERACTIVE_RUN
    assert len(order) == 21


def test_per_key_cap_refuses_that_key_only_with_retry_after():
    q = scheduler.FairQueue(capacity=10, per_key=2)
    q.put_nowait(job("alice"))
    q.put_nowait(job("alice"))
    with pytest.raises(scheduler.KeyBusy) as exc:
        q.put_nowait(job("alice"))
    assert exc.value.key == "alice" and exc.value.retry_after >= 1
    q.put_nowait(job("bob"))  # the others keep their room
    q.put_nowait(job("bob"))
    full = scheduler.FairQueue(capacity=1)
    full.put_nowait(job("x"))
    with pytest.raises(queue.Full):  # SD35_QUEUE_SIZE stays the total (the worker's Busy)
        full.put_nowait(job("y"))


def test_quota_counts_queued_and_done_images_and_survives_a_restart(tmp_path):
    ledger = quotas.Ledger(tmp_path / "state")
    q = scheduler.FairQueue(capacity=10, ledger=ledger)
    q.policies = {"alice": quotas.Policy(daily_images=3)}
    q.put_nowait(job("alice", n=2))
    with pytest.raises(scheduler.QuotaExceeded) as exc:
        q.put_nowait(job("alice", n=2))  # 2 queued + 2 > 3
    assert exc.value.pending == 2 and exc.value.resets.hour == 0 and exc.value.retry_after >= 1
    run_all(q)
    assert ledger.images_today("alice") == 2
    restarted = scheduler.FairQueue(capacity=10, ledger=quotas.Ledger(tmp_path / "state"))  # a new process
    restarted.policies = {"alice": quotas.Policy(daily_images=3)}
    restarted.put_nowait(job("alice", n=1))
    with pytest.raises(scheduler.QuotaExceeded) as exc:
        restarted.put_nowait(job("alice", n=1))
    assert exc.value.used == 2
    restarted.put_nowait(job("bob", n=5))  # no quota for bob
    data = json.loads((tmp_path / "state" / "usage.json").read_text())
    assert data[quotas.today()]["alice"]["images"] == 2 and data[quotas.today()]["alice"]["gpu_seconds"] >= 0


def test_withdraw_only_your_own_queued_job():
    q = scheduler.FairQueue(capacity=10)
    mine = job("alice", label="mine")
    q.put_nowait(mine)
    assert not q.withdraw("bob", "mine")
    assert q.withdraw("alice", "mine") and q.empty()
    with pytest.raises(scheduler.Withdrawn):
        mine.future.result(timeout=1)


def test_keys_file_options_are_backward_compatible_and_checked(tmp_path):
    from sd35.errors import InputError
    from sd35.service import auth

    path = tmp_path / "api-keys"
    auth.add(path, "alice")
    auth.add(path, "robot")
    assert all(e.policy == quotas.Policy() for e in auth.read(path))  # old lines: interactive, no quota
    quotas.set_policy(path, "robot", priority="batch", daily_images=100)
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    entries = {e.name: e for e in auth.read(path)}
    assert entries["robot"].policy == quotas.Policy("batch", 100) and entries["alice"].policy == quotas.Policy()
    assert path.read_text().splitlines()[1].endswith(" priority=batch daily_images=100")
    with pytest.raises(InputError, match="no key named"):
        quotas.set_policy(path, "carol", daily_images=1)
    path.write_text(path.read_text().replace("daily_images=100", "daily_images=lots"))
    with pytest.raises(InputError, match=r"api-keys:2"):
        auth.read(path)


def test_keys_cli_add_set_and_usage(tmp_path):
    keys, state = tmp_path / "api-keys", tmp_path / "state"
    env = {"SD35_STATE_DIR": str(state)}
    assert run_cli("keys", "add", "robot", "--file", str(keys), "--daily-images", "50", "--priority", "batch",
                   env=env).returncode == 0
    assert re.search(r"^robot:[0-9a-f]+:sha256\$", keys.read_text(), re.M) and keys.read_text().strip().endswith("priority=batch daily_images=50")
    r = run_cli("keys", "set", "robot", "--daily-images", "80", "--file", str(keys), env=env)
    assert r.returncode == 0 and "80 images a day" in r.stderr and "daily_images=80" in keys.read_text()
    r = run_cli("keys", "set", "robot", "--priority", "urgent", "--file", str(keys), env=env)
    assert r.returncode == 2 and "interactive" in r.stderr and "Traceback" not in r.stderr
    ledger = quotas.Ledger(state)
    ledger.record("robot", 4, 12.5)
    ledger.record("alice", 1, 2.0, day="2000-01-01")  # long ago: in neither column
    r = run_cli("keys", "usage", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows == {"robot": {"today": {"images": 4, "gpu_seconds": 12.5}, "7d": {"images": 4, "gpu_seconds": 12.5}}}
    r = run_cli("keys", "usage", env=env)
    assert re.search(r"robot\s+4\s+12\.5\s+4\s+12\.5", r.stdout)


def test_keep_alive_durations():
    from sd35.settings import Settings, duration_seconds

    assert [duration_seconds(v) for v in ("90s", "30m", "2h", "0", "forever", "45")] == [90, 1800, 7200, 0, None, 45]
    with pytest.raises(Exception, match="not a duration"):
        Settings(_env_file=None, keep_alive="soon")
    r = run_cli("serve", env={"SD35_KEEP_ALIVE": "-5m"})
    assert r.returncode == 2 and "keep_alive" in r.stderr.lower() and "Traceback" not in r.stderr


# --- over HTTP: the tiny model behind a keys file ----------------------------------------------------------

def _keys(tmp_path) -> tuple[Path, dict]:
    from sd35.service import auth

    path = tmp_path / "api-keys"
    keys = {name: auth.add(path, name) for name in ("alice", "bob", "robot")}
    quotas.set_policy(path, "bob", daily_images=2)
    quotas.set_policy(path, "robot", priority="batch")
    return path, keys


def _wait_for(predicate, timeout: float = 60, every: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_fair_turns_queue_view_cancel_limits_and_usage_over_http(tmp_path, tiny_cache):
    from concurrent.futures import ThreadPoolExecutor

    from sd35.settings import Settings
    from test_service import InProcessServer, call, free_port

    path, keys = _keys(tmp_path)
    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_keys_file=path, api_key="test-key", queue_size=12, queue_per_key=7, request_timeout=120,
                        max_steps=400,
                        state_dir=tmp_path / "state")
    body = {"prompt": "x", "size": "128x128", "steps": 40}
    finished: list[str] = []
    statuses: dict[str, int] = {}

    with InProcessServer(settings) as srv, ThreadPoolExecutor(12) as pool:
        def post(name: str, label: str, extra: dict | None = None):
            status, _, out = call(srv.url + "/v1/images/generations", "POST",
                                  {**body, "prompt": label, **(extra or {})},
                                  key=keys[name], headers={"X-Request-Id": label}, timeout=120)
            statuses[label] = status
            finished.append(label)
            return status, out

        def mine(name: str) -> dict:
            return call(srv.url + "/v1/queue", key=keys[name])[2]

        futures = {}
        for i in range(8):  # one at a time, each seen in the queue before the next: a known order
            label = f"A{i + 1}"
            futures[label] = pool.submit(post, "alice", label)
            _wait_for(lambda: any(j["id"] == label for j in mine("alice")["data"]))
        # alice: A1 running, A2..A8 waiting = SD35_QUEUE_PER_KEY: her next one gets 429, bob is unaffected.
        status, headers, out = call(srv.url + "/v1/images/generations", "POST", body, key=keys["alice"])
        assert status == 429 and out["error"]["code"] == "key_queue_full" and int(headers["Retry-After"]) >= 1
        futures["B1"] = pool.submit(post, "bob", "B1")
        view = _wait_for(lambda: mine("bob")["data"] and mine("bob"))
        b1 = view["data"][0]
        assert b1["id"] == "B1" and b1["position"] == 1 and b1["state"] == "queued"  # bob's turn is next
        assert b1["estimated_end_s"] > b1["estimated_start_s"] >= 0 and b1["prompt"] == "B1"
        assert view["others"] == {"queued": 7, "keys": 1, "running": 1} and "A2" not in json.dumps(view)
        a = mine("alice")["data"]
        assert [j["position"] for j in a] == [0, 2, 3, 4, 5, 6, 7, 8] and a[0]["state"] == "running"
        # bob's quota is 2 images a day: 1 queued + 2 more is over it; alice cannot cancel bob's job.
        status, headers, out = call(srv.url + "/v1/images/generations", "POST", {**body, "n": 2}, key=keys["bob"])
        assert status == 429 and out["error"]["code"] == "quota_exceeded" and "00:00 UTC" in out["error"]["message"]
        assert int(headers["Retry-After"]) >= 1 and headers["X-Quota-Reset"].endswith("T00:00:00Z")
        assert call(srv.url + "/v1/queue/B1", "DELETE", key=keys["alice"])[0] == 404
        status, _, out = call(srv.url + "/v1/queue/A8", "DELETE", key=keys["alice"])
        assert status == 200 and out["cancelled"] is True
        for f in futures.values():
            f.result(timeout=300)
        assert statuses["A8"] == 409 and all(statuses[k] == 200 for k in statuses if k != "A8")
        done = [label for label in finished if label != "A8"]  # A8 answered 409 the moment it was cancelled
        assert done.index("B1") in (1, 2) and done[0] == "A1", done  # bob's one job finishes 2nd or 3rd, not 9th
        metrics = call(srv.url + "/metrics", key=keys["alice"])[2]
        assert 'sd35_images_total{key="alice"} 7.0' in metrics and 'sd35_images_total{key="bob"} 1.0' in metrics
        assert re.search(r'sd35_gpu_seconds_total\{key="bob"\} [0-9.]+', metrics)
        assert "sd35_model_loaded 1.0" in metrics
    usage = json.loads((tmp_path / "state" / "usage.json").read_text())[quotas.today()]
    assert usage["alice"]["images"] == 7 and usage["bob"]["images"] == 1 and usage["bob"]["gpu_seconds"] > 0


def test_keep_alive_releases_the_model_and_the_next_request_reloads_it(tmp_path, tiny_cache):
    from sd35.settings import Settings
    from test_service import InProcessServer, call, free_port

    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        keep_alive="1s", state_dir=tmp_path / "state", warmup=False)
    body = {"prompt": "x", "size": "128x128", "steps": 2}
    with InProcessServer(settings) as srv:
        import weakref

        worker = srv.app.state.worker
        transformer = weakref.ref(worker.runtime.pipe.transformer)
        assert call(srv.url + "/v1/images/generations", "POST", body, key=None)[0] == 200
        ready = _wait_for(lambda: (r := call(srv.url + "/readyz", key=None))[0] == 200 and not r[2]["loaded"] and r,
                          timeout=30, every=0.2)
        assert ready[2]["status"] == "ready" and ready[2]["waking_up"] is False
        assert "sd35_model_loaded 0.0" in call(srv.url + "/metrics", key=None)[2]
        assert not hasattr(worker.runtime.pipe, "transformer")  # the weights are gone; the tokenizers stay
        assert transformer() is None  # nothing else holds the released weights: their memory is free
        assert worker.keep_alive.last_release["rss_bytes"] > 0
        status, _, out = call(srv.url + "/v1/images/generations", "POST", body, key=None)
        assert status == 200 and out["sd35"]["steps"] == 2
        assert worker.keep_alive.releases == 1 and worker.keep_alive.last_release["reload_seconds"] > 0
        assert call(srv.url + "/readyz", key=None)[2]["loaded"] in (True, False)  # 1 s later it may be gone again


# --- the page: position, estimate, cancel while queued ------------------------------------------------------

@pytest.mark.slow
def test_page_shows_position_and_estimate_and_cancels_while_queued(tmp_path, tiny_cache):
    from concurrent.futures import ThreadPoolExecutor

    from playwright.sync_api import expect

    from sd35.settings import Settings
    from test_page import CHROMIUM, CHROMIUM_ARGS, Page
    from test_service import KEY, InProcessServer, call, free_port

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: make setup")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make setup and .ci/run do it as root)")
    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_key=KEY, queue_size=4, max_steps=500, request_timeout=120, state_dir=tmp_path / "s")
    long = {"prompt": "blocker", "size": "128x128", "steps": 500}
    with InProcessServer(settings) as srv, ThreadPoolExecutor(2) as pool, sync_playwright() as pw:
        blockers = [pool.submit(call, srv.url + "/v1/images/generations", "POST", long, None, KEY, 120)]
        _wait_for(lambda: call(srv.url + "/metrics")[2].count("sd35_worker_busy 1.0"))
        blockers.append(pool.submit(call, srv.url + "/v1/images/generations", "POST", long, None, KEY, 120))
        _wait_for(lambda: call(srv.url + "/v1/queue")[2]["total"]["queued"] == 1)
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = Page(browser, srv.url)
        p = page.page
        page.use_key(KEY)
        p.locator("#size option").nth(1).wait_for(state="attached")
        p.get_by_label("Prompt", exact=True).fill("mine")
        p.get_by_role("button", name="Generate").click()
        expect(p.locator("#live-status")).to_contain_text("position 2, about", timeout=20_000)
        assert re.search(r"position 2, about \d+ s", p.locator("#live-status").inner_text())
        p.get_by_role("button", name="Cancel (queued)").click()
        expect(p.locator("#live-status")).to_contain_text("cancelled while queued", timeout=20_000)
        assert p.locator("#error").is_hidden() and p.locator("#gallery .entry").count() == 0
        assert call(srv.url + "/v1/queue")[2]["total"]["queued"] <= 1  # only the second blocker may still wait
        assert page.js_errors() == []
        page.close()
        browser.close()
        assert all(f.result(timeout=120)[0] == 200 for f in blockers)


# --- the host's dashboards: every metric they name exists ---------------------------------------------------

PROMETHEUS_BUILTINS = {"up"}


def _names_used() -> dict[str, set[str]]:
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text()
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "sd35.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    import yaml

    rules = [r["expr"] for g in yaml.safe_load(alerts)["groups"] for r in g["rules"]]
    word = re.compile(r"\b(sd35_[a-z0-9_]+|up)\b(?!\s*\()")
    return {"grafana": {m for e in exprs for m in word.findall(e)},
            "alerts": {m for e in rules for m in word.findall(e)}}


def test_every_metric_in_the_dashboard_and_alerts_is_served(tiny_cache):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from sd35.service.app import create_app
    from sd35.settings import Settings

    app = create_app(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu"))
    served = set()
    for family in text_string_to_metric_families(TestClient(app).get("/metrics").text):  # the real /metrics
        served |= {family.name, f"{family.name}_total"} if family.type == "counter" else {family.name}
        served |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")} if family.type == "histogram" else set()
    used = _names_used()
    assert used["grafana"] >= {"sd35_queue_depth", "sd35_images_total", "sd35_gpu_seconds_total", "sd35_model_loaded",
                               "sd35_generation_latency_seconds_bucket", "sd35_requests_total",
                               "sd35_gpu_memory_reserved_bytes"}
    for where, names in used.items():
        assert names - served - PROMETHEUS_BUILTINS == set(), f"{where} names metrics /metrics does not serve"


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian: apt-get install prometheus)")
def test_alert_rules_pass_promtool():
    r = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


# --- sd35 gpus: a faked nvidia-smi, real processes --------------------------------------------------------

def test_gpus_names_users_and_what_each_process_is(tmp_path):
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    sleeper = "import time; time.sleep(120)"
    procs = [subprocess.Popen([sys.executable, "-c", sleeper, "sd35", "serve", "--port", "8001"]),
             subprocess.Popen([sys.executable, "-c", sleeper, "-m", "ipykernel_launcher", "-f", "kernel-1.json"]),
             subprocess.Popen([sys.executable, "-c", sleeper, "train.py"])]
    gone = 4_000_000  # a PID /proc does not show (another container's)
    try:
        uuid0, uuid1 = "GPU-aaaa", "GPU-bbbb"
        apps = "\n".join([f"{uuid0}, {procs[0].pid}, 20480", f"{uuid0}, {procs[1].pid}, 3072",
                          f"{uuid1}, {procs[2].pid}, [N/A]", f"{uuid1}, {gone}, 1024"])
        smi = tmp_path / "nvidia-smi"
        gpu_rows = (f'"0, {uuid0}, NVIDIA H100 80GB HBM3, 24000, 81559" '
                    f'"1, {uuid1}, NVIDIA H100 80GB HBM3, 1500, 81559"')
        smi.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) printf '%s\\n' {gpu_rows} ;;
  --query-compute-apps=*) printf '%s\\n' "{apps}" ;;
  *) exit 9 ;;
esac
""")
        smi.chmod(0o755)
        env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
        r = run_cli("gpus", "--json", env=env)
        assert r.returncode == 0, r.stderr
        gpus = json.loads(r.stdout)
        assert [(g["index"], g["used_mib"], g["total_mib"]) for g in gpus] == [("0", 24000, 81559), ("1", 1500, 81559)]
        by_pid = {p["pid"]: p for g in gpus for p in g["processes"]}
        assert by_pid[procs[0].pid]["kind"] == "sd35 service" and by_pid[procs[0].pid]["user"] == me
        assert by_pid[procs[0].pid]["used_mib"] == 20480
        assert by_pid[procs[1].pid]["kind"] == "lab kernel" and by_pid[procs[2].pid]["kind"] == "other"
        assert by_pid[procs[2].pid]["used_mib"] is None and "train.py" in by_pid[procs[2].pid]["what"]
        assert by_pid[gone]["user"] == "?" and by_pid[gone]["kind"] == "unknown"
        text = run_cli("gpus", env=env).stdout
        assert "GPU 0  NVIDIA H100 80GB HBM3  23.4 / 79.6 GiB in use  (2 processes)" in text
        assert re.search(rf"pid {procs[1].pid}\s+{me}\s+3\.0 GiB\s+lab kernel", text)
        smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn''t communicate with the driver' >&2\n"
                       "exit 9\n")
        r = run_cli("gpus", env=env)
        assert r.returncode == 1 and "nvidia-smi failed" in r.stderr and "fix:" in r.stderr.lower()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_gpus_knows_a_service_instance_by_its_unit(tmp_path):
    from sd35.ops import gpus

    proc = tmp_path / "proc" / "123"
    proc.mkdir(parents=True)
    (proc / "cmdline").write_bytes(b"/opt/sd35-workspace/.venv/bin/python\0/opt/sd35-workspace/.venv/bin/sd35\0"
                                   b"serve\0--port\0008001\0")
    (proc / "cgroup").write_text("0::/system.slice/system-sd35\\x2dapi.slice/sd35-api@1.service\n")
    user, kind, what = gpus.identify(123, proc=tmp_path / "proc")
    assert kind == "sd35 service" and what == "sd35-api@1"


def test_serve_refuses_a_state_dir_it_cannot_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_cli("serve", env={"SD35_STATE_DIR": str(blocker / "state"), "SD35_DEVICE": "cpu"})
    assert r.returncode == 2 and "SD35_STATE_DIR" in r.stderr and "Traceback" not in r.stderr
