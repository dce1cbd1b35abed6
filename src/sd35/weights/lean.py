"""Lean loading of a bf16 source: the transformer read tensor by tensor into a model built on the meta
device, quantized to FP8 as each Linear weight arrives; T5 through transformers' own loader with a torchao
quantization_config. (A pre-quantized folder needs no quantizing: `fp8io.load_transformer` maps it.)

Why: loading a bf16 checkpoint and quantizing it afterwards stages the whole bf16 pipeline in host RAM
(≈ 28 GB for SD3.5 Large with T5). Why our own reader for the transformer rather than `from_pretrained`:
measured on SD3.5 Medium's transformer (`sd35 bench load`), `from_pretrained` peaked at ~3.7x the FP8
weights: it memory-maps the files (mapped pages count in the process's RSS next to the copies made from
them) and computes the position table in float64/float32 in `__init__` before loading the stored one.
Here the module is built on the meta device (buffers included: nothing is computed), each tensor is read
with plain `readinto` into its own buffer (the page cache is not mapped into the process), quantized at
once if it is a Linear weight to quantize, and assigned. Peak: the component in FP8 plus one bf16 tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

from sd35 import precision
from sd35.errors import ModelError
from sd35.weights.fp8io import t5_config
from sd35.weights.safetensors_header import read_header, torch_dtype


def return_large_frees_to_os() -> None:
    """Serve allocations above 4 MiB from mmap for the rest of the process (glibc `mallopt`): step 1 of every
    lean load, called there on purpose, never at import.

    Why: reading a component frees a bf16 tensor after each quantized one is kept. With glibc's default
    *dynamic* threshold, freed buffers up to 32 MiB soon come from the heap, where the long-lived FP8
    tensors interleave with them and the freed space is never returned: measured +0.3-0.7 GB on a 1 GB
    component, +3 GB on Medium's transformer. A fixed threshold returns each freed buffer at once. The
    setting is process-wide and stays: the cost is a page fault per large CPU allocation later
    (negligible next to a CPU denoising step). A no-op off Linux/glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def read_tensors(path: Path):
    """Yield (name, tensor) from a safetensors file one tensor at a time, in file order, without
    memory-mapping it."""
    import torch

    header = read_header(path)
    with open(path, "rb", buffering=0) as fh:
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            fh.seek(header.data_start + start)
            view, got = memoryview(buf.numpy()), 0
            while got < end - start:
                r = fh.readinto(view[got:])
                if not r:
                    raise ModelError(f"{path} ends early (reading {name}).", "download or re-create the file.")
                got += r
            yield name, buf.view(torch_dtype(info["dtype"])).reshape(info["shape"])


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


def _fill(model, files: list[Path], *, quantize: bool, keep: dict[str, str], transform=None):
    """Assign every tensor of `files` into the meta-built `model`: bf16 Linear weights quantized as they
    arrive when `quantize`; the rest cast to bf16. `transform(name, bf16 tensor)` runs before quantizing
    (--lora-fuse bakes LoRAs in there: weights/lora.py)."""
    import fnmatch

    import torch
    from torchao.quantization import Float8Tensor, PerRow

    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not any(fnmatch.fnmatch(n, p) for p in keep)}
    for f in files:
        for name, t in read_tensors(f):
            owner, _, leaf = name.rpartition(".")
            if t.is_floating_point():
                t = t.to(torch.bfloat16)
            if transform is not None:
                t = transform(name, t)
            if quantize and leaf == "weight" and owner in linears and t.dim() == 2:
                t = Float8Tensor.from_hp(t, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
            _assign(model, name, t)


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


def load_transformer(folder: Path, *, quantize: bool, transform=None):
    """The SD3 transformer of a bf16 folder (`folder/transformer`): FP8 as its tensors are read when
    `quantize`, bf16 otherwise; built on meta, no bf16 copy of the whole. (A pre-quantized folder is read
    by `fp8io.load_transformer`.) `transform`: see `_fill`.

    1. Return large freed buffers to the OS from now on (`return_large_frees_to_os`, process-wide).
    2. Build the model on the meta device from its config: no tensor allocated, no table computed.
    3. Fill it tensor by tensor (`_fill`).
    4. Check that nothing is left on meta; record where the weights came from.
    """
    import torch
    from diffusers import SD3Transformer2DModel

    # 1. The allocator.
    return_large_frees_to_os()
    # 2. The model on meta.
    sub = Path(folder) / "transformer"
    config = {k: v for k, v in json.loads((sub / "config.json").read_text()).items()
              if not k.startswith("_") and k != "quantization_config"}
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    # 3. The tensors.
    _fill(model, _weight_files(sub), quantize=quantize, keep=precision.KEEP_BF16, transform=transform)
    # 4. Complete; as from_pretrained records it: where the weights came from (the debugger's compare_bf16
    # reads the original bf16 weights of one module there).
    _check_materialized(model, sub)
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

