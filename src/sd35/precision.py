"""Precision modes: which mode a run uses, why, and the one verb that applies it at load time.

Why torchao for every FP8 mode: one library, one config object per mode, applied once by
`quantize_` when the model is loaded and never per request (the torchao pattern).

Modes (transformer):
- `bf16`: the baseline; weights and compute in bfloat16.
- `fp8-weight`: every `nn.Linear` of the MMDiT, the AdaLN modulation linears included, stores its
  weight as FP8 E4M3 with one scale per output channel and computes in bf16. diffusers' default
  layerwise casting skips every module whose name contains "norm" (so all AdaLN linears, about a
  third of SD3.5 Large's weights) and only reaches 0.667x of bf16; this mode reaches ~0.5x. Works on
  any device, CPU included.
- `fp8`: FP8 weights and dynamically quantized FP8 activations (per-row scales), so the matmuls run on
  FP8 tensor cores. Needs CUDA SM >= 8.9.
- `auto`: `fp8` where the GPU can and the run compiles, otherwise `fp8-weight`.
- `fp8` emulated (`SD35_FP8_EMULATE=1`, CPU only): the same torchao tensors and the same dynamic per-row
  activation quantization, computed by torch's CPU `_scaled_mm`. Slow, and for numerics only: it lets the
  test suite run the real `fp8` code path on a machine without FP8 tensor cores. Every record says
  `"emulated": true`; `auto` never picks it. See `_emulation` for the one torchao check it bypasses.

T5-XXL (the largest component, 4.7 B parameters) runs once per prompt, so it never needs FP8
compute: `auto` stores it as fp8-weight whenever the transformer is in an FP8 mode, else bf16.

The few layers kept in bf16 are listed in KEEP_BF16 below, each with its reason.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sd35.errors import HardwareError, InputError
from sd35.hardware import Hardware
from sd35.settings import PRECISIONS, T5_MODES

# Module-name patterns (fnmatch against the fully qualified name in the transformer) kept in bf16.
KEEP_BF16: dict[str, str] = {
    "time_text_embed.*": (
        "timestep and pooled-text embedding MLPs: ~0.1% of the weights, but their output drives every "
        "AdaLN modulation of every block, so an error here shifts the whole network"
    ),
    "proj_out": (
        "final projection to the predicted velocity: its error lands directly in the latents at every "
        "step; 64 output channels, negligible size"
    ),
}

# T5: the feed-forward and attention linears are quantized; embeddings and norms are not nn.Linear.
T5_KEEP_BF16: dict[str, str] = {}


@dataclass(frozen=True)
class PrecisionPlan:
    """The resolved precision of a run, recorded with the reason for each choice."""

    transformer: str  # bf16 | fp8-weight | fp8
    transformer_reason: str
    t5: str  # bf16 | fp8-weight | off
    t5_reason: str
    emulated: bool = False  # fp8 computed by torch's CPU float8 matmul (SD35_FP8_EMULATE=1), not tensor cores

    def as_dict(self) -> dict:
        return {
            "transformer": self.transformer,
            "transformer_reason": self.transformer_reason,
            "t5": self.t5,
            "t5_reason": self.t5_reason,
            "emulated": self.emulated,
        }


def resolve(requested: str, t5_requested: str, hw: Hardware, *, emulate: bool = False,
            compiled: bool | None = None) -> PrecisionPlan:
    """Turn the requested modes into concrete ones for this hardware, or refuse before loading.
    `emulate` (SD35_FP8_EMULATE) lets an explicit `fp8` run on a CPU; it never changes what `auto` picks.
    `compiled`: whether this run compiles the MMDiT (None: not known yet, e.g. `sd35 doctor`). Eager, torchao's
    quantize/scale kernels around every matmul can make `fp8` slower than bf16, so `auto` picks `fp8` only
    for a run that compiles."""
    if requested not in PRECISIONS:
        raise InputError(
            f"unknown precision {requested!r}.",
            f"use one of {', '.join(PRECISIONS)} (--precision or SD35_PRECISION).",
        )
    if t5_requested not in T5_MODES:
        raise InputError(
            f"unknown T5 mode {t5_requested!r}.", f"use one of {', '.join(T5_MODES)} (--t5 or SD35_T5)."
        )
    if not hw.has_float8_dtype and requested != "bf16":
        raise HardwareError(
            f"this torch build ({torch.__version__}) has no float8_e4m3fn dtype, needed by every FP8 mode.",
            "install the pinned torch (`make setup`), or use --precision bf16.",
        )

    if requested == "auto" and hw.fp8_compute and compiled is False:
        mode = "fp8-weight"
        reason = (f"auto: {hw.fp8_reason}, but this run stays eager and FP8 compute pays off only compiled "
                  "(--compile blocks, or --precision fp8 to force it)")
    elif requested == "auto":
        mode = "fp8" if hw.fp8_compute else "fp8-weight"
        reason = f"auto: {hw.fp8_reason}"
    elif requested == "fp8" and emulate and not hw.fp8_compute:
        if hw.is_cuda:
            raise HardwareError(
                f"SD35_FP8_EMULATE=1 emulates fp8 on a CPU only; the device is {hw.describe()}: {hw.fp8_reason}.",
                "add --device cpu to emulate (numerics only, slow), or use --precision fp8-weight on this GPU.",
            )
        mode = "fp8"
        reason = ("requested; emulated (SD35_FP8_EMULATE=1): FP8 weights and activations computed by torch's CPU "
                  "float8 matmul, for numerics only, no FP8 tensor cores")
    elif requested == "fp8":
        if not hw.fp8_compute:
            raise HardwareError(
                f"precision fp8 needs FP8 tensor cores (CUDA compute capability >= 8.9); found "
                f"{hw.describe()}: {hw.fp8_reason}.",
                "use --precision fp8-weight (FP8 storage, bf16 compute; any device) or auto "
                "(or SD35_FP8_EMULATE=1 --device cpu to check fp8's numerics on a CPU, slowly).",
            )
        mode, reason = "fp8", f"requested; {hw.fp8_reason}"
    else:
        mode, reason = requested, "requested"

    if t5_requested == "auto":
        t5 = "bf16" if mode == "bf16" else "fp8-weight"
        t5_reason = f"auto: follows transformer {mode} (T5 runs once per prompt, weight-only FP8 suffices)"
    else:
        t5, t5_reason = t5_requested, "requested"
    emulated = mode == "fp8" and not hw.fp8_compute
    return PrecisionPlan(mode, reason, t5, t5_reason, emulated)


@contextmanager
def _emulation(active: bool):
    """The one place SD35_FP8_EMULATE touches torchao. `Float8DynamicActivationFloat8WeightConfig` refuses a
    device without FP8 tensor cores only through `_check_hardware_support`, as `quantize_` calls it from
    `torchao.quantization.quant_api` (torchao 0.18); torch's CPU `_scaled_mm` computes the float8 matmuls
    themselves. While `active` (an emulated plan, which `resolve` grants on a CPU only), that name is a no-op
    for the duration of one `quantize_` call and restored after: a real GPU run never sees the bypass."""
    if not active:
        yield
        return
    from torchao.quantization import quant_api

    original = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda granularity: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = original


def _config(mode: str):
    """The torchao config object for a mode (imported lazily: torchao is slow to import)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
    )

    if mode == "fp8-weight":
        return Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    raise ValueError(f"no torchao config for mode {mode!r}")


