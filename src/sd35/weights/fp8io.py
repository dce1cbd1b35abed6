"""The FP8 format on disk: which torchao configs make it, and how a quantized component is written.

Why its own module: the store (`store.py`), the lean loader (`lean.py`) and `sd35 bench load` must agree
on one format, or a folder written by one is misread by another. The format is the serialization
diffusers 0.42 and transformers 5 already have for torchao tensors (verified with our pins): a
`Float8Tensor` weight is written to safetensors as `<module>._weight_qdata` (float8_e4m3fn) +
`<module>._weight_scale` (fp32, one per output row), with the tensor's type in the file's metadata, and
`from_pretrained` rebuilds it on the meta device and assigns it — no bf16 copy ever exists.

One storage format serves both FP8 modes: `fp8-weight` and `fp8` store identical per-row E4M3 weights and
differ only in whether activations are quantized at matmul time (`retarget.py`). So every component is
quantized with torchao's weight-only config, which runs on any device, the CPU included. The layer filter
is `precision.KEEP_BF16`, the one `precision.apply` uses, so a stored transformer is bit-for-bit the
on-the-fly one (tested).
"""

from __future__ import annotations

import json
from pathlib import Path

from sd35 import precision

QUANT_MODES = ("fp8-weight", "fp8")
POS_EMBED = "pos_embed.pos_embed"


def _modules_to_not_convert(keep: dict[str, str]) -> list[str] | None:
    """KEEP_BF16's fnmatch patterns as the module prefixes diffusers/transformers skip ("x.*" → "x")."""
    names = []
    for pattern in keep:
        name = pattern.removesuffix(".*")
        if any(c in name for c in "*?["):
            raise ValueError(f"KEEP_BF16 pattern {pattern!r} cannot be expressed as a module prefix")
        names.append(name)
    return names or None


def _weight_only():
    from torchao.quantization import Float8WeightOnlyConfig, PerRow

    return Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)


def transformer_config():
    """diffusers' TorchAoConfig for the MMDiT: FP8 per-row weights, KEEP_BF16 left alone."""
    from diffusers import TorchAoConfig

    return TorchAoConfig(_weight_only(), modules_to_not_convert=_modules_to_not_convert(precision.KEEP_BF16))


def t5_config():
    """transformers' TorchAoConfig for T5-XXL (every Linear; embeddings and norms are not Linear)."""
    from transformers import TorchAoConfig

    return TorchAoConfig(_weight_only(), modules_to_not_convert=_modules_to_not_convert(precision.T5_KEEP_BF16))


def computed_pos_embed(model, rows_per_chunk: int = 16):
    """The SD3 transformer's sin-cos position table as its constructor computes it (diffusers'
    `get_2d_sincos_pos_embed`, from the config alone), in bf16 as the checkpoints store it; None when the
    model has no max-size table. Computed a band of grid rows at a time (every entry depends on its own
    position only), so the float64 intermediates stay at tens of MB instead of several GB for Medium."""
    import torch
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    pe = getattr(model, "pos_embed", None)
    size = getattr(pe, "pos_embed_max_size", None) if pe is not None else None
    if not size:
        return None
    dim = pe.proj.out_channels
    # The grid exactly as get_2d_sincos_pos_embed builds it ([2, 1, H, W], w first).
    axis = torch.arange(size, dtype=torch.float32) / (size / pe.base_size) / pe.interpolation_scale
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=0).reshape(2, 1, size, size)
    table = torch.empty(size * size, dim, dtype=torch.bfloat16)
    for start in range(0, size, rows_per_chunk):
        band = grid[:, :, start:start + rows_per_chunk, :]
        table[start * size:(start + band.shape[2]) * size] = (
            get_2d_sincos_pos_embed_from_grid(dim, band, output_type="pt").float().to(torch.bfloat16))
    return table.unsqueeze(0)


def save_component(model, folder: Path, filename: str, quant_config, skip: frozenset = frozenset()) -> Path:
    """Write `model`'s weights as diffusers/transformers write a torchao-quantized model (flattened
    Float8Tensors + their type in the header) and record the quantization_config in its config.json,
    so `from_pretrained` reads the folder too. Tensors named in `skip` are left out."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for name, t in model.state_dict().items():  # tied weights (T5's embedding) once, as save_pretrained does
        if name in skip:
            continue
        key = (t.data_ptr() if not hasattr(t, "qdata") else t.qdata.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = t
    flat = flatten_tensor_state_dict(state)
    tensors, metadata = flat if isinstance(flat, tuple) else (flat, {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / filename),
              metadata={"format": "pt", **metadata})
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = quant_config.to_dict()
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    return folder / filename


def store_transformer(model, root: Path) -> str:
    """Write an FP8 transformer under `root/transformer` as the store keeps it. The sin-cos position table
    (0.45 GB for Medium) is a function of the config: it is left out and recomputed at load — only when the
    recomputation is bit-identical to the model's own table. Returns what the record says of it:
    "recomputed", "stored" or "none"."""
    import torch

    model.save_config(Path(root) / "transformer")
    table = computed_pos_embed(model)
    recompute = table is not None and torch.equal(model.pos_embed.pos_embed, table)
    save_component(model, Path(root) / "transformer", "diffusion_pytorch_model.safetensors", transformer_config(),
                   skip=frozenset({POS_EMBED}) if recompute else frozenset())
    return "recomputed" if recompute else ("stored" if table is not None else "none")

