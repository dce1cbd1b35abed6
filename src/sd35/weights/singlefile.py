"""The SD3.5 transformer from one safetensors file: SAI/ComfyUI checkpoints, plain or ComfyUI "FP8 scaled".

Why our own reader: the FP8 files people download for SD3.5 are ComfyUI's `*_fp8_scaled.safetensors`.
Their FP8 weights only mean something together with a scale per layer, and diffusers' `from_single_file`
drops those scales without a word: the image comes out wrong and nothing says why. Here every tensor
of the file is accounted for — used, or refused with the name of what was found — never ignored.

What is read (keys under `model.diffusion_model.`, or bare as in a diffusion-model-only file):
- plain: bf16/fp16/fp32 weights in SAI's MMDiT naming (`joint_blocks.N.x_block.attn.qkv.weight` …);
- ComfyUI's older FP8 layout: a `scaled_fp8` marker tensor (its dtype is the FP8 format), a
  `<layer>.scale_weight` per FP8 weight (weight = fp8 × scale_weight), optionally `<layer>.scale_input`;
- ComfyUI's current layout (QUANTIZATION.md): `<layer>.weight_scale` (and optionally `input_scale`), the
  layer's format in a `<layer>.comfy_quant` tensor (UTF-8 JSON as uint8) or in the `_quantization_metadata`
  JSON of the file header (`{"format_version": …, "layers": {layer: {"format": …}}}`).
Supported FP8 format: `float8_e4m3fn` with one scale per tensor. nvfp4, int8, mxfp8, block-wise scales,
e5m2, GGUF and other architectures (Flux, SDXL, SD1.x) are refused, naming what was found.

How the names become diffusers': diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers` maps
the keys and splits the fused q/k/v and the swapped AdaLN halves. It only moves tensors (chunk, cat), so
we run it twice: on the FP8 codes viewed as uint8 (bit-exact) and on each layer's scale expanded to the
weight's shape (no memory), and read off, for every diffusers weight, its codes and its scale — a fused
qkv's one scale lands on q, k and v alike.

In FP8 modes the codes are used as they are: a torchao `Float8Tensor` with the file's scale as every
row's scale is exactly the file's weight (no bf16 round trip, no requantization). KEEP_BF16 layers and
bf16 runs get `fp8 × scale` in bf16. `input_scale`/`scale_input` (static activation scales from
calibration) are not used: the `fp8` mode scales activations dynamically per row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sd35.errors import ModelError

log = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."
SUPPORTED = ("plain SAI/ComfyUI SD3.5 checkpoints (bf16/fp16/fp32), ComfyUI FP8 scaled files with per-tensor "
             "float8_e4m3fn scales (`scaled_fp8` + `scale_weight`, or `weight_scale` + `comfy_quant` / "
             "`_quantization_metadata`)")
_SCALE_KEYS = ("scale_weight", "weight_scale")
_INPUT_SCALE_KEYS = ("scale_input", "input_scale")
_BUNDLED = {"text_encoders.clip_l.": "clip_l", "text_encoders.clip_g.": "clip_g", "text_encoders.t5xxl.": "t5xxl",
            "first_stage_model.": "vae"}


@dataclass
class FileInfo:
    """What a single file holds, read from its header only (doctor, and the checks before loading)."""

    path: Path
    layout: str  # plain | comfy-scaled-fp8 (older) | comfy-quant (current)
    arch: str  # medium | large | tiny | sd3 (an SD3-shaped MMDiT we do not know by name)
    num_layers: int
    hidden: int
    dual_attention_layers: list[int]
    weight_dtypes: dict[str, int]  # dtype → tensors
    fp8_layers: int
    has_input_scales: bool
    bundled: list[str] = field(default_factory=list)
    bytes: int = 0

    def describe(self) -> str:
        quant = {"plain": "plain (no FP8 scales)",
                 "comfy-scaled-fp8": f"ComfyUI FP8 scaled (older layout: scaled_fp8 + scale_weight), "
                                     f"{self.fp8_layers} FP8 layers",
                 "comfy-quant": f"ComfyUI FP8 (weight_scale + comfy_quant metadata), {self.fp8_layers} FP8 layers"}
        return (f"SD3.5 {self.arch} transformer ({self.num_layers} blocks, width {self.hidden}), "
                f"{quant[self.layout]}; bundled: {', '.join(self.bundled) or 'nothing else'}; "
                f"{self.bytes / 1e9:.2f} GB")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _refuse(path: Path, found: str, fix: str | None = None) -> ModelError:
    return ModelError(f"{path}: {found}; SD35_TRANSFORMER / --transformer takes {SUPPORTED}.",
                      fix or "use an SD3.5 Medium or Large transformer file in one of these formats, or a "
                             "diffusers folder with --model.")


def _header(path: Path) -> tuple[dict, dict]:
    """(tensors {name: {dtype, shape, data_offsets}}, __metadata__) of a safetensors file, checked whole."""
    from sd35.weights.folder import is_lfs_pointer
    from sd35.weights.safetensors_header import read_header, truncated

    if not path.is_file():
        raise ModelError(f"transformer file {path} does not exist.", "check SD35_TRANSFORMER / --transformer.")
    if is_lfs_pointer(path) or (path.stat().st_size < 1024 and path.read_bytes().startswith(b"version https://git-lfs")):
        raise ModelError(f"{path} is a Git LFS pointer (a few bytes of text), not weights.",
                         "download the file itself (`git lfs pull`, or the file's download link).")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"GGUF":
        raise _refuse(path, "a GGUF file (llama.cpp/ComfyUI-GGUF quantization), not safetensors")
    if path.suffix not in (".safetensors", ".sft"):
        raise _refuse(path, f"a {path.suffix or 'suffix-less'} file, not .safetensors")
    why = truncated(path)
    if why:
        raise ModelError(f"{path} is not a whole safetensors file ({why}): truncated or not safetensors.",
                         "download it again (compare its size with the source's).")
    header = read_header(path)
    return header.tensors, header.metadata


def _diffusion_keys(header: dict) -> dict[str, dict]:
    """The MMDiT's tensors, prefix stripped ({} when the file holds none)."""
    prefixed = {k[len(PREFIX):]: v for k, v in header.items() if k.startswith(PREFIX)}
    if prefixed:
        return prefixed
    return {k: v for k, v in header.items() if not any(k.startswith(b) for b in _BUNDLED) and "." in k
            or k == "scaled_fp8"}


