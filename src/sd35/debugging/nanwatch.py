"""The NaN watch: find the first module whose output stops being finite (`SD35_BREAK=nan[@STEP]`).

Why its own module: a NaN born in one FP8 linear spreads through every later block within a step, and ends
as an all-black image; the watch is a different mechanism from the named breaks (a forward hook on every
module with weights or a norm, not a wrapper around one module) and its finiteness test is also what the
runtime uses after decoding, so an image with NaN/Inf is never saved in silence.

PyTorch runs a module's forward hooks when its forward returns, so inner modules report before the modules
that contain them: the first non-finite output seen is the innermost module where it appeared. The watch
fires once per run (the NaN then spreads everywhere). What happens at that moment (a log line, or a stop
in the debugger) is the harness's choice: `watch` only calls `found`.
"""

from __future__ import annotations

import inspect
from typing import Callable


def non_finite(value) -> bool:
    """Whether a floating tensor among `value` (a tensor, or tuples/lists/dicts of them) holds NaN or Inf."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    return False


def watched(module) -> bool:
    """Modules the NaN watch checks: blocks, attention, norms, linears, embedders — every module with weights
    or a norm — not parameterless pass-throughs (Dropout, SiLU, GELU's activation, containers), which cannot
    turn finite inputs into NaN/Inf and would only add a check per call."""
    import torch

    if isinstance(module, torch.nn.ModuleList):  # never called itself
        return False
    return "Norm" in type(module).__name__ or any(True for _ in module.parameters())


def watched_names(transformer) -> list[str]:
    return [n for n, m in transformer.named_modules() if watched(m)]


def watch(transformer, from_step: int, step: Callable[[], int], found: Callable) -> list[Callable[[], None]]:
    """Hook every watched module of `transformer`; from denoising step `from_step` on, the first output that
    holds NaN/Inf calls `found(qualname, module, named_inputs, args, kwargs, output)` once, and the hook
    returns what `found` returns (None keeps the module's output). Returns the undo functions."""
    state = {"fired": False}

    def hook_for(qualname: str, module):
        try:
            params = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            params = []

        def hook(mod, args, kwargs, output):
            if state["fired"] or step() < from_step or not non_finite(output):
                return None
            state["fired"] = True
            named = dict(zip(params, args))
            named.update(kwargs)
            return found(qualname, mod, named, args, kwargs, output)

        return hook

    undo = []
    for qualname, module in transformer.named_modules():
        if watched(module):
            undo.append(module.register_forward_hook(hook_for(qualname, module), with_kwargs=True).remove)
    return undo
