"""debugpy/pydevd extension: torch tensors in the Variables pane as shape, dtype, device and statistics.

Why: pydevd's default display calls `repr(tensor)`, which formats values — for a CUDA tensor that means
copies to the host and, for a large one, a frozen Variables pane. This extension shows
`Tensor[2×4096×1536] bfloat16 cuda:0 · min … max … mean … std … · nan 0 inf 0`, computed on the tensor's
own device (only scalars come back), and expands to shape/dtype/device/stats fields instead of rows of
numbers. FP8 tensors and torchao's quantized weights (`Float8Tensor`) show their data dtype and scales.

A dict, list or tuple that holds tensors (the harness's `inputs`, `args`, `kwargs`, a block's output tuple)
shows as `dict[3] {hidden_states: Tensor[2×4096×1536] bfloat16 cuda:0, …}` instead of pydevd's default
`str(container)`, which formats every tensor in it (a ~480-character wall, and a copy to the host per
tensor). Containers without tensors keep pydevd's default display (the provider answers None). Summaries
are computed once per stop (`sd35.debugging.summaries.tensor_summary` caches them) and sampled for large tensors.

pydevd finds it because `pydevd_plugins.extensions` is a namespace package and this module's name starts
with `pydevd_plugin` (see debugpy's bundled pydevd_plugins/extensions/README.md).
"""

import sys

from _pydevd_bundle.pydevd_extension_api import StrPresentationProvider, TypeResolveProvider


def _summary(t):
    try:
        from sd35.debugging.summaries import tensor_summary
    except Exception:  # noqa: BLE001 - outside the workspace: a minimal summary without stats
        return f"{type(t).__name__}[{'×'.join(map(str, t.shape))}] {t.dtype} {t.device}"
    return tensor_summary(t)


def _container_summary(v):
    try:
        from sd35.debugging.summaries import container_summary
    except Exception:  # noqa: BLE001 - outside the workspace: pydevd's default display
        return None
    try:
        return container_summary(v)
    except Exception:  # noqa: BLE001 - never break the Variables pane
        return None


def _is_tensor_type(type_object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(type_object, type) and issubclass(type_object, torch.Tensor)


class TorchTensorProvider(TypeResolveProvider, StrPresentationProvider):
    def can_provide(self, type_object, type_name):
        return _is_tensor_type(type_object)

    def get_str(self, val):
        return _summary(val)

    def get_dictionary(self, var):
        d = {
            "summary": _summary(var),
            "shape": tuple(var.shape),
            "dtype": str(var.dtype),
            "device": str(var.device),
            "numel": var.numel(),
            "requires_grad": bool(getattr(var, "requires_grad", False)),
        }
        qdata = getattr(var, "qdata", None)
        if qdata is not None:  # torchao quantized tensor: its parts, summarised the same way
            d["qdata"] = _summary(qdata)
            scale = getattr(var, "scale", None)
            if scale is not None:
                d["scale"] = _summary(scale)
        return d

    def resolve(self, var, attribute):
        return self.get_dictionary(var).get(attribute)


class TensorContainerStrProvider(StrPresentationProvider):
    """The one-line value of a dict/list/tuple (and subclasses: OrderedDict, diffusers' outputs) that holds
    tensors. Only the value string: expanding it still uses pydevd's own dict/list resolvers, whose tensor
    children then show through TorchTensorProvider above."""

    def can_provide(self, type_object, type_name):
        # decided per type and cached by pydevd: answer by type only (torch may not be imported yet)
        return isinstance(type_object, type) and issubclass(type_object, (dict, list, tuple))

    def get_str(self, val):
        return _container_summary(val)  # None: no tensors inside, pydevd falls back to its default
