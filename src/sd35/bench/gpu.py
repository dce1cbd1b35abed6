"""`sd35 bench gpu` (`make gpu-check`): one command that proves FP8 is correct and faster on *this* GPU.

Why one command: a new team with a GPU server has never seen the `fp8` mode run; it needs, in one go and
offline, the GPU test tier, per-step time of bf16 / fp8-weight / fp8 eager and compiled, peak memory, cold
and warm compile times and fp8's error per block against bf16 — as JSON and as a markdown table ready for
docs/benchmarks.md. Published architectures with random weights: nothing is downloaded, and weight values
do not change speed or memory (the per-block error of random weights bounds the numerics, not the look).

Without CUDA it refuses (exit 2) unless `--rehearse`: the same sequence on the CPU with the tiny
architecture and emulated fp8 (`precision._emulation`), in a few minutes, reported `"rehearsal": true`.
CI runs the rehearsal (tests/test_bench_gpu.py), so this script cannot rot before the first GPU sees it.
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sd35.errors import HardwareError
from sd35.models import ARCHS

MODES = ("bf16", "fp8-weight", "fp8")
ROOT = Path(__file__).resolve().parents[3]  # the workspace (tests/ lives there in a checkout)


def step_inputs(arch: str, size: int, device: str, batch: int = 2) -> dict:
    """One denoising step's transformer inputs at `size`² (batch 2 = the CFG pair), random, bf16."""
    import torch

    config = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    bf = dict(dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.randn(batch, config["in_channels"], lat, lat, generator=g).to(device, **bf),
        encoder_hidden_states=torch.randn(batch, 77 + 256, config["joint_attention_dim"], generator=g).to(device, **bf),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, **bf),
        timestep=torch.full((batch,), 500.0, device=device),
    )


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_steps(model, inputs: dict, device: str, repeats: int) -> list[float]:
    """Seconds of each of `repeats` transformer forwards."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            model(**inputs, return_dict=False)
            _sync(device)
            times.append(time.perf_counter() - t)
    return times


def _peak(device: str) -> int:
    import resource

    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # the process's peak RSS (Linux KiB)


def _model(arch: str, mode: str, device: str, emulated: bool):
    from sd35 import precision
    from sd35.bench.arch import build_transformer

    model = build_transformer(arch)
    precision.apply(model, mode, device=device, emulated=emulated)
    return model.to(device)


def _compile_once(model, inputs, device: str, cache: str, mark_dynamic: bool) -> float:
    """Compile the blocks (the service's mode) and return the first call's seconds (compile + one step)."""
    import torch

    from sd35.inference import compilation

    torch._dynamo.reset()  # in-process state gone: what is left is the on-disk kernel cache
    compilation.apply(model, compilation.CompilePlan("blocks", "bench gpu", cache), mark_dynamic=mark_dynamic)
    return time_steps(model, inputs, device, 1)[0]


def mode_row(arch: str, mode: str, size: int, device: str, *, emulated: bool, repeats: int,
             mark_dynamic: bool = True) -> dict:
    """Eager and compiled (blocks) step time of one mode, its peak memory, and cold vs warm compile: 1. eager
    steps; 2. compile with an empty kernel cache (cold); 3. drop dynamo's state and compile again from the
    on-disk cache (warm), then time compiled steps. `mark_dynamic`: the inputs marked dynamic, as served."""
    import torch

    model = _model(arch, mode, device, emulated and mode == "fp8")
    inputs = step_inputs(arch, size, device)
    try:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        time_steps(model, inputs, device, 1)
        eager = time_steps(model, inputs, device, repeats)  # 1.
        row = {"eager_step_ms": round(statistics.median(eager) * 1000, 3), "peak_bytes": _peak(device)}
        cache = tempfile.mkdtemp(prefix="sd35-bench-gpu-")
        cold = _compile_once(model, inputs, device, cache, mark_dynamic)  # 2.
        warm = _compile_once(model, inputs, device, cache, mark_dynamic)  # 3.
        compiled = time_steps(model, inputs, device, repeats)
        row.update({"compiled_step_ms": round(statistics.median(compiled) * 1000, 3),
                    "compile_cold_s": round(cold, 2), "compile_warm_s": round(warm, 2),
                    "warm_over_cold": round(warm / cold, 3) if cold else None,
                    "emulated": emulated and mode == "fp8"})
        return row
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def pipeline_row(arch: str, size: int, device: str, *, emulated: bool, cache_dir: Path) -> dict:
    """Peak memory of the full pipeline in fp8 (`bench.pipeline`: every component, quantized as a `--precision
    fp8` load would), through one real generation (`generate.run`: 2 steps, guidance 4.5 so CFG doubles the
    batch, n=1, VAE decode included). On CUDA: bytes allocated with every weight loaded, then the run's
    `max_memory_allocated`; on the CPU: the process's peak RSS (which also counts what ran before)."""
    import torch

    from sd35.bench import pipeline
    from sd35.inference import generate

    started = time.perf_counter()
    loaded = pipeline.build(arch, device, emulated=emulated, cache_dir=cache_dir)
    try:
        loaded_bytes = int(torch.cuda.memory_allocated(device)) if device.startswith("cuda") else _peak(device)
        request = generate.GenerationRequest("a lighthouse on a cliff at dusk", steps=2, guidance=4.5,
                                             height=size, width=size)
        result = generate.run(loaded, request, num_images=1)  # resets the CUDA peak first
        return {"arch": arch, "size": size, "mode": "fp8", "emulated": loaded.plan.emulated,
                "weights_bytes": loaded.weight_bytes["total"]["total"], "loaded_bytes": loaded_bytes,
                "peak_bytes": result.peak_memory["bytes"], "kind": result.peak_memory["kind"],
                "quantized": pipeline.quantized(loaded), "decode_mode": result.decode_mode,
                "finite": result.finite, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        del loaded
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def block_errors(arch: str, size: int, device: str, *, emulated: bool) -> dict:
    """fp8 vs bf16 on the same random weights and inputs: each joint block's image-stream output (relative L2,
    cosine) and the transformer's output. The bf16 model is quantized in place after its reference run, so
    only one copy of the weights is ever held."""
    import torch

    from sd35 import precision
    from sd35.bench.arch import build_transformer

    model = build_transformer(arch).to(device)
    inputs = step_inputs(arch, size, device)
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, output):
            image = output[1] if isinstance(output, tuple) else output
            captured[index] = image.detach().float().cpu()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.transformer_blocks)]
    with torch.inference_mode():
        ref_out = model(**inputs, return_dict=False)[0].float().cpu()
        ref = dict(captured)
        captured.clear()
    precision.apply(model, "fp8", device=device, emulated=emulated)
    with torch.inference_mode():
        out = model(**inputs, return_dict=False)[0].float().cpu()
    for h in handles:
        h.remove()

    def rel(a, b):
        return round(float((a - b).norm() / a.norm().clamp_min(1e-12)), 5)

    def cos(a, b):
        return round(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)), 6)

    blocks = [{"block": i, "rel_err": rel(ref[i], captured[i]), "cosine": cos(ref[i], captured[i])} for i in sorted(ref)]
    del model
    gc.collect()
    return {"arch": arch, "size": size, "blocks": blocks, "output_rel_err": rel(ref_out, out),
            "output_cosine": cos(ref_out, out), "max_block_rel_err": max(b["rel_err"] for b in blocks)}


