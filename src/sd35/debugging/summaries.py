"""Tensor summaries: one line per tensor (shape, dtype, device, min/max/mean/std, NaN/Inf counts).

Why its own module: two very different callers need the same one-liner — the SD35_BREAK harness (its
`summary` local at a stop and the log line when no debugger is attached) and the pydevd extension in
`pydevd_plugins/extensions`, which makes VS Code's Variables pane show these summaries instead of printing
walls of numbers. Statistics are computed on the tensor's own device and sampled above 2^20 elements (the
summary says so); each tensor is summarised once per stop (`new_stop()` clears the cache).
"""

from __future__ import annotations

import sys

SAMPLE_ELEMENTS = 1 << 20  # above this, statistics come from a fixed-size sample (said in the summary)
_SUMMARIES: dict = {}  # (id, version, ptr, shape, dtype) -> (weakref to the tensor, summary): this stop's cache
_STOPS = 0  # how many stops so far: a new stop clears the cache


def new_stop() -> int:
    """A new stop begins: summaries computed at the previous one are dropped (values may have changed)."""
    global _STOPS
    _STOPS += 1
    _SUMMARIES.clear()
    return _STOPS


def _sample(x, n: int = SAMPLE_ELEMENTS):
    """At most `n` elements of `x`, as a 1-D tensor on its device: a strided slice of a contiguous tensor (a
    view, no copy), a seeded random gather otherwise (no copy of the whole tensor either)."""
    import torch

    total = x.numel()
    if total <= n:
        return x.reshape(-1)
    if x.is_contiguous():
        return x.view(-1)[:: -(-total // n)][:n]
    g = torch.Generator(device=x.device).manual_seed(0)
    flat = torch.randint(0, total, (n,), generator=g, device=x.device)
    return x[torch.unravel_index(flat, x.shape)]


def _key(t):
    try:
        return (id(t), t._version, t.data_ptr() if t.device.type != "meta" else 0, tuple(t.shape), t.dtype)
    except Exception:  # noqa: BLE001 - tensor subclasses without storage: identity and shape only
        return (id(t), None, None, tuple(t.shape), t.dtype)


def tensor_summary(t) -> str:
    """`Tensor[2×64×1536] bfloat16 cuda:0 · min … max … mean … std … · nan 0 inf 0`, computed on the
    tensor's own device (only scalars come back to the host). Over SAMPLE_ELEMENTS elements the statistics
    are those of a fixed-size sample, and the summary says so. Computed once per stop (cached)."""
    key = _key(t)
    hit = _SUMMARIES.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    s = _tensor_summary(t)
    try:
        import weakref

        _SUMMARIES[key] = (weakref.ref(t), s)  # a weak reference: the cache never keeps a GPU tensor alive
    except TypeError:
        pass
    return s


def _tensor_summary(t) -> str:
    import torch

    try:
        shape = "×".join(str(s) for s in t.shape) or "scalar"
        kind = type(t).__name__
        inner = ""
        if kind not in ("Tensor", "Parameter"):  # torchao's Float8Tensor and friends
            qdata = getattr(t, "qdata", None)
            if qdata is not None:
                inner = f" [{kind}: {str(qdata.dtype).removeprefix('torch.')} data + scale {tuple(t.scale.shape)}]"
        head = f"{kind}[{shape}] {str(t.dtype).removeprefix('torch.')} {t.device}{inner}"
        if t.device.type == "meta" or t.numel() == 0:
            return head
        with torch.no_grad():
            x = t.dequantize() if inner and hasattr(t, "dequantize") else t
            if x.is_complex() or x.dtype == torch.bool:
                return head
            sampled = x.numel() > SAMPLE_ELEMENTS
            x = _sample(x.detach()).float()
            where = f" · stats of {x.numel():,} sampled" if sampled else ""
            in_sample = " in sample" if sampled else ""
            # two host syncs in all (a CUDA tensor's statistics come back together)
            nan, inf = (int(c) for c in torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist())
            vals = x[torch.isfinite(x)] if (nan or inf) else x
            if vals.numel() == 0:
                return f"{head}{where} · nan {nan} inf {inf}{in_sample}"
            mn, mx = torch.aminmax(vals)
            std = vals.std() if vals.numel() > 1 else torch.zeros((), device=vals.device)
            mn, mx, mean, std = torch.stack([mn, mx, vals.mean(), std]).tolist()
            return (f"{head}{where} · min {mn:.4g} max {mx:.4g} mean {mean:.4g} "
                    f"std {std:.4g} · nan {nan} inf {inf}{in_sample}")
    except Exception as exc:  # noqa: BLE001 - a summary must never break the debugger
        return f"{type(t).__name__} (summary failed: {exc})"


def short(t) -> str:
    """`Tensor[2×64×64] bfloat16 cpu`: shape, dtype and device only (no computation)."""
    try:
        return f"{type(t).__name__}[{'×'.join(str(s) for s in t.shape) or 'scalar'}] " \
               f"{str(t.dtype).removeprefix('torch.')} {t.device}"
    except Exception:  # noqa: BLE001
        return type(t).__name__


def holds_tensor(v, depth: int = 2, limit: int = 64) -> bool:
    """Whether a dict/list/tuple holds a tensor among its first `limit` items, `depth` levels deep."""
    torch = sys.modules.get("torch")
    if torch is None or depth < 0:
        return False
    items = list(v.values())[:limit] if isinstance(v, dict) else list(v[:limit]) if isinstance(v, (list, tuple)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return True
        if isinstance(item, (dict, list, tuple)) and holds_tensor(item, depth - 1, limit):
            return True
    return False


def container_summary(v, width: int = 400) -> str | None:
    """`{hidden_states: Tensor[2×64×64] bfloat16 cpu, temb: Tensor[2×64] bfloat16 cpu, …}` for a dict, list or
    tuple that holds tensors (None otherwise: the debugger shows it as usual). Shapes only, no values: each
    tensor's statistics are one click away (the tensor's own summary)."""
    if not isinstance(v, (dict, list, tuple)) or not holds_tensor(v):
        return None

    def one(x, depth=0):
        torch = sys.modules["torch"]
        if isinstance(x, torch.Tensor):
            return short(x)
        if isinstance(x, (dict, list, tuple)) and depth < 2 and holds_tensor(x, 1):
            return _render(x, depth + 1)
        r = repr(x) if not isinstance(x, (dict, list, tuple)) else f"{type(x).__name__}[{len(x)}]"
        return r if len(r) <= 40 else r[:37] + "…"

    def _render(c, depth):
        if isinstance(c, dict):
            parts, (op, cl) = [f"{k}: {one(x, depth)}" for k, x in list(c.items())[:16]], ("{", "}")
        else:
            parts = [one(x, depth) for x in c[:16]]
            op, cl = ("[", "]") if isinstance(c, list) else ("(", ")")
        more = f", … {len(c) - 16} more" if len(c) > 16 else ""
        return f"{op}{', '.join(parts)}{more}{cl}"

    text = _render(v, 0)
    name = type(v).__name__
    text = f"{name}[{len(v)}] {text}" if name in ("dict", "list", "tuple") else f"{name} {text}"
    return text if len(text) <= width else text[: width - 1] + "…"


def summarize(values: dict) -> dict[str, str]:
    """Summaries of every tensor among `values` (one level into lists, tuples and dicts)."""
    import torch

    out = {}
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            out[name] = tensor_summary(v)
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                if isinstance(item, torch.Tensor):
                    out[f"{name}[{i}]"] = tensor_summary(item)
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(item, torch.Tensor):
                    out[f"{name}[{k!r}]"] = tensor_summary(item)
    return out
