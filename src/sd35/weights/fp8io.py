"""The FP8 format on disk: which torchao configs make it, how a quantized component is written, and how a
pre-quantized transformer is read back.

Why its own module: the store (`store.py`), the loader (`load.py`) and `sd35 bench load` must agree on one
format, or a folder written by one is misread by another. The format is the serialization diffusers 0.42
and transformers 5 already have for torchao tensors (verified with our pins): a `Float8Tensor` weight is
written to safetensors as `<module>._weight_qdata` (float8_e4m3fn) + `<module>._weight_scale` (fp32, one
per output row), with the tensor's type in the file's metadata, and the models' config.json carries the
`quantization_config`. So a stock `from_pretrained` loads a stored folder too, and gives our image bit
for bit (tested). Reading it back is torchao's job (`unflatten_tensor_state_dict`): the tensor types come
from JSON metadata through torchao's allow-list of classes, never from a pickle.

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
    model has no max-size table. `sd35 bench load` gives its random-weight transformers this real table. Computed a band of grid rows at a time (every entry depends on its own
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


def store_transformer(model, root: Path) -> Path:
    """Write an FP8 transformer under `root/transformer` as diffusers writes a torchao-quantized model
    (flattened Float8Tensors + their type in the header, `quantization_config` in config.json), so stock
    `SD3Transformer2DModel.from_pretrained` reads it too. Every tensor is written, the sin-cos position
    table included (0.45 GB for Medium): left out, a stock load recomputes it in float32 where the source
    held bf16 and its images differ (issue #30). diffusers' own `save_pretrained` needs a model it loaded
    through its quantizer; ours were quantized as read, so the few lines of its writer are here."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    folder = Path(root) / "transformer"
    model.save_config(folder)
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt", **metadata})
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = transformer_config().to_dict()
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def store_t5(encoder, root: Path) -> Path:
    """Write T5 (loaded by `lean.load_t5(quantize=True)`, i.e. through transformers' torchao quantizer) with
    transformers' own torchao serialization, safetensors only."""
    folder = Path(root) / "text_encoder_3"
    encoder.save_pretrained(folder, safe_serialization=True)
    return folder


def _mapped(path: Path) -> dict:
    """Every tensor of a safetensors file as a view of one private (copy-on-write) memory map of it.

    Why mapped, not read: the bytes are used as stored (FP8 data, scales, the bf16 layers), so a copy buys
    nothing; a mapped page is counted once, where safetensors' `load_file` maps the file *and* copies
    each tensor out of the map, two images of the component until the map closes. The store is written
    by one rename and never rewritten in place, so the mapping cannot see a file truncated under it."""
    import torch

    from sd35.weights.safetensors_header import read_header, torch_dtype

    header = read_header(path)
    whole = torch.empty(0, dtype=torch.uint8).set_(
        torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size))
    out = {}
    for name, info in header.tensors.items():
        start, end = (header.data_start + o for o in info["data_offsets"])
        dtype = torch_dtype(info["dtype"])
        raw = whole[start:end]
        if start % dtype.itemsize:  # safetensors aligns by dtype; a foreign file may not: copy that one
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out, header.metadata


def load_transformer(folder: Path):
    """A pre-quantized SD3 transformer (`folder/transformer`, as `store_transformer` wrote it), FP8 as stored.

    1. Build the model on the meta device from its config: nothing allocated, no position table computed
       (what makes stock `from_pretrained` peak high on Medium: a float64 table in `__init__`).
    2. Map each file (`_mapped`) and rebuild torchao's tensors with torchao's own deserializer
       (`unflatten_tensor_state_dict`: JSON metadata and an allow-list of classes, no pickle).
    3. Assign them (`load_state_dict(assign=True)`: the mapped bytes become the weights, no copy), then
       check that nothing is left on meta.
    """
    import torch
    from diffusers import SD3Transformer2DModel
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from sd35.errors import ModelError

    # 1. The model on meta.
    sub = Path(folder) / "transformer"
    config = {k: v for k, v in json.loads((sub / "config.json").read_text()).items()
              if not k.startswith("_") and k != "quantization_config"}
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    # 2-3. The tensors, as stored.
    files = sorted(sub.glob("*.safetensors"))
    for f in files:
        tensors, metadata = _mapped(f)
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
        if leftover:
            raise ModelError(f"{f} holds tensors torchao cannot place ({next(iter(leftover))}).",
                             "re-create the folder with `sd35 cache quantize`.")
        model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if not files or left:
        raise ModelError(f"{sub} lacks {len(left) or 'all'} tensor(s) of its model{f' (e.g. {left[0]})' if left else ''}.",
                         "re-create the folder with `sd35 cache quantize` (`sd35 cache verify` checks it).")
    model.register_to_config(_name_or_path=str(sub))
    return model.eval()