def _foreign(keys) -> str | None:
    ks = list(keys)
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks):
        return "a Flux transformer (double_blocks/single_blocks)"
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in ks):
        return "a UNet checkpoint (SDXL or SD 1.x: input_blocks/middle_block)"
    if not any(k.startswith("joint_blocks.") for k in ks):
        return "no SD3 MMDiT weights (no joint_blocks.*)"
    return None


def _layer_formats(diff: dict, meta: dict, path: Path, reader) -> dict[str, dict]:
    """{layer: {"format": …}} from `_quantization_metadata` and/or per-layer `comfy_quant` tensors."""
    formats: dict[str, dict] = {}
    raw = meta.get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
        except (ValueError, AttributeError):
            raise _refuse(path, "an unreadable _quantization_metadata header entry") from None
        for name, conf in layers.items():
            formats[name.removeprefix(PREFIX)] = conf
    for k in diff:
        if k.endswith(".comfy_quant"):
            layer = k[: -len(".comfy_quant")]
            if layer in formats:
                continue
            try:
                t = reader(k)
                formats[layer] = json.loads(bytes(t.flatten().tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise _refuse(path, f"an unreadable comfy_quant entry for {layer}") from None
    return formats


def inspect(path: Path) -> FileInfo:
    """Read the file's header and classify it; refuse anything we would load wrongly (ModelError)."""
    path = Path(path).expanduser()
    header, meta = _header(path)
    diff = _diffusion_keys(header)
    found = _foreign(diff)
    if found:
        raise _refuse(path, f"{found} was found")
    dtypes: dict[str, int] = {}
    for k, v in diff.items():
        if k.endswith(".weight"):
            dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
    # Formats we do not read, named.
    if any(k.endswith(".weight_scale_2") for k in diff):
        raise _refuse(path, "NVFP4 weights (weight_scale_2 double scaling) were found")
    if any(d in dtypes for d in ("I8", "U8")) and not any(k.endswith(".comfy_quant") for k in diff) \
            and "_quantization_metadata" not in meta:
        raise _refuse(path, "int8/uint8 weights without a quantization format were found")
    if "F8_E5M2" in dtypes:
        raise _refuse(path, "float8_e5m2 weights were found (only float8_e4m3fn is supported)")
    if "scaled_fp8" in diff and diff["scaled_fp8"]["dtype"] != "F8_E4M3":
        raise _refuse(path, f"a scaled_fp8 marker of dtype {diff['scaled_fp8']['dtype']} was found")

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        formats = _layer_formats(diff, meta, path, lambda k: f.get_tensor(PREFIX + k if PREFIX + k in header else k))
    bad = {c.get("format") for c in formats.values()} - {"float8_e4m3fn"}
    if bad:
        raise _refuse(path, f"quantization format(s) {', '.join(sorted(map(str, bad)))} were found")
    if any(c.get("group_size") or c.get("block_size") for c in formats.values()):
        raise _refuse(path, "block-wise FP8 scales were found (only one scale per tensor is supported)")
    fp8 = [k[: -len(".weight")] for k, v in diff.items() if k.endswith(".weight") and v["dtype"] == "F8_E4M3"]
    for layer in fp8:
        scale = next((diff[f"{layer}.{s}"] for s in _SCALE_KEYS if f"{layer}.{s}" in diff), None)
        if scale is None:
            raise _refuse(path, f"FP8 weight {layer}.weight has no scale (no scale_weight / weight_scale): an "
                          "unscaled FP8 cast", "use the file's scaled version (*_fp8_scaled) or a bf16 file.")
        if len(scale["shape"]) > 1 or (scale["shape"] and scale["shape"][0] != 1):
            raise _refuse(path, f"{layer} has a {scale['shape']} scale (only one scale per tensor is supported)")
    layout = "plain" if not fp8 else ("comfy-scaled-fp8" if "scaled_fp8" in diff or any(
        k.endswith(".scale_weight") for k in diff) else "comfy-quant")
    if not fp8 and any(k.endswith(_SCALE_KEYS) for k in diff):
        raise _refuse(path, "scales without FP8 weights were found")

    num_layers = max(int(k.split(".")[1]) for k in diff if k.startswith("joint_blocks.")) + 1
    hidden = diff["x_embedder.proj.weight"]["shape"][0] if "x_embedder.proj.weight" in diff else 0
    dual = sorted({int(k.split(".")[1]) for k in diff if ".x_block.attn2." in k})
    arch = _arch(num_layers, hidden, dual)
    bundled = sorted({name for prefix, name in _BUNDLED.items() if any(k.startswith(prefix) for k in header)})
    return FileInfo(path, layout, arch, num_layers, hidden, dual, dtypes, len(fp8),
                    any(k.endswith(_INPUT_SCALE_KEYS) for k in diff), bundled, path.stat().st_size)


def _arch(num_layers: int, hidden: int, dual: list[int]) -> str:
    from sd35.models import ARCHS

    for name, cfg in ARCHS.items():
        if (cfg["num_layers"] == num_layers and cfg["caption_projection_dim"] == hidden
                and list(cfg.get("dual_attention_layers") or []) == dual):
            return name
    return "sd3"


def check_matches(info: FileInfo, folder: Path) -> dict:
    """The --model folder's transformer config, if the file has its architecture; else refuse."""
    cfg_file = Path(folder) / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    want = (cfg.get("num_layers"), cfg.get("caption_projection_dim"), list(cfg.get("dual_attention_layers") or []))
    have = (info.num_layers, info.hidden, info.dual_attention_layers)
    if want != have:
        raise ModelError(
            f"{info.path} is an SD3.5 {info.arch} transformer ({info.num_layers} blocks, width {info.hidden}), but "
            f"--model {folder} has {want[0]} blocks, width {want[1]}: the encoders, VAE and config must come "
            "from a model of the same architecture.",
            f"pass the matching --model (e.g. {info.arch}) with this file, or the matching file for this model.")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_transformer(path: Path, folder: Path, mode: str):
    """The SD3 transformer of the file at `path`, built with `folder`'s transformer config, for `mode`:
    FP8 layers as torchao Float8Tensors (codes + scale, as stored) in FP8 modes, bf16 otherwise."""
    import fnmatch

    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors import safe_open

    from sd35 import precision

    info = inspect(path)
    config = check_matches(info, folder)
    header, _ = _header(Path(path).expanduser())
    key_of = {k[len(PREFIX):] if k.startswith(PREFIX) else k: k for k in header}
    diff = _diffusion_keys(header)

    # 1. Read the tensors: FP8 weights as uint8 codes, their scales apart, everything else as stored.
    tensors, scales = {}, {}
    with safe_open(Path(path).expanduser(), "pt") as f:
        for k, v in diff.items():
            if k == "scaled_fp8" or k.endswith((".comfy_quant",) + _INPUT_SCALE_KEYS):
                continue
            if k.endswith(_SCALE_KEYS):
                layer = k.rsplit(".", 1)[0]
                scales[layer] = float(f.get_tensor(key_of[k]).float().reshape(-1)[0])
                continue
            t = f.get_tensor(key_of[k])
            tensors[k] = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    fp8_keys = {f"{layer}.weight" for layer in scales}

    # 2. Key names and fused/swapped layouts by diffusers' converter: codes bit-exact, scales alongside.
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(tensors))
        marks = {k: (torch.tensor(scales[k[: -len(".weight")]]) if k in fp8_keys else torch.tensor(-1.0)
                     ).expand(t.shape) for k, t in tensors.items()}
        converted_scales = convert_sd3_transformer_checkpoint_to_diffusers(marks)
    except (KeyError, RuntimeError, IndexError) as exc:
        raise ModelError(f"{path}: the SD3 key layout is incomplete or inconsistent ({type(exc).__name__}: {exc}).",
                         "the file is damaged or not an SD3.5 transformer: download it again.") from None

    # 3. Tensors for this mode.
    keep = precision.KEEP_BF16
    state = {}
    for k, t in converted.items():
        mark = converted_scales[k]
        if mark.numel() and float(mark.reshape(-1)[0]) >= 0:
            if t.dim() != 2:  # SD3.5's FP8 layers are linears: anything else is no file we know how to read
                raise ModelError(f"{path}: {k} is stored as FP8 with shape {tuple(t.shape)}; FP8 weights here must "
                                 "be 2-D (linear layers).", "use a file whose FP8 layers are linears only "
                                 "(ComfyUI's fp8_scaled SD3.5), or the bf16 single file.")
            codes = t.contiguous().view(torch.float8_e4m3fn)
            row_scale = mark[:, :1].contiguous().float()
            module = k[: -len(".weight")]
            if mode in ("fp8-weight", "fp8") and t.dim() == 2 and not any(fnmatch.fnmatch(module, p) for p in keep):
                from torchao.quantization import Float8Tensor

                state[k] = Float8Tensor(codes, row_scale, block_size=[1, t.shape[1]], dtype=torch.bfloat16)
            else:
                state[k] = (codes.float() * row_scale.reshape(-1, *([1] * (t.dim() - 1)))).to(torch.bfloat16)
        else:
            state[k] = t.to(torch.bfloat16)

    # 4. The module on the meta device, then every tensor assigned (sizes and names checked).
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    try:
        result = model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"{path} does not fit the {info.arch} transformer config: "
                         f"{' '.join(first[:3])[:400]}",
                         "the file and --model must be the same SD3.5 model; or the file is damaged.") from None
    del result
    # Buffers not stored in the file (none in SD3 today) would still be on meta: refuse rather than run.
    left = [n for n, b in list(model.named_parameters()) + list(model.named_buffers()) if b.device.type == "meta"]
    if left:
        raise ModelError(f"{path} lacks {len(left)} tensor(s) of the transformer (e.g. {left[0]}).",
                         "download the file again, or use a complete SD3.5 checkpoint.")
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("transformer from %s: %s", path, info.describe())
    return model.eval(), info