def image_errors(arch: str, size: int, device: str, *, emulated: bool, cache_dir: Path, steps: int = 4) -> dict:
    """fp8 vs bf16 on the final image of the full pipeline of `arch` in random weights (`bench.pipeline`):
    the same seeded weights built twice, T5 bf16 in both (only the MMDiT's precision differs), one prompt and
    seed, `steps` steps with CFG, VAE decode; PSNR, SSIM and relative error of the two images. Random weights
    draw no picture, so this bounds how far FP8 moves the pixels, not how an image looks."""
    import torch

    from sd35.bench import fidelity, pipeline
    from sd35.inference import generate

    request = generate.GenerationRequest("a lighthouse on a cliff at dusk", steps=steps, guidance=4.5,
                                         height=size, width=size, seed=0)
    images, started = {}, time.perf_counter()
    for mode in ("bf16", "fp8"):  # one pipeline held at a time
        torch.manual_seed(0)
        loaded = pipeline.build(arch, device, emulated=emulated, cache_dir=cache_dir, mode=mode, t5="bf16")
        images[mode] = generate.run(loaded, request, num_images=1).images[0]
        del loaded
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"arch": arch, "size": size, "steps": steps, "emulated": emulated,
            "psnr_db": round(fidelity.psnr(images["bf16"], images["fp8"]), 2),
            "ssim": round(fidelity.ssim(images["bf16"], images["fp8"]), 4),
            "rel_err": round(fidelity.image_rel_err(images["bf16"], images["fp8"]), 5),
            "seconds": round(time.perf_counter() - started, 1)}


def gpu_tests(rehearse: bool) -> dict:
    """The GPU test tier (`pytest -m "gpu or fp8"`) when the tests are here (a checkout); on the rehearsal
    every test skips, which still proves the tier collects."""
    tests = ROOT / "tests"
    if not tests.is_dir():
        return {"ran": False, "why": f"no tests/ beside the package ({ROOT}): an installed wheel"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu or fp8", "-p", "no:cacheprovider",
                        str(tests / "test_gpu.py")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {"ran": True, "returncode": r.returncode, "summary": last, "passed": r.returncode in (0, 5)}


def plan(rehearse: bool) -> dict:
    """Which GPU, architecture and size: Large at 1024² where memory allows (~40 GB for bf16 weights plus
    the fp8 copy and activations), Medium otherwise; the rehearsal: tiny at 128² on the CPU, fp8 emulated."""
    import torch

    if not torch.cuda.is_available():
        if not rehearse:
            raise HardwareError("`sd35 bench gpu` measures a CUDA GPU, and torch sees none "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}).",
                                "run it on the GPU server (`make gpu-check`), or pass --rehearse to run the same "
                                "sequence on this CPU with the tiny model and emulated fp8.")
        return {"device": "cpu", "device_name": "CPU", "arch": "tiny", "size": 128, "emulated": True,
                "rehearsal": True, "repeats": 2}
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) < (8, 9):
        raise HardwareError(f"{props.name} (SM {props.major}.{props.minor}) has no FP8 tensor cores: the fp8 mode "
                            "cannot be measured on it.", "run on an Ada, Hopper or Blackwell GPU (SM >= 8.9).")
    arch = "large" if props.total_memory >= 60 * 2**30 else "medium"
    return {"device": "cuda:0", "device_name": props.name, "arch": arch, "size": 1024, "emulated": False,
            "rehearsal": rehearse, "repeats": 10}


