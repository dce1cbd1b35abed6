"""Random LoRAs for the tiny model, written in each layout people download (imported by tests and notebooks).

One LoRA is defined at SAI's module level (a fused qkv has one down and one up), then written as:
- `kohya`: `lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- `comfyui`: `diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight` / … / `.alpha`;
- `diffusers`: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` / `.lora_B.weight` (q, k, v split
  from the fused up rows as the weights are), alpha in the header's `lora_adapter_metadata` (as
  diffusers' `save_lora_weights` writes it).
The three files are the same LoRA, so they must give the same image.
"""

from __future__ import annotations

import json
from pathlib import Path


def sai_lora(transformer, rank: int = 4, seed: int = 0, std: float = 0.05, *, width: int | None = None) -> dict:
    """{sai module: (down [r, in], up [out, r])} over every SAI linear the tiny transformer has."""
    import torch

    from sd35.weights.lora_files import ModelShape

    shape = ModelShape.of(transformer)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sai, targets in shape.sai_map().items():
        mods = [m for m, _ in targets if m in shape.linears]
        if not mods or len(mods) != len(targets):
            continue
        fan_in = width or shape.linears[mods[0]][0]
        fan_out = sum(shape.linears[m][1] for m in mods)
        out[sai] = (torch.randn(rank, fan_in, generator=g) * std, torch.randn(fan_out, rank, generator=g) * std)
    return out


def write(path: Path, lora: dict, layout: str, transformer, alpha: float | None = None, extra: dict | None = None):
    """Write `lora` (from sai_lora) to `path` in `layout`; alpha default rank/2 (so alpha/rank = 0.5 is tested)."""
    import torch
    from safetensors.torch import save_file

    from sd35.weights.lora_files import ModelShape, row_ranges

    rank = next(iter(lora.values()))[0].shape[0]
    alpha = rank / 2 if alpha is None else alpha
    tensors, meta = {}, {}
    if layout in ("kohya", "comfyui"):
        for sai, (down, up) in lora.items():
            stem = "lora_unet_" + sai.replace(".", "_") if layout == "kohya" else "diffusion_model." + sai
            tensors[f"{stem}.lora_down.weight"] = down.to(torch.bfloat16)
            tensors[f"{stem}.lora_up.weight"] = up.to(torch.bfloat16)
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    elif layout == "diffusers":
        smap = ModelShape.of(transformer).sai_map()
        for sai, (down, up) in lora.items():
            for module, pieces in smap[sai]:
                rows = torch.cat([up[a:b] for a, b in row_ranges(pieces, up.shape[0])])
                tensors[f"transformer.{module}.lora_A.weight"] = down.to(torch.bfloat16)
                tensors[f"transformer.{module}.lora_B.weight"] = rows.to(torch.bfloat16)
        # as diffusers' save_lora_weights writes it: PEFT's LoraConfig, keys prefixed by the component
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})
    else:
        raise ValueError(layout)
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return Path(path)
