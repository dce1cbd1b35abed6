"""Debugging: stop inside diffusers' MMDiT, attention and scheduler at the step you choose.

Why a harness: a breakpoint in `JointTransformerBlock.forward` fires 4 steps × N blocks × 2 CFG
halves before the one you want, and a conditional breakpoint on a step counter needs a counter that
diffusers does not have. `SD35_BREAK=block.12@5` (or `sd35 generate --break …`) instead wraps exactly
the modules named, and when the denoising step matches, stops in one small frame of ours
(`_stop_here`) whose locals show the module, its named inputs and a summary of each tensor — and whose
next line calls the library, so one *Step Into* lands in `JointTransformerBlock.forward`, the joint
attention processor, `FlowMatchEulerDiscreteScheduler.step` or `AutoencoderKL.decode`.

Grammar: comma-separated `TARGET[@STEP]`, TARGET one of `transformer`, `block.K`, `attn.K`,
`scheduler`, `vae.decode`; STEP is the 0-based denoising step (default 0; ignored for vae.decode).

Without a debugger attached, a match is logged (with the tensor summaries) and the run goes on: a plain
run never hangs. Nothing is wrapped when SD35_BREAK is empty; an armed wrapper that does not match
costs one Python call and an integer comparison (measured in docs/benchmarks.md).

Also here: `tensor_summary` (used by the pydevd extension in `pydevd_plugins/extensions`, so the
Variables pane shows shape/dtype/device/stats instead of printing tensors), and `listen` for
`SD35_DEBUGPY=127.0.0.1:5678`.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from dataclasses import dataclass, field

from .errors import InputError

log = logging.getLogger(__name__)

TARGETS = ("transformer", "block", "attn", "scheduler", "vae.decode")
_ITEM = re.compile(r"^(transformer|scheduler|vae\.decode|block\.(\d+)|attn\.(\d+))(?:@(\d+))?$")
STATS_MAX_ELEMENTS = 1 << 28  # above this, a summary gives shape/dtype/device only


# --- the grammar -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Break:
    target: str  # transformer | block | attn | scheduler | vae.decode
    index: int | None  # K for block.K / attn.K
    step: int  # 0-based denoising step

    def __str__(self) -> str:
        name = f"{self.target}.{self.index}" if self.index is not None else self.target
        return name if self.target == "vae.decode" else f"{name}@{self.step}"


def parse(spec: str | None) -> list[Break]:
    """Parse SD35_BREAK. Raises InputError naming the bad item and the grammar."""
    breaks = []
    for item in (spec or "").replace(" ", "").split(","):
        if not item:
            continue
        m = _ITEM.match(item)
        if not m:
            raise InputError(
                f"SD35_BREAK item {item!r} is not TARGET[@STEP].",
                "use comma-separated items such as block.12@5, attn.3@0, scheduler@5, transformer@2, vae.decode "
                "(TARGET: transformer | block.K | attn.K | scheduler | vae.decode; STEP: 0-based denoising step).",
                param="break",
            )
        name, k_block, k_attn, step = m.groups()
        target = name.split(".")[0] if (k_block or k_attn) else name
        index = int(k_block or k_attn) if (k_block or k_attn) else None
        breaks.append(Break(target, index, int(step) if step else 0))
    return breaks


def validate(breaks: list[Break], pipe, steps: int | None = None) -> None:
    """Check indices against the loaded model (and steps against the run) before generating."""
    n_blocks = len(pipe.transformer.transformer_blocks)
    for b in breaks:
        if b.index is not None and not 0 <= b.index < n_blocks:
            raise InputError(
                f"SD35_BREAK {b}: the loaded transformer has blocks 0…{n_blocks - 1}.",
                f"pick K < {n_blocks}.", param="break")
        if steps is not None and b.target != "vae.decode" and b.step >= steps:
            raise InputError(f"SD35_BREAK {b}: the run has steps 0…{steps - 1}.",
                             f"pick a step below {steps}, or pass --steps {b.step + 1}.", param="break")


# --- tensor summaries ----------------------------------------------------------------------------------

def tensor_summary(t) -> str:
    """`Tensor[2, 64, 1536] bfloat16 cuda:0 · min … max … mean … std … · nan 0 inf 0`, computed on the
    tensor's own device (only scalars come back to the host)."""
    import torch

    try:
        shape = "×".join(str(s) for s in t.shape) or "scalar"
        kind = type(t).__name__
        inner = ""
        if kind not in ("Tensor", "Parameter"):  # torchao's Float8Tensor and friends
            qdata = getattr(t, "qdata", None)
            if qdata is not None:
                inner = f" [{kind}: {str(qdata.dtype).removeprefix('torch.')} data + scale {tuple(t.scale.shape)}]"
        head = f"{kind if kind != 'Parameter' else 'Parameter'}[{shape}] {str(t.dtype).removeprefix('torch.')} {t.device}{inner}"
        if t.device.type == "meta" or t.numel() == 0:
            return head
        if t.numel() > STATS_MAX_ELEMENTS:
            return f"{head} · stats skipped ({t.numel():,} elements)"
        with torch.no_grad():
            x = t.dequantize() if inner and hasattr(t, "dequantize") else t
            if x.is_complex() or x.dtype == torch.bool:
                return head
            x = x.detach().float()
            finite = torch.isfinite(x)
            nan = int(torch.isnan(x).sum().item())
            inf = int(torch.isinf(x).sum().item())
            vals = x[finite] if (nan or inf) else x
            if vals.numel() == 0:
                return f"{head} · nan {nan} inf {inf}"
            mn, mx = torch.aminmax(vals)
            std = vals.std().item() if vals.numel() > 1 else 0.0
            return (f"{head} · min {mn.item():.4g} max {mx.item():.4g} mean {vals.mean().item():.4g} "
                    f"std {std:.4g} · nan {nan} inf {inf}")
    except Exception as exc:  # noqa: BLE001 - a summary must never break the debugger
        return f"{type(t).__name__} (summary failed: {exc})"


