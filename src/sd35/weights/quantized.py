"""FP8 from disk: the pre-quantized store, lean loading of bf16 sources, and retargeting FP8 weights.

Why: loading a bf16 checkpoint and quantizing it afterwards stages the whole bf16 pipeline in host RAM
(≈ 28 GB for SD3.5 Large with T5) and quantizes ~8 B parameters at every start, in every service
process. Two remedies, both built on the serialization diffusers 0.42 and transformers 5 already have
for torchao tensors (verified with our pins: a `Float8Tensor` weight is written to safetensors as
`<module>._weight_qdata` (float8_e4m3fn) + `<module>._weight_scale` (fp32, one per output row), with
the tensor's type in the file's metadata, and `from_pretrained` rebuilds it on the meta device and
assigns it — no bf16 copy ever exists):

- **Pre-quantized store** (`sd35 cache quantize`): a diffusers-layout folder whose transformer (and T5)
  holds FP8 data + scales on disk, plus `sd35_quant.json` recording how it was made (source repo +
  commit, precision, the layers kept in bf16, library versions). It lives in the shared cache, inside
  `HF_HUB_CACHE` (`<HF_HUB_CACHE>/sd35-quantized/<alias>-<precision>`, or `SD35_QUANTIZED_DIR`), so
  one person quantizes and the team loads it by name (`--model medium-fp8-weight`) or by path. The
  other components (CLIP encoders, VAE, tokenizers, scheduler) are hard-linked from the source when
  the filesystem allows, else copied.
- **Lean loading** of a bf16 source: the transformer and T5 are loaded component by component with a
  torchao `quantization_config`, so each Linear weight is quantized as its shard is read: the host
  holds the FP8 component plus one shard's worth of bf16, never the bf16 pipeline.

One storage format serves both FP8 modes. `fp8-weight` and `fp8` store identical per-row E4M3 weights;
they differ only in whether activations are quantized at matmul time, which is a property of the
tensor wrapper, not of the stored bytes. So every component is quantized with torchao's weight-only
config (which runs on any device, the CPU included) and `retarget` then rewraps the same data for the
run's mode (adding or dropping the dynamic activation quantization) without copying it. The layer
filter is `precision.KEEP_BF16`, the one `precision.apply` uses, so a lean or pre-quantized transformer
is bit-for-bit the on-the-fly one (tested).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sd35 import precision
from sd35.errors import InputError, ModelError
from sd35.models import QUANT_RECORD as RECORD
from sd35.models import lookup
from sd35.settings import Settings

log = logging.getLogger(__name__)

FORMAT = "sd35-quantized/1"
QUANT_MODES = ("fp8-weight", "fp8")
# Components quantized in the store, by pipeline attribute → which KEEP list applies.
QUANTIZED_COMPONENTS = {"transformer": "transformer", "text_encoder_3": "t5"}


# --- torchao configs ----------------------------------------------------------------------------------------

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


# --- lean loading ---------------------------------------------------------------------------------------------
#
# Our own reader instead of `from_pretrained` for the two big components. Measured on SD3.5 Medium's
# transformer (`sd35 bench load`), `from_pretrained` peaked at ~3.7x the FP8 weights: it memory-maps the
# files (mapped pages count in the process's RSS next to the copies made from them) and computes the
# position table in float64/float32 in `__init__` before loading the stored one. Here the module is built
# on the meta device (buffers included: nothing is computed), each tensor is read with plain `readinto`
# into its own buffer (the page cache is not mapped into the process), quantized at once if it is a
# Linear weight to quantize, and assigned. Peak: the component in FP8 plus one bf16 tensor.

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def read_tensors(path: Path):
    """Yield (name, tensor) from a safetensors file one tensor at a time, without memory-mapping it;
    the file's `__metadata__` is yielded first as ("__metadata__", dict)."""
    import struct

    import torch

    with open(path, "rb", buffering=0) as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        yield "__metadata__", header.pop("__metadata__", None) or {}
        base = 8 + n
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            fh.seek(base + start)
            view, got = memoryview(buf.numpy()), 0
            while got < end - start:
                r = fh.readinto(view[got:])
                if not r:
                    raise ModelError(f"{path} ends early (reading {name}).", "download or re-create the file.")
                got += r
            yield name, buf.view(getattr(torch, _ST_DTYPES[info["dtype"]])).reshape(info["shape"])


