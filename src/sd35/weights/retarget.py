"""Retargeting FP8 weights between `fp8-weight` and `fp8` without copying them.

Why: the two modes store the same per-row E4M3 bytes (fp8io.py); they differ only in the tensor wrapper
(whether activations are dynamically quantized at matmul time). A folder quantized once, or weights
quantized as read, serve either mode by rewrapping — no second quantization, no second copy.
"""

from __future__ import annotations

from sd35 import precision
from sd35.weights.fp8io import QUANT_MODES


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

