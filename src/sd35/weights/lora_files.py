"""LoRA files for the SD3.5 transformer: the three layouts people download, read into one form, checked.

Why our own reader: diffusers 0.42's SD3 loader reads the diffusers/PEFT layout only, needs `peft` (not
in constraints.txt) and fails on torchao-quantized linears (diffusers #10621); the SAI/kohya and ComfyUI
files most SD3.5 LoRAs come as are not converted at all. A file that does not fit must never load
"partly" without a word: every key is used, or refused with its name and the shape the model expects.

Layouts (all in .safetensors):
- diffusers/PEFT: `transformer.transformer_blocks.3.attn.to_q.lora_A.weight` / `.lora_B.weight` (also the
  older `.lora.down/.lora.up`, and PEFT's `base_model.model.` prefix); alpha from `.alpha` tensors or the
  header's `lora_adapter_metadata` (`lora_alpha`), else alpha = rank;
- SAI/kohya: `lora_unet_joint_blocks_3_x_block_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  SAI's module names with `_` for `.` (`lora_transformer_…`: diffusers' names, kohya-mangled);
- ComfyUI: `diffusion_model.joint_blocks.3.x_block.attn.qkv.lora_down.weight` (SAI's dotted names).
SAI names become diffusers names through the single-file reader's map (`singlefile.sai_module_map`, read
off diffusers' converter): a fused `qkv`'s `lora_up` rows split into q, k and v exactly as the weights do;
`lora_down` is shared by the three. Text-encoder keys (`lora_te1_`/`lora_te2_`/`lora_te3_`,
`text_encoder*.`, `text_encoders.`) are not applied: refused by name, or skipped with allow_partial.

A read gives `LoraFile`: per diffusers module `down` [r, in], `up` [out, r] and `alpha / r`, plus what the
file held (layers, rank, sha256) for logs, sidecars and GET /v1/loras. `plan` checks names and shapes
from the header alone (the service lists and checks a folder without loading every file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sd35.errors import InputError

log = logging.getLogger(__name__)

_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
          (".lora.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
_TEXT = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "text_encoder.", "text_encoder_2.", "text_encoder_3.",
         "text_encoders.", "te1.", "te2.", "te3.")
_FOREIGN = {"double_blocks": "Flux (double_blocks)", "single_blocks": "Flux (single_blocks)",
            "single_transformer_blocks": "Flux (single_transformer_blocks)",
            "input_blocks": "a UNet (SDXL / SD 1.x: input_blocks)",
            "down_blocks": "a UNet (SDXL / SD 1.x: down_blocks)",
            "output_blocks": "a UNet (SDXL / SD 1.x: output_blocks)", "mid_block": "a UNet (SDXL / SD 1.x: mid_block)"}
_UNSUPPORTED = {"dora_scale": "DoRA (dora_scale)", "lora_mid": "LoCon/LyCORIS (lora_mid)", "hada_": "LoHa (hada_)",
                "lokr_": "LoKr (lokr_)", ".diff": "a full weight difference (.diff)"}
PARTIAL_FIX = "pass --lora-allow-partial (SD35_LORA_ALLOW_PARTIAL=1) to apply the layers that fit and skip the rest"


class LoraError(InputError):
    """A LoRA file that does not fit the loaded model (exit 2, HTTP 400 with param `lora`)."""

    def __init__(self, cause: str, fix: str | None = None):
        super().__init__(cause, fix, param="lora")


@dataclass(frozen=True)
class ModelShape:
    """What a LoRA is checked against: the transformer's linears and its SAI name map."""

    arch: str
    linears: dict  # diffusers module → (in_features, out_features)
    num_layers: int
    dual_attention_layers: tuple
    qk_norm: bool

    @classmethod
    def of(cls, transformer) -> ModelShape:
        import torch

        from sd35.weights.singlefile import _arch

        cfg = transformer.config
        arch = _arch(cfg.num_layers, cfg.caption_projection_dim, list(cfg.dual_attention_layers or ()))
        lin = {n: (m.in_features, m.out_features) for n, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
        return cls(arch, lin, cfg.num_layers, tuple(cfg.dual_attention_layers or ()), bool(cfg.qk_norm))

    def sai_map(self) -> dict:
        return _sai_map(self.num_layers, self.dual_attention_layers, self.qk_norm)


@lru_cache(maxsize=8)
def _sai_map(num_layers: int, dual: tuple, qk_norm: bool) -> dict:
    from sd35.weights.singlefile import sai_module_map

    return sai_module_map(num_layers, list(dual), qk_norm)


@dataclass
class Target:
    """One diffusers linear a file's module feeds: where its down/up/alpha are, and which sixths of up."""

    module: str
    down: str
    up: str
    alpha: str | None
    pieces: list[int] | None  # None: all rows; else sixths of `up` (SAI fused/swapped layers)
    rank: int


@dataclass
class LoraFile:
    path: Path
    name: str
    layout: str  # diffusers | kohya | comfyui
    rank: int
    file_layers: int  # LoRA modules in the file (a fused qkv counts once)
    applied_layers: int  # of those, applied (all unless allow_partial skipped some)
    targets: list[Target]
    skipped: list[str] = field(default_factory=list)  # keys skipped (allow_partial), for the record
    alphas: dict = field(default_factory=dict)  # alpha from the header metadata: {"default", "pattern"}

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def describe(self) -> str:
        return (f"LoRA {self.name} ({self.layout}, rank {self.rank}): applied to {self.applied_layers} layers "
                f"({self.file_layers} in the file) → {len(self.targets)} linears"
                + (f"; skipped {len(self.skipped)} keys, first {self.skipped[0]}" if self.skipped else ""))


def sha256(path: Path) -> str:
    """The file's sha256, cached by (path, size, mtime): a folder is listed often, files change rarely."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def header(path: Path) -> tuple[dict[str, list[int]], dict]:
    """{key: shape} and the metadata of a safetensors LoRA file, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist.", "check the path, or the name in SD35_LORA_DIR "
                        "(GET /v1/loras lists them).")
    if path.suffix not in (".safetensors", ".sft"):
        raise LoraError(f"LoRA {path} is a {path.suffix or 'suffix-less'} file, not .safetensors.",
                        "use the .safetensors version of the LoRA (pickled .ckpt/.pt files are not read).")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file gets its cause
        raise LoraError(f"LoRA {path} is not a readable safetensors file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}).", "download it again.") from None


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _layout_and_stem(stem: str) -> tuple[str, str]:
    """(layout, module name in its own naming) of a key stem; layout "text" for text encoders."""
    if stem.startswith(_TEXT):
        return "text", stem
    for prefix, layout in (("transformer.", "diffusers"), ("base_model.model.", "diffusers"),
                           ("lora_unet_", "kohya"), ("lora_transformer_", "kohya-diffusers"),
                           ("model.diffusion_model.", "comfyui"), ("diffusion_model.", "comfyui")):
        if stem.startswith(prefix):
            return layout, stem[len(prefix):]
    return "unknown", stem