def _assign(model, name: str, tensor) -> None:
    import torch

    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise ModelError(f"the checkpoint has a tensor {name!r} the model does not.",
                         "the folder's weights and config.json do not belong together: re-download or re-create it.")


def _large_allocations_from_mmap() -> None:
    """Serve allocations above 4 MiB from mmap for the rest of the process (glibc `mallopt`).

    Why: reading a component frees a bf16 tensor after each quantized one is kept. With glibc's default
    *dynamic* threshold, freed buffers up to 32 MiB soon come from the heap, where the long-lived FP8
    tensors interleave with them and the freed space is never returned: measured +0.3-0.7 GB on a 1 GB
    component, +3 GB on Medium's transformer. A fixed threshold returns each freed buffer at once. The
    cost is a page-fault per large CPU allocation later (negligible next to a CPU denoising step)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def _fill(model, files: list[Path], *, quantize: bool, keep: dict[str, str]):
    """Assign every tensor of `files` into the meta-built `model`: torchao-flattened FP8 weights rebuilt as
    Float8Tensors; bf16 Linear weights quantized as they arrive when `quantize`; the rest cast to bf16."""
    import fnmatch

    import torch
    from torchao.quantization import Float8Tensor, PerRow

    _large_allocations_from_mmap()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not any(fnmatch.fnmatch(n, p) for p in keep)}
    pending: dict[str, dict] = {}
    for f in files:
        meta = {}
        for name, t in read_tensors(f):
            if name == "__metadata__":
                meta = t
                continue
            owner, _, leaf = name.rpartition(".")
            if leaf in ("_weight_qdata", "_weight_scale"):  # torchao's flattened Float8Tensor
                parts = pending.setdefault(owner, {})
                parts[leaf] = t
                if len(parts) == 2:
                    info = json.loads(meta.get(f"{owner}.weight", "{}")).get("_data", {})
                    block = info.get("block_size") or [1, parts["_weight_qdata"].shape[-1]]
                    _assign(model, f"{owner}.weight", Float8Tensor(parts["_weight_qdata"], parts["_weight_scale"],
                                                                    block_size=list(block), dtype=torch.bfloat16))
                    del pending[owner]
                continue
            if t.is_floating_point():
                t = t.to(torch.bfloat16)
            if quantize and leaf == "weight" and owner in linears and t.dim() == 2:
                t = Float8Tensor.from_hp(t, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
            _assign(model, name, t)
    if pending:
        raise ModelError(f"incomplete FP8 weights in {files[0].parent} ({next(iter(pending))}).",
                         "re-create the folder with `sd35 cache quantize`.")


POS_EMBED = "pos_embed.pos_embed"


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


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"no .safetensors weights in {folder}.", "re-download the model (`sd35 cache verify`).")
    return files


def _check_materialized(model, folder: Path) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ModelError(f"{folder} lacks {len(left)} tensor(s) of its model (e.g. {left[0]}).",
                         "re-download or re-create the folder (`sd35 cache verify`).")


def load_transformer(folder: Path, *, quantize: bool):
    """The SD3 transformer from `folder/transformer`: FP8 as its tensors are read when `quantize` (bf16
    source), or as stored (a pre-quantized folder), bf16 otherwise; built on meta, no bf16 copy."""
    import torch
    from diffusers import SD3Transformer2DModel

    sub = Path(folder) / "transformer"
    config = {k: v for k, v in json.loads((sub / "config.json").read_text()).items()
              if not k.startswith("_") and k != "quantization_config"}
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    _fill(model, _weight_files(sub), quantize=quantize, keep=precision.KEEP_BF16)
    record = Path(folder) / RECORD
    if record.is_file() and json.loads(record.read_text()).get("pos_embed") == "recomputed":
        _assign(model, POS_EMBED, computed_pos_embed(model))  # left out of the store (see quantize)
    _check_materialized(model, sub)
    # As from_pretrained records it: where the weights came from (the debugger's compare_bf16 reads the
    # original bf16 weights of one module there).
    model.register_to_config(_name_or_path=str(sub))
    return model.eval()


def load_t5(folder: Path, *, quantize: bool):
    """T5-XXL's encoder from `folder/text_encoder_3` through transformers' own loader (with a torchao
    quantization_config for a bf16 source: quantized per tensor as read). Not our reader: a T5 built on
    the meta device and filled by it computed attention differently from transformers' (same weights,
    different outputs, cause not found in time), and T5 has no large computed table to avoid."""
    import torch
    from transformers import T5EncoderModel

    kw = {"quantization_config": t5_config()} if quantize else {}
    return T5EncoderModel.from_pretrained(Path(folder) / "text_encoder_3", dtype=torch.bfloat16,
                                          use_safetensors=True, **kw)


def is_fp8(module) -> bool:
    """Whether any Linear of `module` already holds FP8 weights (loaded quantized)."""
    return module is not None and precision.linear_coverage(module)["fp8_linear_params"] > 0


def retarget(module, mode: str) -> int:
    """Rewrap the FP8 weights of `module` for `mode` without touching their bytes: `fp8` adds torchao's
    dynamic per-row FP8 activation quantization (as `Float8DynamicActivationFloat8WeightConfig` does),
    `fp8-weight` drops it. Returns the number of weights rewrapped."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

    if mode not in QUANT_MODES:
        raise ValueError(f"cannot retarget FP8 weights to {mode!r}")
    n = 0
    dyn = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    act_gran, _ = dyn.granularity if isinstance(dyn.granularity, (list, tuple)) else (dyn.granularity,) * 2
    for m in module.modules():
        if not isinstance(m, torch.nn.Linear) or not isinstance(m.weight, Float8Tensor):
            continue
        w = m.weight
        if mode == "fp8":
            if w.shape[0] % 16 or w.shape[1] % 16:  # torchao leaves such layers weight-only in fp8 mode too
                continue
            kwargs = dict(mm_config=dyn.mm_config, kernel_preference=dyn.kernel_preference,
                          act_quant_kwargs=QuantizeTensorToFloat8Kwargs(
                              dyn.activation_dtype, act_gran, hp_value_lb=dyn.activation_value_lb,
                              hp_value_ub=dyn.activation_value_ub, kernel_preference=dyn.kernel_preference))
        else:
            kwargs = {}
        new = Float8Tensor(w.qdata, w.scale, block_size=list(w.block_size), dtype=w.dtype, **kwargs)
        m.weight = torch.nn.Parameter(new, requires_grad=False)
        n += 1
    return n


