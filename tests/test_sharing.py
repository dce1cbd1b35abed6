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
    assert "robot:scrypt$" in keys.read_text() and keys.read_text().strip().endswith("priority=batch daily_images=50")
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
