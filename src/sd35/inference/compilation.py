"""torch.compile for the MMDiT: which mode a run uses, why, and the kernel cache that outlives a process.

Why: torchao's FP8 modes wrap every matmul in quantize/scale kernels. Run eagerly those are extra
kernel launches and memory passes, so FP8 can be *slower* than bf16; compiled, inductor fuses them
into the matmul's prologue/epilogue and FP8 pays off (diffusers + torchao publish this for Flux on an
H100). So compilation is part of the precision story, and like precision it is resolved once, at load
time, and recorded with its reason.

Modes (`SD35_COMPILE` / `--compile`):
- `off`: eager. Always the case while debugging (SD35_BREAK, SD35_DEBUGPY, or a debugger attached):
  breakpoints inside compiled frames are never hit.
- `blocks`: regional compilation — every `JointTransformerBlock` compiled on its own. SD3.5's blocks
  share one structure, so inductor compiles one block and reuses the graph for the others (the FX graph
  cache keys on the graph, not the module): seconds, not minutes. diffusers' `compile_repeated_blocks`
  does this where a model declares `_repeated_blocks`; SD3Transformer2DModel does not, so we do it by hand.
- `full`: the whole transformer as one graph (longest compile, fewest graph breaks).
- `auto` (default): `blocks` for `sd35 serve` on a CUDA GPU (compiled once, used for every request),
  `off` elsewhere: a one-off CLI run pays the compile for a single image, and on a CPU inductor's
  kernels are measured in docs/benchmarks.md (`sd35 bench speed`) rather than assumed to help.

New sizes and batches: in `blocks` mode each block's inputs are marked dynamic before its compiled call
(`_dynamic_inputs`: the batch of all three, the image sequence of `hidden_states`), so the first compile is
already symbolic in both and every size and `n` reuses it. A batch of 1 (n=1 without CFG) is still its own
graph (torch specializes size-1 dimensions). The warm-up (`Runtime.warm_up`), compiled, runs n=1 with CFG,
n=2 with CFG at another size and n=1 without CFG, and no request pays a recompile: `compiles()` counts
every dynamo compilation, and /metrics' `sd35_recompiles_total` (those after READY) must stay 0.
Why marking rather than letting the warm-up's second size trigger torch's automatic dynamic shapes (what
this did before): the blocks share one code object, so dynamo's recompile limit (8 graphs per frame)
covers all of a model's block variants together. Three variants (Medium, the tiny model) × three graphs
(static, automatic-dynamic, batch 1) is 9: the 9th was refused and that block then ran *eager* for every
n=1-without-CFG request, silently. Marked: two graphs per variant, and the warm-up compiled 10–27 % faster
(`sd35 bench dynamic`, docs/benchmarks.md). A hit of the limit is counted (`limit_hits()`) and logged with its fix.
(`torch.compile(dynamic=True)` on a module did not make the sequence symbolic here: its guards still
failed on the new length.)

The kernel cache: inductor's FX-graph and Triton caches go to `SD35_COMPILE_CACHE` (default
`~/.cache/sd35-compile`; the systemd unit's `CacheDirectory=`, the image's home), one folder per torch
version, so a restart reuses the kernels. The cache hits and misses of this process are recorded.

Why the cache must be private: inductor unpickles cached graphs and imports the `.py` files it generated
from that folder, so whoever can write there runs code as the service (which reads HF_TOKEN and the keys
file). We create it 0700 and refuse one that another account can write — the folder, a parent, or
anything inside a folder others can enter: a warning and a compile without the cache (a fresh private
temporary folder), or exit 2 when SD35_COMPILE_CACHE names it explicitly. `sd35 doctor` says the same.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sd35.errors import InputError

log = logging.getLogger(__name__)

MODES = ("auto", "off", "blocks", "full")


@dataclass
class CompilePlan:
    mode: str  # off | blocks | full
    reason: str
    cache_dir: str | None = None
    seconds: float | None = None  # wall time of the first compiled generation (compile + one run)
    cache: dict = field(default_factory=dict)  # fxgraph cache hits/misses in this process
    compiles_at_ready: int | None = None  # dynamo compilations when the warm-up ended (serve)

    def as_dict(self) -> dict:
        return asdict(self)


def debugging_reason(settings) -> str | None:
    """Why this process must stay eager for the debugger, or None."""
    if settings.breaks:
        return "SD35_BREAK is set: debugging stays eager (breakpoints in compiled frames are never hit)"
    if settings.debugpy:
        return "SD35_DEBUGPY is set: debugging stays eager"
    debugpy = sys.modules.get("debugpy")
    try:
        if debugpy is not None and debugpy.is_client_connected():
            return "a debugger is attached: debugging stays eager"
    except Exception:  # noqa: BLE001
        pass
    if sys.gettrace() is not None and "pydevd" in sys.modules:
        return "running under a debugger: debugging stays eager"
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        return "TORCHDYNAMO_DISABLE=1: torch.compile is disabled in this process"
    return None


def resolve(settings, *, device: str, purpose: str) -> CompilePlan:
    """The compile mode for this run. `purpose` is "serve" (compiled once, many requests) or "generate"."""
    requested = getattr(settings, "compile", "auto")
    if requested not in MODES:
        raise InputError(f"unknown compile mode {requested!r}.",
                         f"use one of {', '.join(MODES)} (--compile or SD35_COMPILE).", param="compile")
    eager = debugging_reason(settings)
    if eager:
        if requested not in ("auto", "off"):
            log.warning("compile=%s ignored: %s", requested, eager)
        return CompilePlan("off", eager)
    needs = requested not in ("auto", "off") or (device.startswith("cuda") and purpose == "serve")
    cache = private_cache(settings) if needs else None  # only a run that compiles touches the cache
    if requested != "auto":
        return CompilePlan(requested, "requested", cache)
    if device.startswith("cuda") and purpose == "serve":
        return CompilePlan("blocks", "auto: serve on CUDA compiles the MMDiT blocks once, during warm-up", cache)
    if device.startswith("cuda"):
        return CompilePlan("off", "auto: a one-off run would pay the compile for a single image "
                           "(--compile blocks to compile anyway)")
    return CompilePlan("off", "auto: CPU (compiled CPU kernels are measured by `sd35 bench speed`, not assumed)")


_TREE_LIMIT = 50_000  # folders looked at inside a cache others can enter


def cache_root(settings) -> Path:
    from sd35.settings import default_compile_cache

    return Path(getattr(settings, "compile_cache", None) or default_compile_cache()).expanduser()


def cache_dir(settings) -> Path:
    """Where compiled kernels are kept: SD35_COMPILE_CACHE (default ~/.cache/sd35-compile), per torch version."""
    import torch

    return cache_root(settings) / f"torch-{torch.__version__.split('+')[0]}"


def cache_problem(path: Path) -> str | None:
    """Why another account could plant code in the compile cache `path`, or None when only we (and root) can
    write it: every existing parent and the folder itself owned by us or root and not writable by others
    (a sticky parent like /tmp is fine), and, when others may enter the folder, nothing inside theirs."""
    me = os.geteuid()
    path = Path(os.path.abspath(path))
    for part in [*reversed(path.parents), path]:
        try:
            st = part.lstat()
        except FileNotFoundError:
            return None  # the rest will be created by us, 0700
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (me, 0):
            return f"{part} belongs to another account (uid {st.st_uid})"
        if mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX and part != path):
            return f"{part} (mode {mode:04o}) can be written by other accounts"
    if not stat.S_ISDIR(path.lstat().st_mode):
        return f"{path} is not a folder"
    if stat.S_IMODE(path.stat().st_mode) & 0o011:  # others can enter it: what is inside matters too
        for i, (root, dirs, files) in enumerate(os.walk(path)):
            if i > _TREE_LIMIT:
                return f"{path} is open to other accounts and too large to check"
            for name in dirs + files:
                st = os.lstat(os.path.join(root, name))
                if st.st_uid not in (me, 0) or stat.S_IMODE(st.st_mode) & 0o022:
                    return f"{os.path.join(root, name)} can be written by other accounts"
    return None


def private_cache(settings) -> str | None:
    """The compile cache folder, created 0700, or None (compile without a cache) when it is not private.
    Raises InputError (exit 2) when SD35_COMPILE_CACHE was set explicitly and is not private or usable."""
    explicit = getattr(settings, "compile_cache", None) is not None
    root, path = cache_root(settings), cache_dir(settings)
    fix = ("point SD35_COMPILE_CACHE at a folder only this account can write (the systemd unit: CacheDirectory=, "
           f"docs/hosting.md), or, if {root} is this account's own, chmod 0700 it")
    problem = cache_problem(root)
    if problem is None:
        try:
            for part in [*reversed(path.parents), path]:  # missing parents 0700 too (whatever the umask)
                if not part.exists():
                    try:
                        part.mkdir(mode=0o700)
                    except FileExistsError:  # made meanwhile: checked below
                        pass
        except OSError as exc:
            problem = f"cannot create {path}: {exc.strerror}"
            fix = "point SD35_COMPILE_CACHE at a folder this account can write (mode 0700)"
        else:
            problem = cache_problem(root)  # as it is now (made meanwhile by someone else?)
    if problem is None:
        return str(path)
    if explicit:
        raise InputError(f"SD35_COMPILE_CACHE={root} is not safe to compile into: {problem} (inductor imports "
                         "code from it: whoever can write there runs code as this process).", fix,
                         param="compile_cache")
    log.warning("not using the compile cache %s: %s; compiling without a cache this time. Fix: %s", root, problem,
                fix)
    return None


def _use_cache(path: str | None) -> None:
    """Point inductor (and Triton) at `path`, or (None) at a fresh private folder with the caches off: its
    default, /tmp/torchinductor_USER, is as plantable as any shared folder. Run before the first compile."""
    if path is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sd35-inductor-")
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def apply(transformer, plan: CompilePlan, *, mark_dynamic: bool = True, backend: str = "inductor") -> CompilePlan:
    """Compile `transformer` in place for `plan.mode` (compilation itself happens at the first call).
    For `sd35 bench dynamic`: `mark_dynamic=False` leaves the shapes to torch's automatic dynamic shapes, and
    `backend="eager"` traces with dynamo only (graph counts in seconds, no kernels)."""
    if plan.mode == "off":
        return plan
    _use_cache(plan.cache_dir)
    count_compiles()
    if plan.mode == "blocks":
        for block in transformer.transformer_blocks:
            block.compile(backend=backend)
            if mark_dynamic:
                block._compiled_call_impl = _dynamic_inputs(block._compiled_call_impl)
    elif plan.mode == "full":
        transformer.compile(backend=backend)
    log.info("compile: %s (%s); kernel cache %s", plan.mode, plan.reason, plan.cache_dir)
    return plan


def _dynamic_inputs(compiled):
    """`compiled` (a block's compiled call) with its inputs' batch and image-sequence dimensions marked
    dynamic first (New sizes, above). Marked outside the compiled frame: dynamo reads the marks on entry.
    `maybe_mark_dynamic`: a diffusers version whose block specializes a dimension gets a static graph
    (counted, and the warm-up still covers the shapes), not an error."""
    import torch

    def call(*args, **kwargs):
        names = ("hidden_states", "encoder_hidden_states", "temb")
        tensors = [kwargs.get(n, args[i] if i < len(args) else None) for i, n in enumerate(names)]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if isinstance(tensors[0], torch.Tensor) and tensors[0].dim() == 3:
            torch._dynamo.maybe_mark_dynamic(tensors[0], 1)
        return compiled(*args, **kwargs)

    return call


_COMPILES = {"count": 0, "counting": False, "since": None, "limit_hits": 0}


class _LimitHits:
    """Counts dynamo's "hit config.recompile_limit" warnings: past it a frame runs eager, silently slower."""

    def filter(self, record) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config."):
            _COMPILES["limit_hits"] += 1
            log.warning("torch.compile gave up on a frame (dynamo's recompile limit): it runs eager from now on, "
                        "slower. The warm-up should have covered every shape: please report it with the log of "
                        "TORCH_LOGS=recompiles; SD35_COMPILE=off avoids it meanwhile")
        return True


def _started(args) -> None:
    from torch._dynamo import callback

    if args.callback_trigger == callback.CallbackTrigger.DYNAMO:
        _COMPILES["count"] += 1
    _COMPILES["since"] = time.monotonic()


def _ended(args) -> None:
    _COMPILES["since"] = None


def count_compiles() -> None:
    """From now on, count every dynamo compilation of this process, and note when one is under way. Called
    by every `apply`: `torch._dynamo.reset()` (a keep-alive release, `bench gpu`) drops dynamo's callbacks,
    so they are registered again whenever they are missing."""
    from torch._dynamo import callback

    if _started not in callback.callback_handler.start_callbacks:
        callback.on_compile_start(_started)
    if _ended not in callback.callback_handler.end_callbacks:
        callback.on_compile_end(_ended)
    if not _COMPILES["counting"]:  # the log filter survives a reset
        logging.getLogger("torch._dynamo.convert_frame").addFilter(_LimitHits())
        _COMPILES["counting"] = True


def compiling_for() -> float | None:
    """Seconds the compilation under way has taken so far; None when none is. Why: a compile inside a
    generation (a first call, a shape the warm-up did not cover) runs minutes with no denoising step to
    beat the worker's heartbeat; the service's watchdog counts it as progress, up to SD35_LOAD_TIMEOUT."""
    since = _COMPILES["since"]
    return None if since is None else time.monotonic() - since


def compiles() -> int:
    """Dynamo compilations of this process so far (0 before anything compiled)."""
    return _COMPILES["count"]


def limit_hits() -> int:
    """Frames dynamo stopped compiling (recompile limit) in this process: each runs eager from then on."""
    return _COMPILES["limit_hits"]


def cache_counters() -> dict:
    """This process's inductor FX-graph cache hits and misses so far."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    c = counters.get("inductor", {})
    return {"fxgraph_cache_hit": int(c.get("fxgraph_cache_hit", 0)),
            "fxgraph_cache_miss": int(c.get("fxgraph_cache_miss", 0))}


class FirstCall:
    """Times the first generation after compiling (where the compile happens) and records the cache use."""

    def __init__(self, plan: CompilePlan):
        self.plan = plan
        self._t = None

    def __enter__(self):
        if self.plan.mode != "off" and self.plan.seconds is None:
            self._t = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        if self._t is not None and exc_type is None:
            self.plan.seconds = round(time.perf_counter() - self._t, 3)
            self.plan.cache = cache_counters()
            log.info("compiled in %.1f s (first generation; cache %s)", self.plan.seconds, self.plan.cache)
        return False
