"""The `fp8` mode (FP8 weights and activations) end to end on a CPU, emulated (SD35_FP8_EMULATE=1), and the
non-finite check that keeps an all-black image from being saved in silence.

PSNR bounds: on the tiny model (128², 4 steps, seed 0) fp8 vs bf16 measured 41.4 dB and fp8-weight vs bf16
41.9 dB (docs/benchmarks.md, `sd35 bench gpu --rehearse`). The bound 30 dB leaves ~11 dB for other torch/torchao
builds while still failing on a broken path (a wrong scale or a transposed weight gives < 15 dB); the fp8 image
must also differ from fp8-weight's (the activation quantization really ran).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, run_cli

from sd35 import hardware, precision
from sd35.errors import HardwareError, NonFiniteOutput

PSNR_MIN_DB = 30.0
EMULATE = {"SD35_FP8_EMULATE": "1", "SD35_DEVICE": "cpu"}


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def _hw(capability=None) -> hardware.Hardware:
    if capability is None:
        return hardware.Hardware("cpu", "CPU", None, None, False, "fp8 compute: no CUDA device", True)
    ok = capability >= (8, 9)
    return hardware.Hardware("cuda:0", "GPU", capability, 80 << 30, ok, f"SM {capability}", True)


# --- 1. the switch ----------------------------------------------------------------------------------------

def test_emulation_only_when_asked_only_on_a_cpu_and_never_by_auto():
    plan = precision.resolve("fp8", "auto", _hw(), emulate=True)
    assert plan.transformer == "fp8" and plan.emulated and "emulated" in plan.transformer_reason
    assert plan.as_dict()["emulated"] is True and plan.t5 == "fp8-weight"
    assert precision.resolve("auto", "auto", _hw(), emulate=True).transformer == "fp8-weight"  # auto never picks it
    assert precision.resolve("fp8-weight", "auto", _hw(), emulate=True).emulated is False
    with pytest.raises(HardwareError, match="SD35_FP8_EMULATE"):  # the refusal names the way to emulate
        precision.resolve("fp8", "auto", _hw())
    with pytest.raises(HardwareError, match="on a CPU only"):  # an SM 8.0 GPU: no emulation on a GPU
        precision.resolve("fp8", "auto", _hw((8, 0)), emulate=True)
    real = precision.resolve("fp8", "auto", _hw((9, 0)), emulate=True)  # a real FP8 GPU: the real thing
    assert real.transformer == "fp8" and real.emulated is False


def test_the_torchao_bypass_is_scoped_to_one_quantize_call():
    from torchao.quantization import quant_api

    original = quant_api._check_hardware_support
    with pytest.raises(AssertionError):  # torchao refuses fp8 on a CPU by itself
        precision.apply(torch.nn.Sequential(torch.nn.Linear(64, 64, dtype=torch.bfloat16)), "fp8")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, dtype=torch.bfloat16))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    precision.apply(model, "fp8", emulated=True)
    assert quant_api._check_hardware_support is original  # restored at once
    assert "Float8" in type(model[0].weight).__name__
    with torch.no_grad():
        out = model(x)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert 0 < rel < 0.1, rel  # FP8 weights and activations: about 0.035 measured


# --- 2. end to end --------------------------------------------------------------------------------------

def _request(steps=4, size=128, guidance=4.5):
    from sd35.inference import generate as gen

    return gen.GenerationRequest("a lighthouse at dusk", steps=steps, guidance=guidance, height=size, width=size,
                                 seed=0)


def _runtime(tiny_cache, mode, **kw):
    from sd35.runtime import Runtime
    from sd35.settings import Settings

    return Runtime.load(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", precision=mode,
                                 fp8_emulate=True, **kw))


@pytest.fixture(scope="module")
def images(tiny_cache):
    """The same request in bf16, fp8-weight and emulated fp8 (lean load, the default)."""
    out = {}
    for mode in ("bf16", "fp8-weight", "fp8"):
        rt = _runtime(tiny_cache, mode)
        out[mode] = (rt, rt.generate(_request()).images[0])
    return out


@pytest.mark.slow
def test_fp8_runs_for_real_and_stays_within_the_measured_bound(images):
    rt, fp8 = images["fp8"]
    assert rt.loaded.plan.emulated and rt.loaded.load_path == "lean"
    assert "Float8" in type(rt.pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__
    t5_linear = next(m for m in rt.pipe.text_encoder_3.modules() if isinstance(m, torch.nn.Linear))
    assert rt.loaded.plan.t5 == "fp8-weight" and "Float8" in type(t5_linear.weight).__name__  # T5 in FP8 too
    bf16, weight_only = images["bf16"][1], images["fp8-weight"][1]
    assert psnr(fp8, weight_only) < 100 and psnr(fp8, bf16) < 100  # the activation quantization ran
    assert psnr(fp8, bf16) >= PSNR_MIN_DB and psnr(weight_only, bf16) >= PSNR_MIN_DB


@pytest.mark.slow
def test_fp8_without_lean_loading_matches_the_lean_path(tiny_cache, images):
    rt = _runtime(tiny_cache, "fp8", lean_load=False)
    assert rt.loaded.load_path == "bf16-quantize" and rt.loaded.plan.emulated
    assert psnr(rt.generate(_request()).images[0], images["fp8"][1]) >= 60  # same bytes, same kernels


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_generate_and_the_fp8_store_loaded_by_name(tmp_path, images):
    r = run_cli("generate", "--precision", "fp8", "--fp8-emulate", "--device", "cpu", "--steps", "4", "--seed", "0",
                "--prompt", "a lighthouse at dusk", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    record = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    assert record["precision"]["transformer"] == "fp8" and record["precision"]["emulated"] is True
    assert record["finite"] is True and record["nonfinite_values"] == 0
    q = run_cli("cache", "quantize", "--model", "tiny", "--precision", "fp8", env=EMULATE)
    assert q.returncode == 0, q.stderr
    r = run_cli("generate", "--model", "tiny-fp8", "--precision", "fp8", "--steps", "4", "--seed", "0",
                "--prompt", "a lighthouse at dusk", "--out", str(tmp_path / "b"), env=EMULATE)
    assert r.returncode == 0, r.stderr
    stored = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert stored["load_path"] == "prequantized" and stored["precision"]["emulated"] is True
    from PIL import Image

    a, b = (Image.open(next((tmp_path / d).glob("*.png"))) for d in "ab")
    assert psnr(a, b) >= 60 and psnr(b, images["bf16"][1]) >= PSNR_MIN_DB  # the store is the lean path's bytes


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", ["blocks", "full"])  # each ~80 s of CPU compile on a quiet 2-core machine
def test_compiled_fp8_matches_eager_fp8(tmp_path, mode, images):
    r = run_cli("generate", "--precision", "fp8", "--compile", mode, "--steps", "4", "--seed", "0",
                "--prompt", "a lighthouse at dusk", "--out", str(tmp_path), timeout=1200,
                env={**EMULATE, "SD35_COMPILE_CACHE": str(tmp_path / "cc")})
    assert r.returncode == 0, r.stderr
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["compile"]["mode"] == mode and record["precision"]["emulated"] is True
    from PIL import Image

    assert psnr(Image.open(next(tmp_path.glob("*.png"))), images["fp8"][1]) >= 35


@pytest.mark.slow
def test_fidelity_per_block_fp8_emulated():
    r = run_cli("fidelity", "--per-block", "--precision", "fp8", "--device", "cpu", "--json", env=EMULATE)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["candidate"] == "fp8" and report["emulated"] is True and report["blocks"]
    assert all(0 < b["image_rel_err"] < 0.2 for b in report["blocks"]), report["blocks"]
    assert report["image"]["psnr_db"] >= PSNR_MIN_DB, report["image"]


# --- 3b. never a black image in silence -----------------------------------------------------------------

def _inject_inf(rt, step=1):
    """Inf in one FP8 linear's output from `step` on (FP8's classic overflow), through a forward hook."""
    lin = rt.pipe.transformer.transformer_blocks[1].attn.to_k

    def hook(module, args, output):
        if (rt.pipe.scheduler.step_index or 0) >= step:
            output = output.clone()
            output[..., 0] = float("inf")
            return output

    return lin.register_forward_hook(hook)


@pytest.mark.slow
def test_nan_break_on_emulated_fp8_names_the_module_and_the_image_is_refused(images, caplog):
    from sd35.debugging import breakpoints

    rt = images["fp8"][0]
    handle = _inject_inf(rt)
    rt.breaks = breakpoints.parse("nan")
    rt.harness = breakpoints.arm(rt.pipe, rt.breaks)
    try:
        with pytest.raises(NonFiniteOutput) as err:
            rt.generate(_request(steps=2))
        assert rt.harness.hits == ["nan@1 transformer_blocks.1.attn.to_k"]
        assert "SD35_BREAK=nan" in err.value.fix and "--keep-nonfinite" in err.value.fix
        kept = rt.generate(_request(steps=2), keep_nonfinite=True)
        assert not kept.finite and kept.nonfinite[0] > 0
    finally:
        handle.remove()
        rt.harness.disarm()
        rt.breaks, rt.harness = [], None


def test_a_nan_watch_that_finds_nothing_says_so(tiny_cache, caplog):
    import logging

    from sd35.debugging import breakpoints
    from sd35.runtime import Runtime
    from sd35.settings import Settings

    rt = Runtime.load(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", precision="bf16"),
                      breaks=breakpoints.parse("nan@1"))
    with caplog.at_level(logging.INFO, logger="sd35.debugging.breakpoints"):
        result = rt.generate(_request(steps=2, size=64))
    assert result.finite and rt.harness.hits == []
    assert any("no non-finite output" in m and "from step 1" in m for m in caplog.messages), caplog.messages


@pytest.fixture(scope="module")
def nan_model(tiny_cache, tmp_path_factory) -> Path:
    """A copy of the tiny model whose transformer has one NaN weight (what a bad FP8 file does)."""
    from safetensors.torch import load_file, save_file

    from sd35.weights import tiny

    src = tiny.ensure(tiny_cache)
    dst = tmp_path_factory.mktemp("nan-model") / "tiny-nan"
    shutil.copytree(src, dst)
    f = next((dst / "transformer").glob("*.safetensors"))
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("attn.to_q.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


@pytest.mark.slow
def test_cli_refuses_a_black_image_and_keeps_it_only_when_asked(nan_model, tmp_path):
    common = ["generate", "--model", str(nan_model), "--precision", "bf16", "--steps", "2", "--seed", "0",
              "--height", "64", "--width", "64"]
    r = run_cli(*common, "--out", str(tmp_path / "a"))
    assert r.returncode == 3, r.stderr
    assert "SD35_BREAK=nan" in r.stderr and "--keep-nonfinite" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("*.png"))
    r = run_cli(*common, "--keep-nonfinite", "--out", str(tmp_path / "b"))
    assert r.returncode == 3 and "kept as asked" in r.stderr, r.stderr
    record = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert record["finite"] is False and record["nonfinite_values"] > 0


@pytest.mark.slow
def test_api_answers_an_error_not_a_black_image(nan_model, tiny_cache):
    from test_service import KEY, InProcessServer, call

    from sd35.settings import Settings

    settings = Settings(_env_file=None, model=str(nan_model), cache_dir=tiny_cache, device="cpu", precision="bf16",
                        port=free_port(), api_key=KEY, warmup=False)
    with InProcessServer(settings) as srv:
        status, _, body = call(srv.url + "/v1/images/generations", "POST",
                               {"prompt": "x", "size": "64x64", "steps": 1})
    assert status == 500 and body["error"]["code"] == "nonfinite_output", body
    assert "SD35_BREAK=nan" in body["error"]["message"]


# --- the service, emulated ------------------------------------------------------------------------------

@pytest.mark.slow
def test_service_reports_emulated_fp8(tiny_cache):
    from test_service import KEY, InProcessServer, call

    from sd35.settings import Settings

    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", precision="fp8",
                        fp8_emulate=True, port=free_port(), api_key=KEY, compile="off")
    with InProcessServer(settings) as srv:
        status, _, ready = call(srv.url + "/readyz")
        assert status == 200 and ready["precision"]["transformer"] == "fp8" and ready["precision"]["emulated"]
        status, _, body = call(srv.url + "/v1/images/generations", "POST",
                               {"prompt": "x", "size": "64x64", "steps": 2})
        assert status == 200 and body["sd35"]["emulated"] is True and body["sd35"]["precision"] == "fp8", body
        metrics = call(srv.url + "/metrics")[2]
    assert "sd35_fp8_emulated 1.0" in metrics


def test_doctor_explains_emulation():
    from sd35.ops import doctor
    from sd35.ops.doctor import gpu
    from sd35.settings import Settings

    ctx = doctor.Context(settings=Settings(_env_file=None, precision="fp8", fp8_emulate=True, device="cpu"),
                         root=Path(__file__).resolve().parents[1])
    c = gpu.check_precision(ctx)
    assert c.status == "warn" and "Emulated" in c.finding and "numerics and tests only" in c.finding
    assert "auto never picks" in c.fix
    ctx = doctor.Context(settings=Settings(_env_file=None, precision="auto", fp8_emulate=True, device="cpu"),
                         root=Path(__file__).resolve().parents[1])
    c = gpu.check_precision(ctx)
    assert c.status == "ok" and "fp8-weight" in c.finding and "no effect" in c.finding


# --- 3. no recompile while serving ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_no_recompile_after_ready_across_n_guidance_and_sizes(tiny_cache, tmp_path, mode):
    """Blocks compiled during the warm-up; then n ∈ {1, 2, 4} × guidance ∈ {0, 4.5} × three sizes, none of them
    the warm-up's: sd35_recompiles_total stays 0."""
    from test_service import KEY, InProcessServer, call

    import torch

    from sd35.inference import compilation
    from sd35.settings import Settings

    # A fresh process's dynamo, as a service has: the graphs earlier tests in this worker compiled (the other
    # mode's) would otherwise count towards the same recompile limit.
    torch._dynamo.reset()
    hits = f"sd35_compile_limit_hits_total {float(compilation.limit_hits())}"  # the process-wide count so far
    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", precision=mode,
                        fp8_emulate=True, port=free_port(), api_key=KEY, compile="blocks",
                        compile_cache=tmp_path / "cc", max_images=4, request_timeout=600)
    srv = InProcessServer(settings)
    srv.thread.start()  # the compiled warm-up on a CPU takes minutes: wait longer than InProcessServer does
    import time

    deadline = time.time() + 2400
    while time.time() < deadline:
        try:
            if call(srv.url + "/readyz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(1)
    try:
        before = call(srv.url + "/metrics")[2]
        assert "sd35_recompiles_total 0.0" in before and "sd35_ready 1.0" in before
        # dynamo's recompile limit (8 graphs for all the blocks' shared frame) not hit: no block runs eager
        assert hits in before
        for size in ("80x80", "112x96", "144x144"):
            for n in (1, 2, 4):
                for guidance in (0.0, 4.5):
                    status, _, body = call(srv.url + "/v1/images/generations", "POST",
                                           {"prompt": "x", "size": size, "n": n, "steps": 1,
                                            "guidance_scale": guidance}, timeout=600)
                    assert status == 200 and len(body["data"]) == n, body
        metrics = call(srv.url + "/metrics")[2]
    finally:
        srv.__exit__(None, None, None)
    assert "sd35_recompiles_total 0.0" in metrics, [m for m in metrics.splitlines() if "recompiles" in m]
    assert hits in metrics