def run(*, rehearse: bool = False) -> dict:
    """The whole acceptance, in order: 1. plan (refuse without CUDA unless rehearsing); 2. the GPU test
    tier; 3. the full fp8 pipeline's peak memory; 4. each mode's step times, peak memory and compile times;
    5. fp8's per-block error; 6. fp8's error on the final image (full pipeline, 4 steps)."""
    import torch
    import torchao

    from sd35.settings import Settings

    started = time.perf_counter()
    p = plan(rehearse)  # 1.
    report = {**p, "torch": torch.__version__, "torchao": torchao.__version__, "tests": gpu_tests(rehearse)}  # 2.
    cache_dir = Settings().cache_dir  # the tiny model's tokenizers, which the random pipelines use
    report["pipeline"] = pipeline_row(p["arch"], p["size"], p["device"], emulated=p["emulated"],  # 3.
                                      cache_dir=cache_dir)
    # The compile as served (inputs marked dynamic), except on the CPU rehearsal: there a dynamic C++ compile
    # costs 20-30 s more per mode than a static one, which would take the rehearsal past its 3 minutes; the
    # marked path is tested by `bench dynamic`'s test and the service's no-recompile test.
    marked = p["device"] != "cpu"
    report["compile_shapes"] = "marked dynamic (as served)" if marked else "static (CPU rehearsal)"
    rows = {}
    for mode in MODES:  # 4.
        rows[mode] = mode_row(p["arch"], mode, p["size"], p["device"], emulated=p["emulated"], repeats=p["repeats"],
                              mark_dynamic=marked)
    for row in rows.values():
        for kind in ("eager_step_ms", "compiled_step_ms"):
            row[kind.replace("_step_ms", "_vs_bf16")] = round(row[kind] / rows["bf16"][kind], 3)
    report["modes"] = rows
    report["fp8_vs_bf16"] = block_errors(p["arch"], min(p["size"], 512), p["device"], emulated=p["emulated"])  # 5.
    report["fp8_vs_bf16"]["image"] = image_errors(p["arch"], p["size"], p["device"], emulated=p["emulated"],  # 6.
                                                  cache_dir=cache_dir)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["note"] = ("rehearsal on the CPU: emulated fp8 and the tiny architecture exercise the sequence; these are "
                      "not GPU figures" if p["rehearsal"] and p["device"] == "cpu" else None)
    return report


def _bytes(b: int) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def markdown(report: dict) -> str:
    """The report as the table docs/benchmarks.md takes."""
    head = (f"{report['arch']} at {report['size']}² on {report['device_name']} · torch {report['torch']} · torchao "
            f"{report['torchao']}" + (" · **rehearsal (CPU, emulated fp8): not GPU figures**" if report["note"] else ""))
    lines = [head, "", f"compiled: `blocks`, shapes {report['compile_shapes']}", "",
             "| mode | eager ms/step | × bf16 | compiled ms/step | × bf16 | peak | compile cold / warm s |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        lines.append(f"| {mode}{' (emulated)' if r['emulated'] else ''} | {r['eager_step_ms']:.1f} | "
                     f"{r['eager_vs_bf16']:.2f} | {r['compiled_step_ms']:.1f} | {r['compiled_vs_bf16']:.2f} | "
                     f"{r['peak_bytes'] / 1e9:.2f} GB | {r['compile_cold_s']} / {r['compile_warm_s']} |")
    pl = report["pipeline"]
    kind = "max allocated" if pl["kind"] == "cuda_max_allocated" else "process peak RSS"
    lines += ["", f"full pipeline, fp8 ({pl['arch']}, {pl['size']}², 2 steps with CFG, VAE decode): peak "
              f"{_bytes(pl['peak_bytes'])} ({kind}), weights {_bytes(pl['weights_bytes'])}; "
              f"quantized: {', '.join(pl['quantized'])}"]
    e = report["fp8_vs_bf16"]
    lines += ["", f"fp8 vs bf16 ({e['arch']}, {e['size']}², random weights): output rel. error {e['output_rel_err']}, "
              f"cosine {e['output_cosine']}; per block rel. error "
              + ", ".join(str(b["rel_err"]) for b in e["blocks"])]
    i = e["image"]
    lines += ["", f"fp8 vs bf16, final image ({i['arch']}, {i['size']}², {i['steps']} steps, full pipeline in random "
              f"weights, T5 bf16 in both): PSNR {i['psnr_db']} dB, SSIM {i['ssim']}, rel. error {i['rel_err']}"]
    return "\n".join(lines)