def summarize(values: dict) -> dict[str, str]:
    """Summaries of every tensor among `values` (one level into lists and tuples)."""
    import torch

    out = {}
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            out[name] = tensor_summary(v)
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                if isinstance(item, torch.Tensor):
                    out[f"{name}[{i}]"] = tensor_summary(item)
    return out


# --- the harness ----------------------------------------------------------------------------------------

def debugger_attached() -> bool:
    """A debugpy client is connected. debugpy is looked up, not imported: VS Code injects its own copy."""
    debugpy = sys.modules.get("debugpy")
    try:
        return bool(debugpy and debugpy.is_client_connected())
    except Exception:  # noqa: BLE001
        return False


def _stop_here(where: str, module, inputs: dict, summary: dict, call, args: tuple, kwargs: dict):
    """SD35_BREAK matched. Locals: `where`, `module`, `inputs` (named), `summary` (one line per tensor).
    The debugger stops on the `return` line: Step Into (F11) enters the library's own code."""
    if debugger_attached():
        sys.modules["debugpy"].breakpoint()
    return call(*args, **kwargs)


@dataclass
class Harness:
    pipe: object
    breaks: list[Break]
    hits: list[str] = field(default_factory=list)
    _undo: list = field(default_factory=list)

    def step(self) -> int:
        """The denoising step in progress (the scheduler's own counter; None before its first step)."""
        return self.pipe.scheduler.step_index or 0

    def _wrap(self, owner, attr: str, where, matches) -> None:
        """Replace `owner.attr` (a bound method or a callable object) by a wrapper that calls
        `_stop_here` when `matches()` is true, and the original otherwise."""
        original = getattr(owner, attr)
        had_instance_attr = attr in vars(owner)
        try:
            params = list(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            params = []
        harness = self

        def fire(args, kwargs):
            label = where()
            named = dict(zip(params, args))
            named.update(kwargs)
            summary = summarize(named)
            harness.hits.append(label)
            if not debugger_attached():
                log.info("SD35_BREAK %s matched (no debugger attached, continuing): %s", label,
                         "; ".join(f"{k}={v}" for k, v in summary.items()) or "no tensor inputs")
            return label, named, summary

        if attr == "processor":  # an attention processor object: see hooks.ProcessorProxy
            from .hooks import proxy_processor

            def intercept(processor, call_args, kwargs):
                if matches():
                    label, named, summary = fire(call_args, kwargs)
                    return _stop_here(label, call_args[0], named, summary, processor, call_args, kwargs)
                return processor(*call_args, **kwargs)

            self._undo.append(proxy_processor(owner, intercept))
            return

        def wrapper(*args, **kwargs):
            if matches():
                label, named, summary = fire(args, kwargs)
                return _stop_here(label, owner, named, summary, original, args, kwargs)
            return original(*args, **kwargs)

        setattr(owner, attr, wrapper)

        def undo():
            if had_instance_attr:
                setattr(owner, attr, original)
            else:
                try:
                    delattr(owner, attr)
                except AttributeError:
                    pass

        self._undo.append(undo)

    def disarm(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def arm(pipe, breaks: list[Break]) -> Harness | None:
    """Wrap exactly the modules `breaks` name. Returns None (and wraps nothing) for no breaks."""
    if not breaks:
        return None
    h = Harness(pipe, breaks)
    by_target: dict[tuple, list[Break]] = {}
    for b in breaks:
        by_target.setdefault((b.target, b.index), []).append(b)
    for (target, index), items in by_target.items():
        steps = {b.step for b in items}
        name = f"{target}.{index}" if index is not None else target

        def at_step(steps=steps):
            return h.step() in steps

        def where(name=name):
            return name if name == "vae.decode" else f"{name}@{h.step()}"

        if target == "transformer":
            h._wrap(pipe.transformer, "forward", where, at_step)
        elif target == "block":
            h._wrap(pipe.transformer.transformer_blocks[index], "forward", where, at_step)
        elif target == "attn":
            h._wrap(pipe.transformer.transformer_blocks[index].attn, "processor", where, at_step)
        elif target == "scheduler":
            h._wrap(pipe.scheduler, "step", where, at_step)
        elif target == "vae.decode":
            h._wrap(pipe.vae, "decode", where, lambda: True)
    log.info("SD35_BREAK armed: %s", ", ".join(str(b) for b in breaks))
    return h


# --- SD35_DEBUGPY: attach VS Code to a running process (sd35/attach.py) -------------------------------------

def listen(address: str | None, *, wait: bool = False, allow_remote: bool = False,
           allow_listen: bool = False) -> tuple[str, int] | None:
    """SD35_DEBUGPY before the model loads: connect out to VS Code's listening debugger (the default), or
    listen on explicit opt-in. The policy is in `sd35.attach`."""
    from .attach import start

    return start(address, wait=wait, allow_remote=allow_remote, allow_listen=allow_listen)