def _linear_filter(keep: dict[str, str]):
    def filter_fn(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and not any(fnmatch.fnmatch(fqn, p) for p in keep)

    return filter_fn


def apply(module: nn.Module, mode: str, device: str | torch.device | None = None, *, component="transformer",
          emulated: bool = False):
    """Quantize `module` in place for `mode` (no-op for bf16). `emulated`: fp8 on a CPU (see `_emulation`).

    With `device` set, torchao moves one layer at a time to the device and quantizes it there, so the
    GPU never holds the full bf16 copy next to the FP8 copy.
    """
    if mode in ("bf16", "off"):
        return module
    from torchao.quantization import quantize_

    keep = KEEP_BF16 if component == "transformer" else T5_KEEP_BF16
    with _emulation(emulated and mode == "fp8"):
        quantize_(module, _config(mode), filter_fn=_linear_filter(keep), device=device)
    return module


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside torchao's tensor subclasses (FP8 data + scales)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module | None) -> dict[str, int]:
    """Parameter and buffer bytes of a module (0 for a dropped component)."""
    if module is None:
        return {"parameters": 0, "buffers": 0, "total": 0}
    params = sum(tensor_bytes(p) for p in module.parameters())
    buffers = sum(tensor_bytes(b) for b in module.buffers())
    return {"parameters": params, "buffers": buffers, "total": params + buffers}


def linear_coverage(module: nn.Module) -> dict[str, int]:
    """How many nn.Linear weights are FP8 vs kept in bf16 (for logs, benchmarks and tests)."""
    fp8, kept = 0, 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if getattr(m.weight, "dtype", None) == torch.float8_e4m3fn or "Float8" in type(m.weight).__name__:
                fp8 += m.weight.numel()
            else:
                kept += m.weight.numel()
    return {"fp8_linear_params": fp8, "bf16_linear_params": kept}
