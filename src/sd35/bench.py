"""Benchmarks. `memory`: weight bytes of the real SD3.5 transformer architectures per precision mode.

Why build the real architecture with random weights: weight bytes depend only on shapes and on which
layers a mode quantizes, not on the values, so the published configs (below, copied from the
`transformer/config.json` of each Hub repo) give the exact figures without a 16 GB download — and the
same `precision.apply` verb the loader uses is what gets measured. Buffers (SD3's fixed sin-cos
position table) are reported separately from parameters: they are not weights, no mode touches them.

For comparison we apply diffusers' default layerwise casting (`enable_layerwise_casting` with FP8
storage), which skips every module whose name matches "pos_embed" or "norm" — and so all AdaLN
modulation linears.
"""

from __future__ import annotations

import gc
import time

# transformer/config.json of the published checkpoints (Large Turbo shares Large's architecture).
ARCHS: dict[str, dict] = {
    "medium": {  # stabilityai/stable-diffusion-3.5-medium
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "qk_norm": "rms_norm", "dual_attention_layers": list(range(13)),
    },
    "large": {  # stabilityai/stable-diffusion-3.5-large (and -large-turbo)
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
        "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
        "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
        "qk_norm": "rms_norm", "dual_attention_layers": [],
    },
}

def _tiny_arch() -> dict:
    from .tiny import TINY_SPEC

    return dict(TINY_SPEC["transformer"])


ARCHS["tiny"] = _tiny_arch()  # the embedded test model: same code path, seconds instead of minutes
GOAL_FP8_WEIGHT_RATIO = 0.52


def build_transformer(arch: str, seed: int = 0):
    """The published architecture in bf16 on the CPU, random weights (allocated once, no fp32 detour)."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(ARCHS[arch])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            b.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def _measure(model) -> dict:
    from .precision import linear_coverage, weight_bytes

    return {**weight_bytes(model), **linear_coverage(model)}


def memory(arch: str) -> dict:
    """Weight bytes of `arch` in bf16, fp8-weight, fp8 and diffusers' layerwise FP8 casting."""
    import torch

    from . import precision

    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    params = None
    for mode in ("bf16", "fp8-weight", "fp8", "diffusers-layerwise-fp8"):
        model = build_transformer(arch)
        params = params or sum(p.numel() for p in model.parameters())
        note = ""
        if mode in ("fp8-weight", "fp8"):
            try:
                precision.apply(model, mode, device="cpu")
            except Exception as exc:  # noqa: BLE001 - fp8 quantization itself may need a GPU kernel
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                note = f"not quantizable here ({first[:90]}); stores weights as fp8-weight does"
        elif mode == "diffusers-layerwise-fp8":
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
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