# --- the record ------------------------------------------------------------------------------------------------

def read_record(folder: Path | None) -> dict | None:
    """`sd35_quant.json` of a pre-quantized folder, or None for any other folder."""
    if folder is None:
        return None
    f = Path(folder) / RECORD
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{f} is not readable JSON ({exc}).",
                         "re-create the folder with `sd35 cache quantize`.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelError(f"{f} has format {record.get('format') if isinstance(record, dict) else '?'!r}; this "
                         f"sd35 reads {FORMAT!r}.", "re-create the folder with this version's `sd35 cache quantize`.")
    return record


def source_alias(folder: Path) -> str | None:
    """The registry alias (or repo id) of the model a pre-quantized folder was made from."""
    try:
        record = read_record(folder)
    except ModelError:
        return None
    if not record:
        return None
    src = record.get("source", {})
    return src.get("alias") or src.get("repo_id")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchao", "diffusers", "transformers", "safetensors", "sd35"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            from sd35 import __version__

            out[pkg] = __version__ if pkg == "sd35" else "?"
    return out


def check_plan(record: dict, plan: precision.PrecisionPlan, folder: Path) -> None:
    """A pre-quantized folder holds FP8 weights: a bf16 request for them cannot be honoured from it."""
    src = record.get("source", {}).get("alias") or record.get("source", {}).get("repo_id") or "the source model"
    if plan.transformer == "bf16":
        raise ModelError(f"{folder} holds a pre-quantized FP8 transformer ({record.get('precision')}); bf16 was "
                         "requested.", f"load the source model for bf16 (--model {src}), or use --precision "
                         "fp8-weight, fp8 or auto with this folder.")
    if plan.t5 == "bf16" and record.get("t5") in QUANT_MODES:
        raise ModelError(f"{folder} stores T5 in FP8; --t5 bf16 was requested.",
                         f"use --t5 auto or fp8-weight with this folder, or load {src} for a bf16 T5.")


