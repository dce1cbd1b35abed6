"""Debugging: stop inside diffusers' MMDiT, attention and scheduler at the step you choose.

Why a harness: a breakpoint in `JointTransformerBlock.forward` fires 4 steps × N blocks × 2 CFG
halves before the one you want, and a conditional breakpoint on a step counter needs a counter that
diffusers does not have. `SD35_BREAK=block.12@5` (or `sd35 generate --break …`) instead wraps exactly
the modules named, and when the denoising step matches, stops in one small frame of ours
(`_stop_here`) whose locals show the module, its named inputs and a summary of each tensor — and whose
next line calls the library, so one *Step Into* lands in `JointTransformerBlock.forward`, the joint
attention processor, `FlowMatchEulerDiscreteScheduler.step` or `AutoencoderKL.decode`.

Grammar: comma-separated `TARGET[@STEP]`, TARGET one of `transformer`, `block.K`, `attn.K`,
`scheduler`, `vae.decode`, `nan`; STEP is the 0-based denoising step (default 0; ignored for vae.decode;
for `nan`, the first step watched). `nan` hooks every module of the transformer with weights or a norm and
stops after the first (innermost) one whose output holds NaN/Inf.

At a stop, the frame also offers `sd35_dump()` and `compare_bf16()` (see `atstop.py`).

Without a debugger attached, a match is logged (with the tensor summaries) and the run goes on: a plain
run never hangs. Nothing is wrapped when SD35_BREAK is empty; an armed wrapper that does not match
costs one Python call and an integer comparison (measured in docs/benchmarks.md).

Tensor summaries are in `summaries.py` (shared with the pydevd extension), the NaN watch's hooks in
`nanwatch.py`; this module owns the grammar, the wrappers and the stop frame. Also here: `listen` for
`SD35_DEBUGPY=127.0.0.1:5678`.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sd35.debugging import nanwatch
from sd35.debugging.summaries import new_stop, summarize
from sd35.errors import InputError

log = logging.getLogger(__name__)

TARGETS = ("transformer", "block", "attn", "scheduler", "vae.decode", "nan")
_ITEM = re.compile(r"^(transformer|scheduler|vae\.decode|nan|block\.(\d+)|attn\.(\d+))(?:@(\d+))?$")
GRAMMAR_FIX = ("use comma-separated items such as block.12@5, attn.3@0, scheduler@5, transformer@2, vae.decode, "
               "nan, nan@5 (TARGET: transformer | block.K | attn.K | scheduler | vae.decode | nan; STEP: 0-based "
               "denoising step — for nan, the step from which outputs are watched).")


# --- the grammar -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Break:
    target: str  # transformer | block | attn | scheduler | vae.decode | nan
    index: int | None  # K for block.K / attn.K
    step: int  # 0-based denoising step (nan: the first step watched)

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
            raise InputError(f"SD35_BREAK item {item!r} is not TARGET[@STEP].", GRAMMAR_FIX, param="break")
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


# --- the harness ----------------------------------------------------------------------------------------

def debugger_attached() -> bool:
    """A debugpy client is connected. debugpy is looked up, not imported: VS Code injects its own copy."""
    debugpy = sys.modules.get("debugpy")
    try:
        return bool(debugpy and debugpy.is_client_connected())
    except Exception:  # noqa: BLE001
        return False


class _Missing:
    def __repr__(self) -> str:
        return "not computed yet (the module runs on the next line)"


NOT_YET = _Missing()


def _stop_here(where: str, module, inputs: dict, summary: dict, call, args: tuple, kwargs: dict,
               output=NOT_YET, name: str | None = None, tools=None):
    """SD35_BREAK matched. Locals: `where`, `name` (the module's qualified name in the transformer),
    `module`, `inputs` (named), `summary` (one line per tensor), `output` (after the module ran: nan),
    and three tools for the Debug Console:
      `sd35_dump()`      writes inputs (+ output) to <out>/debug/*.safetensors + .json; returns the path
      `compare_bf16()`   this module's output with bf16 weights vs FP8: fills and returns `fp8_vs_bf16`
      `fp8_vs_bf16`      {} until compare_bf16() runs: rel_err, cosine, bf16_output, weights (their source)
    The debugger stops on the `return` line: Step Into (F11) enters the library's own code."""
    sd35_dump, compare_bf16, fp8_vs_bf16 = tools.bind(where, name, module, inputs, output, call, args, kwargs) \
        if tools is not None else (None, None, {})
    if debugger_attached():
        sys.modules["debugpy"].breakpoint()
    return call(*args, **kwargs)


@dataclass
class _Tools:
    """Builds the stop frame's `sd35_dump` and `compare_bf16` (see sd35.debugging.atstop)."""

    harness: "Harness"

    def bind(self, where, name, module, inputs, output, call, args, kwargs):
        from sd35.debugging import atstop

        h = self.harness
        known = None if output is NOT_YET else output
        result: dict = {}

        def sd35_dump() -> str:
            path = atstop.dump(h.out_dir, where, h.step(), name, inputs, known)
            log.info("SD35_BREAK %s: tensors written to %s (+ .json)", where, path)
            return path

        def compare_bf16() -> dict:
            if name is None:
                result.update({"error": f"{where} is outside the transformer: it has no FP8 weights"})
                return result
            folder = getattr(getattr(h.pipe.transformer, "config", None), "_name_or_path", None)
            result.clear()
            result.update(atstop.compare_bf16(module, name, folder, call, args, kwargs, known))
            return result

        return sd35_dump, compare_bf16, result


@dataclass
class Harness:
    pipe: object
    breaks: list[Break]
    out_dir: Path = Path("outputs")
    hits: list[str] = field(default_factory=list)
    _undo: list = field(default_factory=list)

    def step(self) -> int:
        """The denoising step in progress (the scheduler's own counter; None before its first step)."""
        scheduler = self.pipe.scheduler  # an edit starts part-way into the schedule: its first step is 0 too
        if scheduler.step_index is None:
            return 0
        return scheduler.step_index - (getattr(scheduler, "begin_index", None) or 0)

    def _fire(self, label: str, named: dict) -> dict:
        """A match: a new stop (fresh summary cache), recorded and, without a debugger, logged."""
        new_stop()
        summary = summarize(named)
        self.hits.append(label)
        if not debugger_attached():
            log.info("SD35_BREAK %s matched (no debugger attached, continuing): %s", label,
                     "; ".join(f"{k}={v}" for k, v in summary.items()) or "no tensor inputs")
        return summary

    def _wrap(self, owner, attr: str, where, matches, name: str | None = None) -> None:
        """Replace `owner.attr` (a bound method or a callable object) by a wrapper that calls
        `_stop_here` when `matches()` is true, and the original otherwise."""
        original = getattr(owner, attr)
        had_instance_attr = attr in vars(owner)
        try:
            params = list(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            params = []
        harness, tools = self, _Tools(self)

        def fire(args, kwargs):
            label = where()
            named = dict(zip(params, args))
            named.update(kwargs)
            return label, named, harness._fire(label, named)

        if attr == "processor":  # an attention processor object: see hooks.ProcessorProxy
            from sd35.debugging.hooks import proxy_processor

            def intercept(processor, call_args, kwargs):
                if matches():
                    label, named, summary = fire(call_args, kwargs)
                    return _stop_here(label, call_args[0], named, summary, processor, call_args, kwargs,
                                      name=name, tools=tools)
                return processor(*call_args, **kwargs)

            self._undo.append(proxy_processor(owner, intercept))
            return

        def wrapper(*args, **kwargs):
            if matches():
                label, named, summary = fire(args, kwargs)
                return _stop_here(label, owner, named, summary, original, args, kwargs, name=name, tools=tools)
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

    def watch_nan(self, from_step: int) -> None:
        """SD35_BREAK=nan[@STEP]: the NaN watch (`nanwatch.watch`) from `from_step` on; its first finding is
        logged, or stops in `_stop_here` when a debugger is attached."""
        self._undo.extend(nanwatch.watch(self.pipe.transformer, from_step, self.step, self._nan_found))

    def _nan_found(self, qualname: str, mod, named: dict, args: tuple, kwargs: dict, output):
        """The first non-finite output: recorded, then logged (no debugger) or stopped at."""
        step = self.step()
        label, shown = f"nan@{step}", qualname or "transformer"
        new_stop()
        summary = summarize(named)
        out = summarize({"output": output})
        self.hits.append(f"{label} {shown}")
        upstream = nanwatch.non_finite(args) or nanwatch.non_finite(kwargs)
        if not debugger_attached():
            log.warning("SD35_BREAK nan: first non-finite output at %s (%s), step %d: %s; inputs: %s%s "
                        "(no debugger attached, continuing)", shown, type(mod).__name__, step,
                        "; ".join(f"{k}={v}" for k, v in out.items()),
                        "; ".join(f"{k}={v}" for k, v in summary.items()) or "no tensor inputs",
                        " — its inputs already hold NaN/Inf: the cause is earlier (a step before "
                        f"{step}? watch from an earlier step)" if upstream else "")
            return None
        summary.update(out)
        # Step Into re-runs the module's forward on the same inputs: watch the NaN appear.
        return _stop_here(f"{label} {shown}", mod, named, summary, mod.forward, args, kwargs,
                          output=output, name=qualname, tools=_Tools(self))

    def report_nan_watch(self) -> None:
        """After a generation with `nan` armed: a run whose watch found nothing says so (silence would read
        as "not armed"). The watch fires once per arming, so after a finding it stays quiet."""
        nan = [b for b in self.breaks if b.target == "nan"]
        if nan and not any(h.startswith("nan@") for h in self.hits):
            log.info("SD35_BREAK nan: no non-finite output in the %d watched modules of the transformer from "
                     "step %d to the end of the run", len(self.watched_modules()), min(b.step for b in nan))

    def watched_modules(self) -> list[str]:
        return nanwatch.watched_names(self.pipe.transformer)

    def disarm(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def arm(pipe, breaks: list[Break], out_dir: Path | str | None = None) -> Harness | None:
    """Wrap exactly the modules `breaks` name. Returns None (and wraps nothing) for no breaks.
    `out_dir` is where `sd35_dump()` writes (SD35_OUTPUT_DIR; default ./outputs)."""
    if not breaks:
        return None
    h = Harness(pipe, breaks, Path(out_dir) if out_dir else Path("outputs"))
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
            h._wrap(pipe.transformer, "forward", where, at_step, name="")
        elif target == "block":
            h._wrap(pipe.transformer.transformer_blocks[index], "forward", where, at_step,
                    name=f"transformer_blocks.{index}")
        elif target == "attn":
            h._wrap(pipe.transformer.transformer_blocks[index].attn, "processor", where, at_step,
                    name=f"transformer_blocks.{index}.attn")
        elif target == "scheduler":
            h._wrap(pipe.scheduler, "step", where, at_step)
        elif target == "vae.decode":
            h._wrap(pipe.vae, "decode", where, lambda: True)
        elif target == "nan":
            h.watch_nan(min(steps))
    log.info("SD35_BREAK armed: %s", ", ".join(str(b) for b in breaks))
    return h


# --- SD35_DEBUGPY: attach VS Code to a running process (debugging/attach.py) -------------------------------------

def listen(address: str | None, *, wait: bool = False, allow_remote: bool = False,
           allow_listen: bool = False) -> tuple[str, int] | None:
    """SD35_DEBUGPY before the model loads: connect out to VS Code's listening debugger (the default), or
    listen on explicit opt-in. The policy is in `sd35.debugging.attach`."""
    from sd35.debugging.attach import start

    return start(address, wait=wait, allow_remote=allow_remote, allow_listen=allow_listen)
