"""Build SAI/ComfyUI-style single files from a diffusers SD3 transformer, for the single-file tests.

Written from the published format descriptions (SAI's MMDiT key names; ComfyUI's QUANTIZATION.md for
`weight_scale` + `comfy_quant` / `_quantization_metadata`; the older `scaled_fp8` + `scale_weight`
layout), not from ComfyUI's code. FP8: one float32 scale per tensor, s = max|W| / 448, codes =
round-to-nearest E4M3 of W / s; a fused qkv gets one scale for q, k and v together.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PREFIX = "model.diffusion_model."


def _swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers stores AdaLN-continuous rows as (scale, shift); SAI as (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_sai(sd: dict[str, torch.Tensor], num_layers: int, dual: list[int]) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel state dict → SAI MMDiT names (fused qkv, swapped final AdaLN)."""
    out = {"pos_embed": sd["pos_embed.pos_embed"], "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
           "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "context_embedder.weight": sd["context_embedder.weight"], "context_embedder.bias": sd["context_embedder.bias"],
           "final_layer.linear.weight": sd["proj_out.weight"], "final_layer.linear.bias": sd["proj_out.bias"],
           "final_layer.adaLN_modulation.1.weight": _swap(sd["norm_out.linear.weight"]),
           "final_layer.adaLN_modulation.1.bias": _swap(sd["norm_out.linear.bias"])}
    for sai, dif in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, j in ((0, 1), (2, 2)):
            for p in ("weight", "bias"):
                out[f"{sai}.mlp.{i}.{p}"] = sd[f"time_text_embed.{dif}.linear_{j}.{p}"]
    for i in range(num_layers):
        b, last = f"transformer_blocks.{i}", i == num_layers - 1
        j = f"joint_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{j}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{j}.context_block.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{j}.x_block.attn.proj.{p}"] = sd[f"{b}.attn.to_out.0.{p}"]
            out[f"{j}.x_block.adaLN_modulation.1.{p}"] = sd[f"{b}.norm1.linear.{p}"]
            ctx = sd[f"{b}.norm1_context.linear.{p}"]
            out[f"{j}.context_block.adaLN_modulation.1.{p}"] = _swap(ctx) if last else ctx
            out[f"{j}.x_block.mlp.fc1.{p}"] = sd[f"{b}.ff.net.0.proj.{p}"]
            out[f"{j}.x_block.mlp.fc2.{p}"] = sd[f"{b}.ff.net.2.{p}"]
            if not last:
                out[f"{j}.context_block.attn.proj.{p}"] = sd[f"{b}.attn.to_add_out.{p}"]
                out[f"{j}.context_block.mlp.fc1.{p}"] = sd[f"{b}.ff_context.net.0.proj.{p}"]
                out[f"{j}.context_block.mlp.fc2.{p}"] = sd[f"{b}.ff_context.net.2.{p}"]
            if i in dual:
                out[f"{j}.x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{b}.attn2.to_{x}.{p}"] for x in "qkv"])
                out[f"{j}.x_block.attn2.proj.{p}"] = sd[f"{b}.attn2.to_out.0.{p}"]
        for blk, attn, pre in (("x_block", "attn", ""), ("context_block", "attn", "added_")):
            out[f"{j}.{blk}.{attn}.ln_q.weight"] = sd[f"{b}.attn.norm_{pre}q.weight"]
            out[f"{j}.{blk}.{attn}.ln_k.weight"] = sd[f"{b}.attn.norm_{pre}k.weight"]
        if i in dual:
            out[f"{j}.x_block.attn2.ln_q.weight"] = sd[f"{b}.attn2.norm_q.weight"]
            out[f"{j}.x_block.attn2.ln_k.weight"] = sd[f"{b}.attn2.norm_k.weight"]
    assert len(out) == len(sd) - _extra(sd, num_layers, dual), "unmapped tensors"
    return out