# --- the store ---------------------------------------------------------------------------------------------------

def store_dir(settings: Settings) -> Path:
    """Where pre-quantized folders live: SD35_QUANTIZED_DIR, else `sd35-quantized` inside HF_HUB_CACHE.

    Inside, not beside: on a shared server HF_HUB_CACHE is the group-owned setgid folder `sd35 cache init`
    made (docs/hosting.md), so the store inherits its group and ACLs, and `cache verify` checks its
    permissions with the rest. huggingface_hub skips a folder not named `models--…` when it scans."""
    if settings.quantized_dir is not None:
        return Path(settings.quantized_dir).expanduser()
    return Path(settings.hf_hub_cache).expanduser() / "sd35-quantized"


def default_name(model: str, mode: str) -> str:
    """`medium-fp8-weight`, `large-turbo-fp8`, `tiny-fp8-weight`, `<folder>-fp8-weight`, `<repo name>-fp8`."""
    spec = lookup(model)
    base = spec.alias if spec else Path(model.rstrip("/")).name or "model"
    return f"{base}-{mode}"


def find(name: str, settings: Settings) -> Path | None:
    """A pre-quantized folder in the store called `name` (what `--model NAME` resolves to)."""
    if not name or "/" in name or name.startswith("."):
        return None
    folder = store_dir(settings) / name
    return folder if (folder / RECORD).is_file() and (folder / "model_index.json").is_file() else None