def _metadata_alpha(meta: dict) -> dict:
    """Alpha from diffusers' `lora_adapter_metadata` header entry (PEFT's LoraConfig as JSON; a pipeline's
    save prefixes its keys with `transformer.`): {"default": lora_alpha, "pattern": alpha_pattern}."""
    raw = meta.get("lora_adapter_metadata")
    try:
        conf = json.loads(raw) if raw else {}
    except ValueError:
        raise LoraError("the LoRA's lora_adapter_metadata header entry is not JSON.", "download it again.") from None
    conf = {k.removeprefix("transformer."): v for k, v in conf.items()} if isinstance(conf, dict) else {}
    default = conf.get("lora_alpha")
    return {"default": float(default) if isinstance(default, (int, float)) else None,
            "pattern": {k: float(v) for k, v in (conf.get("alpha_pattern") or {}).items()}}


def _refuse_foreign(path: Path, keys: list[str], shape: ModelShape) -> None:
    for key in keys:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise LoraError(f"LoRA {path.name}: key {key} is {what}, which is not read here.",
                                "use a plain LoRA (lora_A/lora_B or lora_down/lora_up) for SD3.5.")
        for marker, what in _FOREIGN.items():
            if marker in key:
                raise LoraError(f"LoRA {path.name} is for another architecture: key {key} belongs to {what}; the "
                                f"loaded model is an SD3.5 {shape.arch} MMDiT (transformer_blocks / joint_blocks).",
                                "use a LoRA trained for this SD3.5 model.")


