"""Weight bytes of a whole pipeline from configs alone: no download, no allocation.

Why: `sd35 doctor` must say whether SD3.5 Large in fp8 fits on this GPU *before* anyone downloads
25 GB. Each component is instantiated on the meta device from its config (the published ones below,
or the folder's own config.json when the model is local or cached) and its bytes are counted with the
same layer filter `precision.apply` uses, so the estimate and the real load agree (a test checks it
on the tiny model).
"""

from __future__ import annotations

import json
from pathlib import Path

from sd35 import precision

from sd35.models import CLIP_G, CLIP_L, T5_XXL, VAE  # the published component configs (models.py)

# Room for activations, the CUDA context and the allocator's slack at 1024x1024, batch 1. An estimate:
# measured peaks go in docs/benchmarks.md.
ACTIVATION_HEADROOM_BYTES = 4 << 30

# Live transformer activations per token and hidden unit of one image (CFG doubles the batch): residual
# streams, the 4x MLP, Q/K/V and the attention output of a block in bf16, with slack. A heuristic for the
# fits check; measured peaks go in docs/benchmarks.md (`sd35 bench speed` on a GPU).
LIVE_TENSORS_PER_TOKEN = 20


def batch_activation_bytes(transformer_config: dict, height: int, width: int, n: int) -> int:
    """Estimated extra GPU bytes for `n` images beyond the first (whose room is in the headroom above)."""
    if n <= 1:
        return 0
    patch = int(transformer_config.get("patch_size", 2))
    hidden = int(transformer_config.get("num_attention_heads", 24)) * int(transformer_config.get("attention_head_dim", 64))
    tokens = (height // (8 * patch)) * (width // (8 * patch)) + 333  # image patches + CLIP 77 + T5 256
    per_image = tokens * hidden * 2 * LIVE_TENSORS_PER_TOKEN * 2  # bf16, CFG pair
    return (n - 1) * per_image


def _meta(build):
    import torch

    with torch.device("meta"):
        return build()


def _read_config(folder: Path | None, name: str, fallback: dict) -> dict:
    if folder is not None:
        for fname in ("config.json",):
            f = folder / name / fname
            if f.is_file():
                return {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}
    return fallback


def component_bytes(module, mode: str, keep: dict[str, str]) -> int:
    """Bytes `module` will hold after `precision.apply(mode)`, counted on a meta module."""
    import fnmatch

    from torch import nn

    total, seen = 0, set()
    for name, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (T5's shared embedding) count once
                continue
            seen.add(id(p))
            quantized = (mode in ("fp8-weight", "fp8") and isinstance(m, nn.Linear) and pname == "weight"
                         and not any(fnmatch.fnmatch(name, pat) for pat in keep))
            if quantized:
                total += p.numel() * 1 + p.shape[0] * 4  # FP8 E4M3 + one fp32 scale per output row
            else:
                total += p.numel() * 2  # bf16
        for b in m.buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * (2 if b.is_floating_point() else b.element_size())
    return total


def pipeline_bytes(transformer_config: dict, plan: precision.PrecisionPlan, folder: Path | None = None) -> dict:
    """Estimated weight bytes per component for `plan`, from configs only."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tcfg = _read_config(folder, "transformer", transformer_config)
    out = {
        "transformer": component_bytes(_meta(lambda: SD3Transformer2DModel.from_config(tcfg)), plan.transformer,
                                       precision.KEEP_BF16),
        "text_encoder": component_bytes(_meta(lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**_read_config(folder, "text_encoder", CLIP_L)))), "bf16", {}),
        "text_encoder_2": component_bytes(_meta(lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**_read_config(folder, "text_encoder_2", CLIP_G)))), "bf16", {}),
        "vae": component_bytes(_meta(lambda: AutoencoderKL.from_config(_read_config(folder, "vae", VAE))),
                               "bf16", {}),
    }
    if plan.t5 == "off":
        out["text_encoder_3"] = 0
    else:
        t5 = _meta(lambda: T5EncoderModel(T5Config(**_read_config(folder, "text_encoder_3", T5_XXL))))
        out["text_encoder_3"] = component_bytes(t5, plan.t5, precision.T5_KEEP_BF16)
    out["total"] = sum(out.values())
    return out
