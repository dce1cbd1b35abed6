"""torch.compile of the MMDiT (SD35_COMPILE): the mode and its reason, eager while debugging, the kernel cache
shared across processes, and compiled images matching eager ones. The speed itself is `sd35 bench speed`'s."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from sd35.inference import compilation
from sd35.settings import Settings


def test_auto_compiles_for_serve_on_cuda_only(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    s = Settings(hf_hub_cache=tmp_path / "hub")
    serve = compilation.resolve(s, device="cuda:0", purpose="serve")
    assert serve.mode == "blocks" and "serve" in serve.reason
    # this account's own cache, never beside the (shared) Hugging Face cache; created 0700
    assert serve.cache_dir.startswith(str(tmp_path / "xdg" / "sd35-compile"))
    for folder in (tmp_path / "xdg", tmp_path / "xdg" / "sd35-compile", Path(serve.cache_dir)):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    one_off = compilation.resolve(s, device="cuda:0", purpose="generate")
    assert one_off.mode == "off" and "single image" in one_off.reason
    assert compilation.resolve(s, device="cpu", purpose="serve").mode == "off"
    forced = compilation.resolve(Settings(compile="full", compile_cache=tmp_path / "cc"), device="cpu",
                                 purpose="generate")
    assert forced.mode == "full" and forced.cache_dir.startswith(str(tmp_path / "cc"))


@pytest.mark.parametrize("env", [{"breaks": "block.1@0"}, {"debugpy": "127.0.0.1:5678"}])
def test_debugging_stays_eager(env, monkeypatch):
    said = []
    monkeypatch.setattr(compilation.log, "warning", lambda msg, *args: said.append(msg % args))
    plan = compilation.resolve(Settings(compile="blocks", **env), device="cuda:0", purpose="serve")
    assert plan.mode == "off" and "eager" in plan.reason
    assert any("compile=blocks ignored" in m for m in said), said


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_a_compile_cache_others_can_write_is_refused(tmp_path, monkeypatch, mode):
    """Explicit SD35_COMPILE_CACHE: exit 2 naming the problem. The default one: a warning, and a compile
    with no cache at all (a fresh private folder, inductor's caches off)."""
    from sd35.errors import InputError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(InputError, match="can be written by other accounts") as info:
        compilation.resolve(Settings(compile="blocks", compile_cache=shared), device="cpu", purpose="generate")
    assert "SD35_COMPILE_CACHE" in info.value.fix
    # the default location, made writable by others (a shared home, a group-writable ~/.cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "sd35-compile").mkdir(parents=True)
    (tmp_path / "xdg").chmod(mode)
    said = []
    monkeypatch.setattr(compilation.log, "warning", lambda msg, *a: said.append(msg % a))
    plan = compilation.resolve(Settings(compile="blocks"), device="cpu", purpose="generate")
    assert plan.mode == "blocks" and plan.cache_dir is None and "compiling without a cache" in said[0]
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(var, "")  # records the undo: _use_cache's values must not outlive this test
        monkeypatch.delenv(var)
    compilation._use_cache(plan.cache_dir)
    private = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert private.stat().st_mode & 0o777 == 0o700 and not str(private).startswith(str(tmp_path / "xdg"))
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0" and os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "0"


def test_a_file_planted_inside_an_open_cache_is_found(tmp_path):
    cache = tmp_path / "cc"
    (cache / "torch-x" / "ab").mkdir(parents=True)
    cache.chmod(0o755)
    assert compilation.cache_problem(cache) is None
    planted = cache / "torch-x" / "ab" / "kernel.py"
    planted.write_text("import os  # planted")
    planted.chmod(0o666)
    assert "kernel.py can be written by other accounts" in compilation.cache_problem(cache)
    cache.chmod(0o700)  # nobody else can enter: what is inside is out of their reach
    assert compilation.cache_problem(cache) is None


def test_bad_compile_mode_is_a_clear_error(tmp_path):
    r = run_cli("generate", "--compile", "max", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "SD35_COMPILE" in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr


def test_decode_mode_plans_by_free_memory():
    from sd35.inference.generate import VAE_DECODE_BYTES_PER_PIXEL, decode_mode

    one = 1024 * 1024 * VAE_DECODE_BYTES_PER_PIXEL
    assert decode_mode(None, 4, 1024, 1024) == "batched"  # host memory: not planned
    assert decode_mode(10 * one, 4, 1024, 1024) == "batched"
    assert decode_mode(2 * one, 4, 1024, 1024) == "sliced"
    assert decode_mode(one // 2, 1, 1024, 1024) == "tiled"


def test_sliced_and_tiled_decode_give_the_requested_images(monkeypatch, tmp_path):
    from sd35 import hardware
    from sd35.runtime import Runtime

    rt = Runtime.load(Settings(device="cpu", precision="bf16"), breaks=[])
    req = rt.check(prompt="a cube", steps=1, seed=3, height=256, width=256)
    plain = rt.generate(req, n=2)
    monkeypatch.setattr(hardware, "free_memory", lambda device: 2 * 256 * 256 * 4096 - 1)  # < 2 images
    sliced = rt.generate(req, n=2)
    assert sliced.decode_mode == "sliced"
    from sd35.bench.fidelity import psnr

    assert psnr(sliced.images[1], plain.images[1]) >= 40  # the same image (bf16 convs batch-dependent rounding)
    monkeypatch.setattr(hardware, "free_memory", lambda device: 1)
    tiled = rt.generate(req)
    assert tiled.decode_mode == "tiled" and tiled.images[0].size == (256, 256)


@pytest.mark.slow
def test_compiled_matches_eager_and_a_second_process_reuses_the_kernels(tmp_path):
    """Two processes share a fresh SD35_COMPILE_CACHE: the second compiles from the first one's kernels
    (cache hits, no misses) and both images match the eager image."""
    env = {"SD35_COMPILE_CACHE": str(tmp_path / "cache"), "SD35_PRECISION": "bf16"}
    common = ["generate", "--steps", "1", "--seed", "4", "--prompt", "a red cube"]
    eager = run_cli(*common, "--compile", "off", "--out", str(tmp_path / "eager"), env=env, timeout=900)
    assert eager.returncode == 0, eager.stderr
    records = []
    for i in range(2):
        r = run_cli(*common, "--compile", "blocks", "--out", str(tmp_path / f"c{i}"), env=env, timeout=900)
        assert r.returncode == 0, r.stderr
        records.append(json.loads(next((tmp_path / f"c{i}").glob("*.json")).read_text()))
    cold, warm = records[0]["compile"], records[1]["compile"]
    assert cold["mode"] == warm["mode"] == "blocks" and cold["seconds"] > 0 and warm["seconds"] > 0
    assert cold["cache"]["fxgraph_cache_miss"] > 0
    assert warm["cache"]["fxgraph_cache_hit"] > 0 and warm["cache"]["fxgraph_cache_miss"] == 0, warm
    from sd35.bench.fidelity import psnr

    ref = Image.open(next((tmp_path / "eager").glob("*.png")))
    for i in range(2):
        assert psnr(ref, Image.open(next((tmp_path / f"c{i}").glob("*.png")))) >= 35
    assert json.loads(next((tmp_path / "eager").glob("*.json")).read_text())["compile"]["mode"] == "off"


def test_bench_speed_on_cpu_says_it_ran_the_tiny_model():
    r = run_cli("bench", "speed", "--eager-only", "--repeats", "1", "--modes", "bf16,fp8-weight,fp8", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["arch"] == "tiny" and "CPU" in report["note"] and "GPU figures" in report["note"]
    assert report["modes"]["bf16"]["eager"]["step_ms_median"] > 0
    assert report["modes"]["fp8-weight"]["eager"]["ratio_vs_bf16"] > 0
    assert "note" in report["modes"]["fp8"]  # FP8 compute needs FP8 tensor cores: said, not faked
    assert report["emulated"] is False


def test_bench_speed_and_lora_run_fp8_emulated_and_say_so():
    """SD35_FP8_EMULATE=1 reaches the benchmarks: their fp8 rows run (torch's CPU float8 matmul) and the
    report and the table say "emulated" — numerics, not speed."""
    env = {"SD35_FP8_EMULATE": "1"}
    r = run_cli("bench", "speed", "--eager-only", "--repeats", "1", "--modes", "bf16,fp8", "--json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["emulated"] is True and "note" not in report["modes"]["fp8"]
    assert report["modes"]["fp8"]["eager"]["step_ms_median"] > 0
    r = run_cli("bench", "lora", "--arch", "tiny", "--size", "128", "--eager-only", "--repeats", "1", "--modes", "fp8",
                "--ranks", "0,16", env=env)
    assert r.returncode == 0, r.stderr
    assert "fp8 (emulated) rank   0: eager" in r.stdout and "fp8 (emulated) rank  16: eager" in r.stdout, r.stdout


def test_a_compile_under_way_counts_as_progress_for_the_watchdog():
    """A compile inside a generation beats no heartbeat (no step ends for minutes): the service's watchdog
    counts a compile under way as progress, up to SD35_LOAD_TIMEOUT; a real torch.compile is seen as one."""
    import threading
    import time
    from types import SimpleNamespace

    import torch

    from sd35.service.app import progressing

    compilation.count_compiles()
    torch._dynamo.reset()  # as a keep-alive release does: it drops dynamo's callbacks, which must come back
    compilation.count_compiles()  # what the reload's `compilation.apply` calls
    worker = SimpleNamespace(state="ready", heartbeat=time.monotonic() - 100,
                             settings=SimpleNamespace(load_timeout=900.0))
    assert compilation.compiling_for() is None and not progressing(worker, limit=10)  # no step for 100 s: a hang
    inside, release = threading.Event(), threading.Event()

    def slow_backend(gm, example_inputs):  # stands for inductor's minutes of codegen
        inside.set()
        release.wait(30)
        return gm.forward

    fn = torch.compile(lambda x: x * 2 + 1, backend=slow_backend)
    thread = threading.Thread(target=fn, args=(torch.ones(3),))
    thread.start()
    try:
        assert inside.wait(60)
        assert compilation.compiling_for() is not None and progressing(worker, limit=10)
        worker.settings.load_timeout = 0.0  # compiling for longer than SD35_LOAD_TIMEOUT: a hang after all
        assert not progressing(worker, limit=10)
    finally:
        release.set()
        thread.join(60)
    assert compilation.compiling_for() is None and not progressing(worker, limit=10)
    worker.heartbeat, worker.state = time.monotonic(), "failed"
    assert not progressing(worker, limit=10)  # a failed worker never looks alive


def test_bench_dynamic_marked_inputs_stay_under_dynamos_recompile_limit():
    """`sd35 bench dynamic` (dynamo alone, `--backend eager`: the graph decisions in seconds): marking the blocks'
    inputs dynamic (what `compilation.apply` does) needs fewer graphs than letting the warm-up's shapes make them
    dynamic, and stays under dynamo's recompile limit, which the old way hit (3 block variants × 3 graphs > 8:
    one variant then ran eager). Neither adds a graph for the 16 request shapes after the warm-up."""
    r = run_cli("bench", "dynamic", "--arch", "tiny", "--size", "128", "--backend", "nope")
    assert r.returncode == 2 and "--backend inductor or eager" in r.stderr, r.stderr
    r = run_cli("bench", "dynamic", "--arch", "tiny", "--size", "128", "--modes", "bf16", "--backend", "eager",
                "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["modes"]["bf16"]
    old, marked = rows["warm-up"], rows["marked"]
    assert marked["limit_hits"] == 0 and old["limit_hits"] >= 1, rows
    assert marked["graphs_at_ready"] < old["graphs_at_ready"], rows
    assert marked["graphs_after_ready"] == 0 and old["graphs_after_ready"] == 0, rows