def _module_names(layout: str, name: str, shape: ModelShape, kohya: dict) -> list[tuple[str, list[int] | None]]:
    """The diffusers modules (and sixths of `up`) one file module feeds; [] when the model has none."""
    if layout == "diffusers":
        return [(name, None)] if name in shape.linears else []
    if layout == "kohya-diffusers":
        target = kohya.get(("d", name))
        return [(target, None)] if target else []
    if layout == "kohya":
        name = kohya.get(("s", name), name)
    return [(m, p if p != list(range(6)) else None) for m, p in shape.sai_map().get(name, [])]


def plan(path: Path, shape: ModelShape, *, allow_partial: bool = False, max_rank: int | None = None,
         name: str | None = None) -> LoraFile:
    """Check a LoRA file against `shape` from its header: names, shapes, rank; LoraError on the first bad key
    (allow_partial: text-encoder and unknown keys skipped and listed instead)."""
    path = Path(path)
    shapes, meta = header(path)
    _refuse_foreign(path, list(shapes), shape)
    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        parts = _split(key)
        if parts is None:
            raise LoraError(f"LoRA {path.name}: unknown key {key} (not lora_A/lora_B, lora_down/lora_up or alpha).",
                            "use a plain LoRA file for SD3.5; " + PARTIAL_FIX + ".")
        groups.setdefault(parts[0], {})[parts[1]] = key
    kohya = {("s", s.replace(".", "_")): s for s in shape.sai_map()}
    kohya.update({("d", d.replace(".", "_")): d for d in shape.linears})
    layouts, targets, skipped, used, max_seen = set(), [], [], 0, 0
    for stem, roles in groups.items():
        layout, mod = _layout_and_stem(stem)
        first = next(iter(roles.values()))
        if layout == "text":
            if not allow_partial:
                raise LoraError(f"LoRA {path.name}: key {first} is a text-encoder (CLIP/T5) LoRA key; only the "
                                "transformer's LoRA layers are applied here.", PARTIAL_FIX[0].upper() + PARTIAL_FIX[1:]
                                + " (the text-encoder part is then left out, and the record says so).")
            skipped += list(roles.values())
            continue
        if "down" not in roles or "up" not in roles:
            raise LoraError(f"LoRA {path.name}: {first} has no matching "
                            f"{'up (lora_B/lora_up)' if 'down' in roles else 'down (lora_A/lora_down)'} weight.",
                            "the file is incomplete: download it again.")
        modules = _module_names(layout, mod, shape, kohya) if layout != "unknown" else []
        modules = [(m, p) for m, p in modules if m in shape.linears]
        if not modules:
            if not allow_partial:
                raise LoraError(f"LoRA {path.name}: unknown key {roles['down']}: the loaded SD3.5 {shape.arch} "
                                f"transformer has no linear layer it maps to ({shape.num_layers} blocks).",
                                "use a LoRA for this model; " + PARTIAL_FIX + ".")
            skipped += list(roles.values())
            continue
        down, up = shapes[roles["down"]], shapes[roles["up"]]
        rank = down[0] if len(down) == 2 else -1
        if len(down) != 2 or len(up) != 2 or up[1] != rank:
            raise LoraError(f"LoRA {path.name}: {roles['down']} {down} and {roles['up']} {up} are not a rank-r pair "
                            "([r, in] and [out, r]); conv or LyCORIS layers are not read.",
                            "use a plain linear LoRA for SD3.5.")
        _check_shapes(path, roles, down, up, modules, shape)
        if max_rank is not None and rank > max_rank:
            raise LoraError(f"LoRA {path.name}: {roles['down']} has rank {rank}, above the hot-swap maximum "
                            f"SD35_LORA_MAX_RANK={max_rank} (the size of the compiled model's LoRA slots).",
                            f"raise SD35_LORA_MAX_RANK to {rank} or more (and restart), or use --lora-fuse.")
        for m, pieces in modules:
            targets.append(Target(m, roles["down"], roles["up"], roles.get("alpha"), pieces, rank))
        layouts.add(layout)
        used += 1
        max_seen = max(max_seen, rank)
    if not targets:
        raise LoraError(f"LoRA {path.name} has no transformer LoRA layer"
                        + (f" (only {len(skipped)} skipped keys, first {skipped[0]})" if skipped else "") + ".",
                        "use a LoRA for the SD3.5 transformer.")
    layout = "/".join(sorted(layouts)).replace("kohya-diffusers", "kohya")
    if skipped:
        log.warning("LoRA %s: %d keys skipped (--lora-allow-partial), first %s", path.name, len(skipped), skipped[0])
    n_file = used + len({_split(k)[0] for k in skipped})
    return LoraFile(path, name or path.stem, layout, max_seen, n_file, used, targets, skipped,
                    _metadata_alpha(meta))