def sai_module_map(num_layers: int, dual_attention_layers, qk_norm: bool) -> dict[str, list[tuple[str, list[int]]]]:
    """SAI module name → [(diffusers module name, row pieces)], read off diffusers' own converter.

    The same converter `load_transformer` runs, here on marker tensors instead of weights: every SAI
    weight is 6 rows numbered `6 × (its index) + row`, so where each row lands in the converted dict says
    which diffusers module takes which sixths of it — a fused qkv splits into q, k, v (2 sixths each), the
    final AdaLN's swapped halves come out as [3, 4, 5, 0, 1, 2]. LoRA files (lora_files.py) use this to
    split their `lora_up` rows exactly as the weights are split, with no second name map to keep in step."""
    import torch
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    parts, names = 6, []

    class Marks(dict):
        def _mark(self, key):
            names.append(key)
            return torch.arange(parts) + parts * (len(names) - 1)

        def pop(self, key, *default):
            return self._mark(key)

        def __getitem__(self, key):
            return self._mark(key)

    keys = (["context_embedder.weight"] + [f"joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(num_layers)]
            + [f"joint_blocks.{i}.x_block.attn2.qkv.weight" for i in dual_attention_layers]
            + (["joint_blocks.0.x_block.attn.ln_q.weight"] if qk_norm else []))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(Marks.fromkeys(keys))
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for key, t in converted.items():
        if not key.endswith(".weight") or t.dim() != 1:
            continue
        ids = t.tolist()
        source = names[ids[0] // parts].removesuffix(".weight")
        out.setdefault(source, []).append((key.removesuffix(".weight"), [i % parts for i in ids]))
    return out
