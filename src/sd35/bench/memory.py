"""`sd35 bench memory`: weight bytes of the real SD3.5 transformer architectures per precision mode.

Why the real architecture with random weights (`arch.build_transformer`): the bytes depend only on shapes
and on which layers a mode quantizes, and the same `precision.apply` verb the loader uses is what gets
measured. Buffers (SD3's fixed sin-cos position table) are reported separately from parameters: they are not
weights, no mode touches them.

For comparison we apply diffusers' default layerwise casting (`enable_layerwise_casting` with FP8 storage),
which skips every module whose name matches "pos_embed" or "norm" — and so all AdaLN modulation linears.
"""

from __future__ import annotations

import gc
import time

from sd35.bench.arch import build_transformer
from sd35.models import ARCHS

GOAL_FP8_WEIGHT_RATIO = 0.52
MODES = ("bf16", "fp8-weight", "fp8", "diffusers-layerwise-fp8")


def _measure(model) -> dict:
    from sd35.precision import linear_coverage, weight_bytes

    return {**weight_bytes(model), **linear_coverage(model)}


def _apply(model, mode: str) -> str:
    """Put `model` in `mode`; returns a note when this machine cannot (then nothing is measured for it)."""
    import torch

    from sd35 import precision

    if mode in ("fp8-weight", "fp8"):
        try:
            precision.apply(model, mode, device="cpu")
        except Exception as exc:  # noqa: BLE001 - fp8 quantization itself may need a GPU kernel
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"not quantizable here ({first[:90]}); stores weights as fp8-weight does"
    elif mode == "diffusers-layerwise-fp8":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return ""


def memory(arch: str) -> dict:
    """Weight bytes of `arch` in bf16, fp8-weight, fp8 and diffusers' layerwise FP8 casting."""
    import torch

    from sd35 import precision

    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    params = None
    for mode in MODES:
        model = build_transformer(arch)
        params = params or sum(p.numel() for p in model.parameters())
        note = _apply(model, mode)
        rows[mode] = _measure(model) if not note else {"note": note}
        del model
        gc.collect()

    base = rows["bf16"]["parameters"]
    for row in rows.values():
        if "parameters" in row:
            row["ratio_vs_bf16"] = round(row["parameters"] / base, 4)
    return {
        "arch": arch,
        "config": ARCHS[arch],
        "parameters": params,
        "modes": rows,
        "kept_bf16": precision.KEEP_BF16,
        "goal": {"fp8-weight_ratio_max": GOAL_FP8_WEIGHT_RATIO,
                 "met": rows["fp8-weight"].get("ratio_vs_bf16", 1.0) <= GOAL_FP8_WEIGHT_RATIO},
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }


def memory_table(report: dict):
    """The report as the rich table `sd35 bench memory` prints."""
    from rich.table import Table

    gb = 1e9
    table = Table(title=f"SD3.5 {report['arch']} transformer ({report['parameters'] / 1e9:.2f} B parameters): "
                        "weight bytes per precision mode")
    for col in ("mode", "weights GB", "× bf16", "buffers GB", "FP8 linear params", "bf16 linear params"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode, row in report["modes"].items():
        if "note" in row:
            table.add_row(mode, row["note"], "", "", "", "")
            continue
        table.add_row(mode, f"{row['parameters'] / gb:.3f}", f"{row['ratio_vs_bf16']:.3f}",
                      f"{row['buffers'] / gb:.3f}", f"{row['fp8_linear_params']:,}", f"{row['bf16_linear_params']:,}")
    goal = report["goal"]
    table.caption = (f"goal fp8-weight ≤ {goal['fp8-weight_ratio_max']} × bf16: {'met' if goal['met'] else 'NOT met'}"
                     f" · {report['seconds']} s · torch {report['torch']}")
    return table