def listing(settings: Settings) -> list[dict]:
    """Pre-quantized folders in the store, with their records and sizes."""
    root = store_dir(settings)
    rows = []
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if not (folder / RECORD).is_file():
            continue
        try:
            record = read_record(folder) or {}
        except ModelError as exc:
            record = {"error": exc.cause}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({"name": folder.name, "path": str(folder), "precision": record.get("precision"),
                     "t5": record.get("t5"), "source": record.get("source", {}), "size_on_disk": size,
                     **({"error": record["error"]} if "error" in record else {})})
    return rows


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file (the Hub cache's blob, shared, no extra disk) or copy it across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)


def quantize(settings: Settings, source, mode: str, t5: str = "auto", out: Path | None = None) -> Path:
    """Write a pre-quantized copy of `settings.model` and return its folder.

    1. Check the request (mode, T5, output folder free) before reading a weight.
    2. The source: `source` is `hub.resolve(settings)`'s ModelSource (tiny | local folder | Hub cache),
       resolved by the caller once `check_request` passed.
    3. Link/copy the components stored as they are (tokenizers, scheduler, CLIP encoders, VAE).
    4. Load the transformer (and T5) lean — FP8 as the shards are read — and save them with their
       quantization_config (torchao tensors flattened into safetensors).
    5. Write the record, then move the folder into place in one rename: a half-written store is never
       found under its name.
    """
    # 1. The request (also checked by `check_request` before the source is resolved).
    target = check_request(settings, mode, t5, out)
    t5_mode = {"auto": "fp8-weight"}.get(t5, t5)

    # 2. The source.
    if mode not in QUANT_MODES:
        raise InputError(f"--precision {mode!r} cannot be stored pre-quantized.",
                         f"use --precision {' or '.join(QUANT_MODES)} (bf16 is the source itself).", param="precision")
    if read_record(source.path):
        raise InputError(f"{source.path} is already pre-quantized.", "quantize the bf16 source model instead.")
    need = sum(f.stat().st_size for f in (source.path / "transformer").rglob("*.safetensors"))
    need += sum(f.stat().st_size for f in (source.path / "text_encoder_3").rglob("*.safetensors"))
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if need // 2 + (1 << 30) > free:
        raise ModelError(f"not enough disk for the pre-quantized copy: ~{need / 2e9:.1f} GB needed, "
                         f"{free / 1e9:.1f} GB free under {target.parent}.",
                         "free space there, or pass --out on a larger disk (or set SD35_QUANTIZED_DIR).")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        # 3. Components stored as they are.
        for f in sorted(source.path.rglob("*")):
            rel = f.relative_to(source.path)
            if rel.parts[0] in ("transformer",) or (rel.parts[0] == "text_encoder_3" and t5_mode != "bf16"):
                continue
            if f.is_file():
                _link_or_copy(f, tmp / rel)
        # 4. FP8 components, one at a time (peak host memory: one FP8 component plus a shard of bf16).
        transformer = load_transformer(source.path, quantize=True)
        pos_embed = store_transformer(transformer, tmp)
        coverage = precision.linear_coverage(transformer)
        del transformer
        if t5_mode != "bf16":
            enc = load_t5(source.path, quantize=True)
            enc.config.save_pretrained(tmp / "text_encoder_3")
            save_component(enc, tmp / "text_encoder_3", "model.safetensors", t5_config())
            del enc
        # 5. Record and publish.
        record = {
            "format": FORMAT,
            "precision": mode,
            "t5": t5_mode,
            "storage": {"weight_dtype": "float8_e4m3fn", "scale": "float32, one per output row (torchao "
                        "Float8Tensor, PerRow)", "serialization": "diffusers/transformers TorchAoConfig, "
                        "safetensors (torchao flattened tensors: <module>._weight_qdata, <module>._weight_scale)"},
            "source": {"requested": settings.model, "alias": _alias(settings.model), "kind": source.kind,
                       "repo_id": source.repo_id, "revision": source.revision, "commit": source.commit,
                       "path": str(source.path)},
            "kept_bf16": {"transformer": precision.KEEP_BF16, "t5": precision.T5_KEEP_BF16},
            # "recomputed": not stored, computed from the config at load (checked bit-identical to the source's
            # table when this folder was made); "stored": the source's table differs from the computed one.
            "pos_embed": pos_embed,
            "transformer_linear_params": coverage,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_by": _user(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _share(tmp, group=_setgid(target.parent))
        if target.is_dir():
            target.rmdir()  # an empty folder named by --out
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pre-quantized %s (%s) into %s in %.1f s", settings.model, mode, target, time.perf_counter() - started)
    return target


def check_request(settings: Settings, mode: str, t5: str = "auto", out: Path | None = None) -> Path:
    """Refuse a bad `sd35 cache quantize` before anything is read; return the output folder."""
    import torch

    if mode not in QUANT_MODES:
        raise InputError(f"--precision {mode!r} cannot be stored pre-quantized.",
                         f"use --precision {' or '.join(QUANT_MODES)} (bf16 is the source itself).", param="precision")
    if t5 not in ("auto", "fp8-weight", "bf16"):
        raise InputError(f"--t5 {t5!r} is not storable.", "use --t5 auto (FP8), fp8-weight or bf16.", param="t5")
    if not hasattr(torch, "float8_e4m3fn"):
        raise ModelError(f"this torch build ({torch.__version__}) has no float8_e4m3fn dtype.",
                         "install the pinned torch (`make setup`).")
    target = Path(out).expanduser() if out else store_dir(settings) / default_name(settings.model, mode)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target} already exists.", "remove it first, or pass another --out.", param="out")
    return target


def _alias(model: str) -> str | None:
    spec = lookup(model)
    return spec.alias if spec else None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container
        return str(os.getuid())


def _share(folder: Path, group: bool) -> None:
    """Make what we wrote readable by the team (save_pretrained writes safetensors as 0600); group-writable
    too in a shared (setgid) store. Hard-linked files are the source's blobs and keep their mode."""
    umask = os.umask(0)
    os.umask(umask)
    fmode, dmode = (0o664, 0o2775) if group else (0o666 & ~umask | 0o444, 0o777 & ~umask | 0o555)
    for p in [folder, *folder.rglob("*")]:
        st = p.lstat()
        if p.is_dir():
            os.chmod(p, dmode)
        elif st.st_nlink == 1:
            os.chmod(p, fmode)


def _setgid(folder: Path) -> bool:
    import stat

    try:
        return bool(folder.stat().st_mode & stat.S_ISGID)
    except OSError:
        return False