def _check_shapes(path, roles, down, up, modules, shape: ModelShape) -> None:
    """The first module whose in/out features differ from the model's: refused with the expected shape and
    the SD3.5 architecture the file's width points to."""
    from sd35.models import ARCHS

    whole = len(modules) == 1 and modules[0][1] is None
    for m, pieces in modules:
        fan_in, fan_out = shape.linears[m]
        out_rows = up[0] if whole else up[0] * len(pieces or range(6)) / 6
        if down[1] == fan_in and out_rows == fan_out:
            continue
        bad, want = ((roles["down"], [down[0], fan_in]) if down[1] != fan_in else
                     (roles["up"], [fan_out if whole else fan_out * 6 // len(pieces or range(6)), up[1]]))
        widths = {cfg["caption_projection_dim"]: name for name, cfg in ARCHS.items()}
        other = widths.get(down[1]) or widths.get(up[0])
        hint = f" — its width {down[1]} is SD3.5 {other}'s" if other and other != shape.arch else ""
        raise LoraError(f"LoRA {path.name}: {bad} has shape {down if bad == roles['down'] else up}, but the loaded "
                        f"SD3.5 {shape.arch} transformer's {m} expects {want}{hint}: a LoRA for another architecture.",
                        "use a LoRA trained for this model (the same SD3.5 variant).")


def row_ranges(pieces: list[int], rows: int) -> list[tuple[int, int]]:
    """Sixths of a fused weight (`singlefile.sai_module_map`) as row ranges of a `rows`-row tensor: runs of
    consecutive sixths, so halves (swapped AdaLN) and thirds (qkv) need only `rows` divisible by 2 or 3."""
    runs, out = [[pieces[0], pieces[0] + 1]], []
    for p in pieces[1:]:
        if p == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, p + 1])
    for a, b in runs:
        if (a * rows) % 6 or (b * rows) % 6:
            raise LoraError(f"a fused LoRA up weight of {rows} rows cannot be split into {len(runs)} parts.",
                            "the file is not an SD3.5 LoRA, or is damaged.")
        out.append((a * rows // 6, b * rows // 6))
    return out


def load(lora: LoraFile, dtype=None) -> dict[str, tuple]:
    """The tensors of a planned LoRA: {diffusers module: (down [r, in], up [out, r], alpha / r)}, in `dtype`
    (default float32)."""
    import torch
    from safetensors import safe_open

    dtype = dtype or torch.float32
    out = {}
    with safe_open(str(lora.path), "pt") as f:
        for t in lora.targets:
            down = f.get_tensor(t.down).to(dtype)
            up = f.get_tensor(t.up).to(dtype)
            if t.pieces is not None:
                up = torch.cat([up[a:b] for a, b in row_ranges(t.pieces, up.shape[0])])
            if t.alpha is not None:
                alpha = float(f.get_tensor(t.alpha).float().reshape(-1)[0])
            else:
                pattern = lora.alphas.get("pattern") or {}
                key = next((k for k in pattern if t.module == k or t.module.endswith("." + k)), None)
                alpha = pattern[key] if key else (lora.alphas.get("default") or float(t.rank))
            out[t.module] = (down.contiguous(), up.contiguous(), alpha / t.rank)
    return out
