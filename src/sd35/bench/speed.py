"""`sd35 bench speed [--cache-check]`: transformer step latency (and peak GPU memory) per precision mode,
eager and compiled, and how much a warm compiled-kernel cache saves a second process.

Why one run for every mode: FP8 pays off only compiled (eager, torchao's quantize/scale kernels around every
matmul can make `fp8` slower than bf16), so the claim "fp8 compiled ≤ 0.6× bf16 compiled" is only meaningful
side by side on the same machine, inputs and repeats. Random weights of the published architecture
(`arch.build_transformer`); on a CPU the tiny model runs instead and the report says so: those figures
exercise the code path, they are not GPU numbers.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

from sd35.bench.arch import build_transformer, emulates_fp8, on_this_device
from sd35.models import ARCHS

GOAL_FP8_COMPILED_RATIO = 0.60


def _step_inputs(config: dict, size: int, device: str, batch: int = 2) -> dict:
    """One denoising step's transformer inputs at `size`² (batch 2 = the CFG pair), random, bf16, on `device`."""
    import torch

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    inputs = dict(
        hidden_states=torch.randn(batch, config["in_channels"], lat, lat, generator=g),
        encoder_hidden_states=torch.randn(batch, 77 + 256, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 500.0),
    )
    return {k: v.to(device=device, dtype=torch.bfloat16 if k != "timestep" else v.dtype) for k, v in inputs.items()}


def _time_steps(model, inputs: dict, device: str, repeats: int) -> list[float]:
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            model(**inputs, return_dict=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
    return times


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _stats(times: list[float], device: str) -> dict:
    import torch

    row = {"step_ms_median": round(statistics.median(times) * 1000, 3), "step_ms_min": round(min(times) * 1000, 3),
           "step_ms_max": round(max(times) * 1000, 3)}
    if device.startswith("cuda"):
        row["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return row


def _measure_mode(arch: str, size: int, mode: str, device: str, *, compiled: bool, repeats: int,
                  cache: str, emulated: bool = False) -> dict:
    """One precision mode: 1. build and quantize, 2. eager steps (after 2 warm-ups), 3. compile the blocks,
    time the first call (compilation) and then the steps. A mode this machine cannot run gets a note."""
    import torch

    from sd35 import precision
    from sd35.inference import compilation

    row: dict = {}
    model = build_transformer(arch)
    try:
        precision.apply(model, mode, device=device, emulated=emulated)
        model.to(device)
        inputs = _step_inputs(ARCHS[arch], size, device)
        _reset_peak(device)
        _time_steps(model, inputs, device, 2)  # warm-up
        row["eager"] = _stats(_time_steps(model, inputs, device, repeats), device)
        if compiled:
            plan = compilation.apply(model, compilation.CompilePlan("blocks", "benchmark", cache))
            _reset_peak(device)
            first = _time_steps(model, inputs, device, 1)[0]
            _time_steps(model, inputs, device, 2)
            row["compiled"] = {**_stats(_time_steps(model, inputs, device, repeats), device),
                               "first_call_s": round(first, 2), "mode": plan.mode}
    except Exception as exc:  # noqa: BLE001 - e.g. fp8 compute needs FP8 tensor cores
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        row = {"note": f"not run here: {type(exc).__name__}: {first_line[:160]}"}
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def speed(arch: str = "large", size: int = 1024, *, device: str | None = None, modes=("bf16", "fp8-weight", "fp8"),
          compiled: bool = True, repeats: int = 10, cache_dir: str | None = None, emulate: bool = False) -> dict:
    """Transformer step latency (and peak GPU memory) per precision mode, eager and compiled, in one run.

    Random weights of the published architecture. On a CPU the tiny model runs instead (and the report says
    so): those figures exercise the code path, they are not GPU numbers. `emulate` (SD35_FP8_EMULATE) runs
    the fp8 row on a CPU through torch's CPU float8 matmul, and the report says `"emulated": true`."""
    import tempfile

    import diffusers
    import torch
    import torchao

    device, arch, size, note = on_this_device(device, arch, size)
    cache = cache_dir or tempfile.mkdtemp(prefix="sd35-bench-compile-")
    emulated = emulates_fp8(device, emulate)
    rows = {mode: _measure_mode(arch, size, mode, device, compiled=compiled, repeats=repeats, cache=cache,
                                emulated=emulated and mode == "fp8") for mode in modes}
    base = rows.get("bf16", {})
    for row in rows.values():
        for kind in ("eager", "compiled"):
            ref = base.get(kind, {}).get("step_ms_median")
            if kind in row and ref:
                row[kind]["ratio_vs_bf16"] = round(row[kind]["step_ms_median"] / ref, 3)
    return {
        "arch": arch, "size": size, "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        "note": note, "repeats": repeats, "modes": rows, "compile_cache_dir": cache,
        "emulated": emulated and "fp8" in modes,
        "goal": {"fp8_compiled_vs_bf16_compiled_max": GOAL_FP8_COMPILED_RATIO},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchao": torchao.__version__},
    }


def compile_cache(settings, *, steps: int = 1) -> dict:
    """Two `sd35 generate --compile blocks` processes sharing a fresh compile cache: the second one's compile
    seconds against the first's (goal <= 0.4x), read from their sidecars."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="sd35-compile-cache-"))
    env = {**os.environ, "SD35_COMPILE_CACHE": str(work / "cache"), "SD35_MODEL": settings.model,
           "SD35_CACHE_DIR": str(settings.cache_dir), "SD35_PRECISION": settings.precision}
    runs = []
    for i in range(2):
        out = work / f"out{i}"
        r = subprocess.run([sys.executable, "-m", "sd35", "generate", "--compile", "blocks", "--steps", str(steps),
                            "--seed", "0", "--out", str(out)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"sd35 generate failed: {r.stderr[-1500:]}")
        record = json.loads(next(out.glob("*.json")).read_text())
        runs.append(record["compile"])
    cold, warm = runs[0]["seconds"], runs[1]["seconds"]
    return {"model": settings.model, "cold": runs[0], "warm": runs[1], "ratio": round(warm / cold, 3),
            "goal_ratio_max": 0.4}
