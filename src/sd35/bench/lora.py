"""`sd35 bench lora`: what an unfused LoRA costs per denoising step (rank 16 and 64 against none), per
precision, eager and compiled, and whether swapping LoRAs on the compiled model recompiles.

Why measure it: the unfused side path (weights/lora.py) adds two skinny matmuls next to every targeted
linear, in bf16 even when the linear is FP8, and hot-swap slots are sized by SD35_LORA_MAX_RANK rather
than by the LoRA — so the slot rank, not the LoRA's, sets the cost. This says what a team pays for
switchable LoRAs, and when `--lora-fuse` is worth its inflexibility.

The LoRA is random and targets every linear an SD3.5 LoRA can (all of them: the worst case); values do
not change the cost. On a CPU the tiny model runs at 128² (the report says so): those figures exercise the
code path, GPU figures come from running the same command on a GPU.
"""

from __future__ import annotations

import gc
import statistics
import time

from sd35.bench.arch import build_transformer, emulates_fp8, on_this_device
from sd35.bench.speed import _step_inputs, _time_steps
from sd35.models import ARCHS


def _slots(model, rank: int, seed: int):
    """Rank-`rank` slots on every LoRA-targetable linear, filled with random values (an active LoRA)."""
    from sd35.weights import lora
    from sd35.weights.lora_files import ModelShape

    shape = ModelShape.of(model)
    targets = {m for mods in shape.sai_map().values() for m, _ in mods if m in shape.linears}
    ad = lora.Adapters(model, shape, folder=None, max_rank=rank, hotswap=True, allow_partial=False)
    ad.install(targets, rank)
    _fill(ad, seed)
    return ad


def _fill(ad, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in ad.slots.values():
            for name in ("sd35_lora_down", "sd35_lora_up"):
                buf = getattr(mod, name)
                buf.copy_((torch.randn(buf.shape, generator=g) * 0.01).to(buf.dtype))


def _one(arch: str, mode: str, rank: int, size: int, device: str, repeats: int, compiled: bool, cache: str,
         emulated: bool = False) -> dict:
    """One (mode, rank) row: eager and (optionally) compiled step times; recompiles when swapping."""
    import torch

    from sd35 import precision
    from sd35.inference import compilation

    model = build_transformer(arch)
    try:
        precision.apply(model, mode, device=device, emulated=emulated)
        model.to(device)
        ad = _slots(model, rank, seed=1) if rank else None
        inputs = _step_inputs(ARCHS[arch], size, device)
        _time_steps(model, inputs, device, 2)
        eager = _time_steps(model, inputs, device, repeats)
        row = {"eager_ms": round(statistics.median(eager) * 1000, 3), "eager_min_ms": round(min(eager) * 1000, 3)}
        if compiled:
            from torch._dynamo.utils import counters

            compilation.apply(model, compilation.CompilePlan("blocks", "benchmark", cache))
            t = time.perf_counter()
            _time_steps(model, inputs, device, 2)
            row["first_calls_s"] = round(time.perf_counter() - t, 2)
            comp = _time_steps(model, inputs, device, repeats)
            row["compiled_ms"] = round(statistics.median(comp) * 1000, 3)
            row["compiled_min_ms"] = round(min(comp) * 1000, 3)
            if ad is not None:  # two swaps: new LoRA values in the same slots
                before = counters["stats"]["unique_graphs"]
                for seed in (2, 3):
                    _fill(ad, seed)
                    _time_steps(model, inputs, device, 1)
                row["recompiles_on_swap"] = int(counters["stats"]["unique_graphs"] - before)
        return row
    except Exception as exc:  # noqa: BLE001 - e.g. fp8 compute needs FP8 tensor cores
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"note": f"not run here: {type(exc).__name__}: {first[:160]}"}
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def run(arch: str = "large", size: int = 1024, *, modes=("bf16", "fp8-weight", "fp8"), ranks=(0, 16, 64),
        compiled: bool = True, repeats: int = 10, device: str | None = None, emulate: bool = False) -> dict:
    """Step latency per (mode, rank), median and minimum, with the overhead against rank 0 (no LoRA) of the
    same mode (from the minimums: a shared machine's load moves the medians more than the LoRA does).
    `emulate` (SD35_FP8_EMULATE): the fp8 rows run on a CPU, emulated, and the report says so."""
    import tempfile

    import diffusers
    import torch
    import torchao

    device, arch, size, note = on_this_device(device, arch, size)
    cache = tempfile.mkdtemp(prefix="sd35-bench-lora-")
    emulated = emulates_fp8(device, emulate)
    rows: dict[str, dict] = {}
    for mode in modes:
        rows[mode] = {str(r): _one(arch, mode, r, size, device, repeats, compiled, cache, emulated and mode == "fp8")
                      for r in ranks}
        base = rows[mode].get("0", {})
        for r, row in rows[mode].items():
            for kind in ("eager", "compiled"):  # on the minimum: steadier than the median on a shared machine
                if r != "0" and f"{kind}_min_ms" in row and base.get(f"{kind}_min_ms"):
                    row[f"{kind}_overhead"] = round(row[f"{kind}_min_ms"] / base[f"{kind}_min_ms"] - 1, 3)
    return {"arch": arch, "size": size, "device": device,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
            "note": note, "repeats": repeats, "ranks": list(ranks), "modes": rows,
            "emulated": emulated and "fp8" in modes,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "torchao": torchao.__version__}}
