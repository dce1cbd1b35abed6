"""What the debugger's stop frame offers besides its locals: a dump to disk and a bf16 comparison.

Why separate from `breakpoints.py`: the harness decides *where* to stop; this module owns what you do once
stopped, and both tools are plain functions a notebook can call too.

- `dump` writes the captured tensors (named inputs, and the output when the stop comes after the module
  ran, as with SD35_BREAK=nan) to `<out>/debug/<time>-<where>.safetensors` plus a `.json` beside it with
  names, shapes, dtypes, the step and the module — both written atomically (temporary file + rename), so a
  notebook never reads half a file. `safetensors.torch.load_file` reads it back.
- `compare_bf16` runs the same module on the same inputs with bf16 weights and reports the relative L2
  error and cosine of the FP8 output against it. The bf16 weights are read for that module only from the
  model folder's safetensors (`safe_open`, only the keys under the module's prefix; sharded checkpoints
  through their index), swapped in for the call, and swapped back. When the folder has no such keys, the
  FP8 weights are dequantized instead — and the result says so: for `fp8-weight` that comparison is ~0 by
  construction (the same values, dequantized), for `fp8` it isolates the activation quantization.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

WEIGHT_INDEX = "diffusion_pytorch_model.safetensors.index.json"


# --- tensors out of nested inputs and outputs ----------------------------------------------------------------

def flatten(prefix: str, value, out: dict) -> dict:
    """{"inputs.hidden_states": t, "output.0": t, …}: every tensor in nested dicts/lists/tuples (and
    diffusers' output objects, which are dicts)."""
    import torch

    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)
    return out


# --- sd35_dump() -------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump(out_dir: Path | str, where: str, step: int | None, module_name: str | None, inputs: dict,
         output=None) -> str:
    """Write the tensors among `inputs` (and `output`) to `<out_dir>/debug/<time>-<where>.safetensors` and a
    JSON of names, shapes, dtypes and the step beside it. Returns the safetensors path."""
    from safetensors.torch import save_file

    tensors = flatten("inputs", inputs, {})
    if output is not None:
        flatten("output", output, tensors)
    folder = Path(out_dir) / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9._@-]+', '_', where)}"
    path = folder / f"{stem}.safetensors"
    n = 1
    while path.exists() or path.with_suffix(".json").exists():
        n += 1
        path = folder / f"{stem}-{n}.safetensors"
    host, meta, seen = {}, {}, {}
    for name, t in tensors.items():
        entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "device": str(t.device)}
        if id(t) in seen:  # the same tensor under two names: stored once
            entry["same_as"] = seen[id(t)]
        else:
            seen[id(t)] = name
            x = t.detach()
            if type(x).__name__ not in ("Tensor", "Parameter") and hasattr(x, "dequantize"):
                x = x.dequantize()
                entry["stored_as"] = "dequantized"
            host[name] = x.to("cpu").contiguous().clone()
            if host[name].dtype != t.dtype:
                entry["stored_dtype"] = str(host[name].dtype).removeprefix("torch.")
        meta[name] = entry
    info = {"where": where, "module": module_name, "step": step, "file": path.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tensors": meta,
            "load": f"safetensors.torch.load_file({str(path)!r})"}
    _atomic_write(path, lambda tmp: save_file(host, tmp, metadata={"where": where, "step": str(step)}))
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return str(path)


# --- compare_bf16() ------------------------------------------------------------------------------------------

def fp8_linears(module) -> dict[str, object]:
    """{sub-name: Linear} for every linear under `module` whose weight is a torchao FP8 tensor."""
    return {name: m for name, m in module.named_modules()
            if getattr(getattr(m, "weight", None), "qdata", None) is not None}


def _checkpoint_files(folder: Path, keys: list[str]) -> dict[str, Path]:
    """{key: file} for the keys found in the folder's safetensors (sharded through their index)."""
    index = folder / WEIGHT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {k: folder / weight_map[k] for k in keys if k in weight_map}
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names = set(st.keys())
        found.update({k: f for k in keys if k in names and k not in found})
    return found


def bf16_weights(folder: Path | str | None, prefix: str, linears: dict) -> tuple[dict, str]:
    """The original weights of `linears` (keys `<prefix>.<name>.weight`) read from the model folder, only
    those keys; else the dequantized FP8 weights. Returns ({name: tensor}, where they came from)."""
    from safetensors import safe_open

    def key(name):
        return ".".join(p for p in (prefix, name, "weight") if p)

    keys = {name: key(name) for name in linears}
    files = _checkpoint_files(Path(folder), list(keys.values())) if folder and Path(folder).is_dir() else {}
    if len(files) == len(keys):
        weights = {}
        by_file: dict[Path, list[str]] = {}
        for name, k in keys.items():
            by_file.setdefault(files[k], []).append(name)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for name in names:
                    weights[name] = st.get_tensor(keys[name])
        shown = ", ".join(sorted({f.name for f in files.values()}))
        return weights, f"bf16 weights reloaded from {Path(folder).name}/{shown} ({len(weights)} tensors, this module only)"
    weights = {name: lin.weight.dequantize() for name, lin in linears.items()}
    return weights, ("dequantized FP8 weights (the model folder has no bf16 weights for this module): for "
                     "fp8-weight this is ~0 by construction; for fp8 it isolates activation quantization")


def _errors(ref: list, cand: list) -> tuple[float, float]:
    import torch

    num = sum(float((a.float() - b.float()).norm() ** 2) for a, b in zip(ref, cand))
    den = sum(float(a.float().norm() ** 2) for a in ref)
    a = torch.cat([t.detach().float().flatten().cpu() for t in ref])
    b = torch.cat([t.detach().float().flatten().cpu() for t in cand])
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return (num ** 0.5) / max(den ** 0.5, 1e-12), cos


def compare_bf16(module, prefix: str, folder, call, args: tuple, kwargs: dict, output=None) -> dict:
    """The module's output with bf16 weights vs. its FP8 output on the same inputs.

    `call(*args, **kwargs)` runs the module (the harness passes the original, unwrapped callable);
    `output`, when the module already ran (SD35_BREAK=nan), is its FP8 output, else it is computed."""
    import torch

    linears = fp8_linears(module)
    if not linears:
        return {"module": prefix, "error": f"{type(module).__name__} {prefix or ''} has no FP8 weights: nothing to "
                "compare (a bf16 run, or a module kept in bf16 — see precision.KEEP_BF16)"}
    weights, source = bf16_weights(folder, prefix, linears)
    with torch.no_grad():
        fp8_out = output if output is not None else call(*args, **kwargs)
        saved = {}
        try:
            for name, lin in linears.items():
                saved[name] = lin._parameters["weight"]
                dtype = lin.bias.dtype if lin.bias is not None else torch.bfloat16
                w = weights[name].to(device=lin.weight.device, dtype=dtype)
                lin._parameters["weight"] = torch.nn.Parameter(w, requires_grad=False)
            bf16_out = call(*args, **kwargs)
        finally:
            for name, param in saved.items():
                linears[name]._parameters["weight"] = param
    ref, cand = list(flatten("o", bf16_out, {}).values()), list(flatten("o", fp8_out, {}).values())
    rel, cos = _errors(ref, cand)
    per = {}
    for (name, a), b in zip(flatten("output", bf16_out, {}).items(), cand):
        r, c = _errors([a], [b])
        per[name] = {"rel_err": r, "cosine": c}
    return {"module": prefix, "rel_err": rel, "cosine": cos, "per_output": per, "weights": source,
            "fp8_linears": len(linears), "bf16_output": bf16_out, "fp8_output": fp8_out}