def _extra(sd, num_layers, dual) -> int:
    """Tensors that fuse: q,k,v (3 → 1) for attn, add_*_proj and attn2, weight and bias each."""
    return 2 * 2 * (2 * num_layers + len(dual))


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3: (codes, float32 scale of shape [])."""
    scale = (w.float().abs().max() / 448.0).clamp(min=1e-12)
    codes = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale.reshape(())


def dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (codes.float() * scale).to(torch.bfloat16)


def is_quantizable(key: str, t: torch.Tensor) -> bool:
    """The Linear weights an FP8 file quantizes (ComfyUI leaves embeddings/norms/convs alone)."""
    return key.endswith(".weight") and t.dim() == 2 and not key.startswith(("x_embedder", "pos_embed"))


def write(path: Path, sai: dict[str, torch.Tensor], layout: str, *, header_metadata: bool = False,
          extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Write `sai` as `layout` ("plain" | "scaled_fp8" | "comfy_quant"); return the SAI tensors as the
    file means them (dequantized), for building the reference folder."""
    from safetensors.torch import save_file

    tensors, meaning, layers = {}, {}, {}
    for k, t in sai.items():
        if layout != "plain" and is_quantizable(k, t):
            codes, scale = quantize_fp8(t)
            layer = k[: -len(".weight")]
            tensors[PREFIX + k] = codes
            if layout == "scaled_fp8":
                tensors[PREFIX + layer + ".scale_weight"] = scale
                tensors[PREFIX + layer + ".scale_input"] = torch.ones(())
            else:
                tensors[PREFIX + layer + ".weight_scale"] = scale
                conf = {"format": "float8_e4m3fn"}
                if header_metadata:
                    layers[PREFIX + layer] = conf
                else:
                    tensors[PREFIX + layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()),
                                                                            dtype=torch.uint8)
            meaning[k] = dequantized(codes, scale)
        else:
            tensors[PREFIX + k] = t.contiguous()
            meaning[k] = t
    if layout == "scaled_fp8":
        tensors[PREFIX + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    tensors.update(extra or {})
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return meaning


def from_sai(meaning: dict[str, torch.Tensor], num_layers: int, dual: list[int]) -> dict[str, torch.Tensor]:
    """SAI names back to diffusers' (the reference folder), independently of the code under test."""
    sd = {"pos_embed.pos_embed": meaning["pos_embed"], "pos_embed.proj.weight": meaning["x_embedder.proj.weight"],
          "pos_embed.proj.bias": meaning["x_embedder.proj.bias"],
          "context_embedder.weight": meaning["context_embedder.weight"],
          "context_embedder.bias": meaning["context_embedder.bias"],
          "proj_out.weight": meaning["final_layer.linear.weight"], "proj_out.bias": meaning["final_layer.linear.bias"],
          "norm_out.linear.weight": _swap(meaning["final_layer.adaLN_modulation.1.weight"]),
          "norm_out.linear.bias": _swap(meaning["final_layer.adaLN_modulation.1.bias"])}
    for sai, dif in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, j in ((0, 1), (2, 2)):
            for p in ("weight", "bias"):
                sd[f"time_text_embed.{dif}.linear_{j}.{p}"] = meaning[f"{sai}.mlp.{i}.{p}"]
    for i in range(num_layers):
        b, j, last = f"transformer_blocks.{i}", f"joint_blocks.{i}", i == num_layers - 1
        for p in ("weight", "bias"):
            for x, t in zip("qkv", meaning[f"{j}.x_block.attn.qkv.{p}"].chunk(3)):
                sd[f"{b}.attn.to_{x}.{p}"] = t
            for x, t in zip("qkv", meaning[f"{j}.context_block.attn.qkv.{p}"].chunk(3)):
                sd[f"{b}.attn.add_{x}_proj.{p}"] = t
            sd[f"{b}.attn.to_out.0.{p}"] = meaning[f"{j}.x_block.attn.proj.{p}"]
            sd[f"{b}.norm1.linear.{p}"] = meaning[f"{j}.x_block.adaLN_modulation.1.{p}"]
            ctx = meaning[f"{j}.context_block.adaLN_modulation.1.{p}"]
            sd[f"{b}.norm1_context.linear.{p}"] = _swap(ctx) if last else ctx
            sd[f"{b}.ff.net.0.proj.{p}"] = meaning[f"{j}.x_block.mlp.fc1.{p}"]
            sd[f"{b}.ff.net.2.{p}"] = meaning[f"{j}.x_block.mlp.fc2.{p}"]
            if not last:
                sd[f"{b}.attn.to_add_out.{p}"] = meaning[f"{j}.context_block.attn.proj.{p}"]
                sd[f"{b}.ff_context.net.0.proj.{p}"] = meaning[f"{j}.context_block.mlp.fc1.{p}"]
                sd[f"{b}.ff_context.net.2.{p}"] = meaning[f"{j}.context_block.mlp.fc2.{p}"]
            if i in dual:
                for x, t in zip("qkv", meaning[f"{j}.x_block.attn2.qkv.{p}"].chunk(3)):
                    sd[f"{b}.attn2.to_{x}.{p}"] = t
                sd[f"{b}.attn2.to_out.0.{p}"] = meaning[f"{j}.x_block.attn2.proj.{p}"]
        for blk, pre in (("x_block", ""), ("context_block", "added_")):
            sd[f"{b}.attn.norm_{pre}q.weight"] = meaning[f"{j}.{blk}.attn.ln_q.weight"]
            sd[f"{b}.attn.norm_{pre}k.weight"] = meaning[f"{j}.{blk}.attn.ln_k.weight"]
        if i in dual:
            sd[f"{b}.attn2.norm_q.weight"] = meaning[f"{j}.x_block.attn2.ln_q.weight"]
            sd[f"{b}.attn2.norm_k.weight"] = meaning[f"{j}.x_block.attn2.ln_k.weight"]
    return sd
