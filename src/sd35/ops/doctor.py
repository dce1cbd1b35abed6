"""`sd35 doctor`: every way a first day on SD3.5 goes wrong, found before anything else runs.

Why one module of small functions: each pitfall (a torch without float8, FP8 on a GPU that can't, a
gated repo without a token, LFS pointer stubs, a cache the group can't write, a busy port, a typo in
`.env`) is one `@check` function that returns its finding and the fix. Adding a check is adding a
function; the table, `--json` and the exit code follow.

Nothing here downloads weights or loads a model: sizes come from configs (`sizing.py`), access from
the Hub's auth-check endpoint (skipped offline).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
DEBUGPY_PORT = 5678
# The packages whose versions matter for behaviour; the rest of constraints.txt is their dependencies.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "torchao", "huggingface_hub", "safetensors",
                "pydantic-settings", "typer")


@dataclass
class Check:
    name: str
    status: str
    finding: str
    fix: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What every check may look at; built once per `sd35 doctor` run."""

    settings: object | None  # sd35.settings.Settings, None when the settings themselves are invalid
    settings_error: str | None = None
    root: Path = field(default_factory=Path.cwd)  # the workspace (for constraints.txt, .env.example)
    env_file: Path = field(default_factory=lambda: Path(_env_file()))
    api_port: int | None = None  # None: the configured SD35_PORT
    debugpy_port: int = DEBUGPY_PORT
    _hw: object | None = None
    _hw_error: str | None = None

    def hardware(self):
        """The detected hardware, or None (with `hw_error` set) when the device setting cannot be met."""
        if self._hw is None and self._hw_error is None:
            from sd35.errors import Sd35Error
            from sd35.hardware import detect

            try:
                self._hw = detect(self.settings.device if self.settings else "auto")
            except Sd35Error as exc:
                self._hw_error = str(exc)
        return self._hw

    @property
    def model(self) -> str:
        from sd35.models import expand_alias

        return expand_alias(self.settings.model) if self.settings else "tiny"

    @property
    def known(self):
        from sd35.models import lookup

        return lookup(self.model)

    @property
    def kind(self) -> str:
        from sd35.weights.hub import classify

        return classify(self.model)


def _env_file() -> str:
    from sd35.settings import find_env_file

    return find_env_file()


CHECKS: list[Callable[[Context], Check | list[Check]]] = []


def check(fn):
    """Register a check. It takes the Context and returns one Check (or a list)."""
    CHECKS.append(fn)
    return fn


def run(ctx: Context) -> list[Check]:
    results: list[Check] = []
    for fn in CHECKS:
        try:
            got = fn(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken check must not hide the others
            got = Check(fn.__name__.removeprefix("check_"), FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                        "report this as a bug in sd35 doctor")
        results.extend(got if isinstance(got, list) else [got])
    return results


# --- Python and packages -------------------------------------------------------------------------------

@check
def check_settings(ctx: Context) -> Check:
    if ctx.settings_error:
        return Check("settings", FAIL, ctx.settings_error, "correct the value in .env or the environment (see .env.example)")
    s = ctx.settings
    return Check("settings", OK, f"model={s.model} precision={s.precision} t5={s.t5} device={s.device} offload={s.offload}")


@check
def check_python(ctx: Context) -> Check:
    v = sys.version_info
    if v < (3, 11):
        return Check("python", FAIL, f"Python {v.major}.{v.minor} is too old", "use Python 3.11 or newer (`make setup`)")
    return Check("python", OK, f"Python {v.major}.{v.minor}.{v.micro} at {sys.executable}")



@check
def check_packages(ctx: Context) -> Check:
    from sd35.ops.workspace import read_pins

    pins = read_pins(ctx.root / "constraints.txt")
    if not pins:
        return Check("packages", WARN, f"no constraints.txt under {ctx.root}: versions not compared",
                     "run sd35 doctor from the workspace root")
    missing, off = [], []
    for name in KEY_PACKAGES:
        key = name.lower().replace("_", "-")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        want = pins.get(key)
        if want and have.split("+")[0] != want:
            off.append(f"{name} {have} (pinned {want})")
    if missing:
        return Check("packages", FAIL, "not installed: " + ", ".join(missing), "run `make setup`")
    if off:
        return Check("packages", WARN, "differ from constraints.txt: " + "; ".join(off),
                     "run `make setup` (or rebuild the image) to get the pinned versions")
    return Check("packages", OK, f"{len(KEY_PACKAGES)} key packages match constraints.txt")


def _nvidia_smi() -> list[dict] | None:
    """GPUs as the driver sees them (None when nvidia-smi is absent or fails)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpus.append({"index": parts[0], "name": parts[1], "memory_mib": parts[2], "driver": parts[3],
                         "compute_cap": parts[4] if len(parts) > 4 else "?"})
    return gpus


def _nvidia_smi_header() -> str | None:
    """`nvidia-smi`'s plain output, whose header names the driver's CUDA version (None without a driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _cuda_build_fix(ctx: Context, major: int) -> str:
    """How to install torch's CUDA `major` build at the pinned version, for a fix column."""
    from sd35.ops.cuda import read_cuda_lines, wheel_tag

    line = read_cuda_lines(ctx.root / "constraints.txt").get(major)
    if line is None:
        return (f"the pinned torch has no CUDA {major} build here: upgrade the driver (>= 560 for CUDA 12.6, "
                ">= 580 for 13)")
    return (f"install torch's CUDA {major} build ({wheel_tag(line)}): `make setup CUDA={major}`, or the image: "
            f"`docker build --build-arg CUDA={line} -f docker/Dockerfile .`")


@check
def check_torch_build(ctx: Context) -> Check:
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        gpus = _nvidia_smi()
        if gpus:
            from sd35.ops.cuda import parse_version

            blackwell = any((parse_version(g["compute_cap"]) or (0, 0)) >= (10, 0) for g in gpus)
            return Check("torch build", FAIL, f"torch {torch.__version__} is a CPU build on a machine with "
                         f"{len(gpus)} NVIDIA GPU(s)", _cuda_build_fix(ctx, 13) + " (Blackwell: driver >= 580)"
                         if blackwell else _cuda_build_fix(ctx, 12) + " (`CUDA=13` for Blackwell)")
        return Check("torch build", OK, f"torch {torch.__version__}, CPU build (no NVIDIA driver here)")
    return Check("torch build", OK, f"torch {torch.__version__}, built for CUDA {cuda}")


@check
def check_cuda_driver(ctx: Context) -> Check:
    """torch's CUDA line against the newest CUDA the driver runs (nvidia-smi's header, else its branch)."""
    import torch

    from sd35.ops.cuda import DRIVER_FLOOR, driver_cuda_from_header, driver_cuda_from_version, parse_version

    built = parse_version(torch.version.cuda)
    gpus = _nvidia_smi()
    if built is None or not gpus:
        return Check("cuda driver", SKIP, "no NVIDIA driver here" if not gpus else "torch is a CPU build (see above)")
    driver = gpus[0]["driver"]
    have = driver_cuda_from_header(_nvidia_smi_header() or "")
    if have is None:  # no header: the branch still tells the CUDA major (minor 99: compare majors only)
        branch = driver_cuda_from_version(driver)
        have = (branch[0], 99) if branch else None
    if have is None:
        return Check("cuda driver", WARN, f"driver {driver}: its CUDA version could not be read",
                     "check `nvidia-smi`; the CUDA 12.6 build needs a driver >= 560, CUDA 13.x >= 580")
    want, got = f"{built[0]}.{built[1]}", f"{have[0]}.{have[1]}" if have[1] != 99 else f"{have[0]}.x"
    if have[0] < built[0]:
        floor = next(branch for branch, cuda in DRIVER_FLOOR if cuda[0] <= built[0])
        return Check("cuda driver", FAIL, f"torch is built for CUDA {want}, driver {driver} runs CUDA <= {got}: "
                     "CUDA will not initialise",
                     f"upgrade the driver to >= {floor}, or {_cuda_build_fix(ctx, have[0])}")
    if have < built:
        return Check("cuda driver", WARN, f"torch is built for CUDA {want}, driver {driver} reports CUDA {got}: "
                     "it runs through CUDA minor version compatibility (limited: no JIT of newer PTX)",
                     f"upgrade the driver to one for CUDA {want} or newer (docs/container.md lists them)")
    return Check("cuda driver", OK, f"driver {driver} runs CUDA {got}; torch is built for CUDA {want}")


def _gpu_capabilities() -> list[tuple[str, tuple[int, int]]]:
    """(label, compute capability) per GPU: from nvidia-smi (works when torch cannot start CUDA), else torch."""
    import torch

    from sd35.ops.cuda import parse_version

    gpus = [(f"cuda:{g['index']} {g['name']}", parse_version(g["compute_cap"])) for g in _nvidia_smi() or []]
    if gpus and all(cap for _, cap in gpus):
        return gpus
    if torch.version.cuda and torch.cuda.is_available():
        return [(f"cuda:{i} {torch.cuda.get_device_name(i)}", torch.cuda.get_device_capability(i))
                for i in range(torch.cuda.device_count())]
    return []


@check
def check_gpu_arch(ctx: Context) -> Check:
    """Each GPU's compute capability against the architectures torch's build has kernels for."""
    import torch

    from sd35.ops.cuda import arch_in_build

    gpus = _gpu_capabilities() if torch.version.cuda else []
    if not gpus:
        return Check("gpu arch", SKIP, "no NVIDIA GPU or no CUDA build of torch (see above)")
    archs = torch.cuda.get_arch_list()  # empty when torch cannot start CUDA at all
    if not archs:
        return Check("gpu arch", SKIP, f"torch (CUDA {torch.version.cuda}) cannot start CUDA here, so its "
                     "architectures are unknown (see cuda driver)")
    built = f"CUDA {torch.version.cuda} build ({' '.join(archs)})"
    found, ptx, missing = [], [], []
    for label, cap in gpus:
        how = arch_in_build(cap, archs)
        entry = (f"{label} SM {cap[0]}.{cap[1]}", cap, how)
        (missing if how is None else ptx if how.startswith("compute_") else found).append(entry)
    if missing:
        return Check("gpu arch", FAIL, "; ".join(e for e, _, _ in missing) + f": not in torch's {built}",
                     _arch_fix(ctx, missing[0][1], torch.version.cuda))
    if ptx:
        return Check("gpu arch", WARN, "; ".join(f"{e} via {how} (PTX, JIT-compiled at first use)" for e, _, how in ptx)
                     + f"; torch's {built}",
                     "a torch build with native kernels for it starts faster (docs/container.md)")
    return Check("gpu arch", OK, "; ".join(f"{e} → {how}" for e, _, how in found) + f" (CUDA {torch.version.cuda})")


def _arch_fix(ctx: Context, cap: tuple[int, int], cuda: str) -> str:
    """The build that has kernels for a GPU of compute capability `cap` (PyTorch's published lines)."""
    if cap >= (10, 0) and cuda.startswith("12."):  # Blackwell: CUDA 12.6 builds stop at Hopper (sm_90)
        return _cuda_build_fix(ctx, 13) + " (driver >= 580)"
    if cap < (7, 5) and cuda.startswith("13."):  # CUDA 13 dropped Maxwell, Pascal and Volta
        return _cuda_build_fix(ctx, 12)
    return "install a torch build whose arch list has this GPU (docs/container.md lists the lines)"


@check
def check_float8(ctx: Context) -> Check:
    import torch

    missing = [d for d in ("float8_e4m3fn", "float8_e5m2") if not hasattr(torch, d)]
    if missing:
        return Check("float8 dtypes", FAIL, f"torch {torch.__version__} lacks {', '.join(missing)}",
                     "install the pinned torch (`make setup`); every FP8 mode needs torch.float8_e4m3fn")
    return Check("float8 dtypes", OK, "torch.float8_e4m3fn and float8_e5m2 available")


# --- GPUs and precision --------------------------------------------------------------------------------

@check
def check_gpu(ctx: Context) -> Check:
    import torch

    hw = ctx.hardware()
    if hw is None:
        return Check("gpu", FAIL, ctx._hw_error.split("\nFix: ")[0],
                     ctx._hw_error.split("\nFix: ")[1] if "\nFix: " in ctx._hw_error else None)
    if not torch.cuda.is_available():
        return Check("gpu", WARN, "no CUDA GPU visible: everything runs on the CPU (fine for the tiny model; "
                     "real SD3.5 needs a GPU)",
                     "on a GPU server check `nvidia-smi`, CUDA_VISIBLE_DEVICES, and the container's GPU access")
    drivers = {g["index"]: g["driver"] for g in (_nvidia_smi() or [])}
    parts = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        parts.append(f"cuda:{i} {p.name} SM {p.major}.{p.minor} {p.total_memory / 2**30:.0f} GiB"
                     + (f" driver {drivers[str(i)]}" if str(i) in drivers else ""))
    return Check("gpu", OK, "; ".join(parts) + f" (using {hw.device})")


@check
def check_precision(ctx: Context) -> Check:
    from sd35.errors import Sd35Error
    from sd35.precision import resolve

    hw = ctx.hardware()
    if hw is None or ctx.settings is None:
        return Check("precision", SKIP, "no usable device or settings (see above)")
    try:
        plan = resolve(ctx.settings.precision, ctx.settings.t5, hw, emulate=ctx.settings.fp8_emulate)
    except Sd35Error as exc:
        return Check("precision", FAIL, exc.cause, exc.fix)
    said = f"{ctx.settings.precision} → transformer {plan.transformer} ({plan.transformer_reason}); T5 {plan.t5}"
    if plan.emulated:  # SD35_FP8_EMULATE: the real fp8 code path, computed by the CPU — never a speed figure
        return Check("precision", WARN, said + ". Emulated: the same torchao FP8 weights and per-row FP8 "
                     "activations as on a GPU, multiplied by torch's CPU float8 matmul; several times slower than "
                     "bf16 here, for numerics and tests only; every record says \"emulated\": true",
                     "unset SD35_FP8_EMULATE for real work (auto never picks emulation); fp8's speed needs an "
                     "SM >= 8.9 GPU (`sd35 bench gpu`)")
    if ctx.settings.fp8_emulate:
        said += ("; SD35_FP8_EMULATE=1 has no effect here (it only lets an explicit --precision fp8 run on a CPU)")
    return Check("precision", OK, said)


def _plan(ctx: Context):
    from sd35.errors import Sd35Error
    from sd35.precision import resolve

    hw = ctx.hardware()
    if hw is None or ctx.settings is None:
        return None
    try:
        return resolve(ctx.settings.precision, ctx.settings.t5, hw, emulate=ctx.settings.fp8_emulate)
    except Sd35Error:
        return None


def _model_folder(ctx: Context) -> Path | None:
    """A local folder holding the configured model's configs, when there is one (no download)."""
    from sd35.weights.hub import find_local

    return find_local(ctx.settings) if ctx.settings else None


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _estimate(ctx: Context) -> dict | None:
    from sd35.weights import sizing

    plan = _plan(ctx)
    if plan is None:
        return None
    folder = _model_folder(ctx)
    if ctx.model == "tiny" and folder is None:
        return None
    arch = ctx.known.transformer if ctx.known else None
    if folder is None and arch is None:
        return None
    return sizing.pipeline_bytes(arch or {}, plan, folder)


@check
def check_fits(ctx: Context) -> Check:
    from sd35.weights.sizing import ACTIVATION_HEADROOM_BYTES

    hw = ctx.hardware()
    if _plan(ctx) is None:
        return Check("fits in memory", SKIP, "the precision cannot be resolved on this machine (see above)")
    est = _estimate(ctx)
    if est is None:
        return Check("fits in memory", SKIP, f"no config for {ctx.model} without downloading it")
    gb = 1e9
    # Activations scale with the batch: the largest a request may ask for (SD35_MAX_IMAGES), at the model's
    # default size; the VAE decodes one image at a time when a batch would not fit (generate.decode_mode).
    from sd35.models import info_for
    from sd35.weights.sizing import batch_activation_bytes

    batch = max(1, int(getattr(ctx.settings, "max_images", 1) or 1))
    info = info_for(ctx.model, _model_folder(ctx))
    tcfg = ctx.known.transformer if ctx.known else {}
    headroom = ACTIVATION_HEADROOM_BYTES + batch_activation_bytes(tcfg, info.sampling.height, info.sampling.width,
                                                                  batch)
    need = est["total"] + headroom
    parts = f"transformer {fmt_bytes(est['transformer'])} + T5 {fmt_bytes(est['text_encoder_3'])} + CLIPs/VAE " \
            f"{fmt_bytes(est['text_encoder'] + est['text_encoder_2'] + est['vae'])}"
    if hw is None or not hw.is_cuda:
        return Check("fits in memory", SKIP, f"no GPU; the pipeline's weights are {fmt_bytes(est['total'])} ({parts})")
    from sd35.hardware import free_memory

    free = free_memory(hw.device)
    have = free if free is not None else hw.total_memory_bytes
    what = "free now" if free is not None else "in all"
    if ctx.settings.offload != "none":
        largest = max(v for k, v in est.items() if k != "total") + headroom
        status = OK if largest <= have else FAIL
        return Check("fits in memory", status, f"offload={ctx.settings.offload}: largest component + activations "
                     f"≈ {largest / gb:.1f} GB (batch {batch}) of {have / gb:.1f} GB {what}", None if status == OK else
                     "use SD35_PRECISION=fp8-weight and SD35_T5=fp8-weight, or a larger GPU")
    if need <= have:
        return Check("fits in memory", OK, f"≈ {need / gb:.1f} GB needed ({parts} + activations for a batch of "
                     f"{batch}) of {have / gb:.1f} GB {what} on {hw.name}")
    return Check("fits in memory", FAIL, f"≈ {need / gb:.1f} GB needed ({parts} + activations for a batch of "
                 f"{batch}), {hw.name} has {have / gb:.1f} GB {what}",
                 "free the GPU (`nvidia-smi` shows who holds it) or pick another with SD35_DEVICE; set "
                 "SD35_T5=fp8-weight or off, SD35_PRECISION=fp8-weight, SD35_MAX_IMAGES lower, or SD35_OFFLOAD=model")


@check
def check_transformer_file(ctx: Context) -> Check:
    """SD35_TRANSFORMER: what the file is (read from its header), and whether it fits the model's folder."""
    from sd35.errors import ModelError
    from sd35.weights.singlefile import check_matches, inspect

    path = getattr(ctx.settings, "transformer", None) if ctx.settings else None
    if not path:
        return Check("transformer file", SKIP, "SD35_TRANSFORMER not set: the transformer comes from the model folder")
    try:
        info = inspect(path)
        folder = _model_folder(ctx)
        if folder is not None:
            check_matches(info, folder)
    except ModelError as exc:
        return Check("transformer file", FAIL, exc.cause, exc.fix)
    extra = "" if not info.bundled else " (bundled components are not used: they come from SD35_MODEL)"
    return Check("transformer file", OK, f"{path}: {info.describe()}{extra}")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _service_instances(ctx: Context) -> tuple[int, str]:
    """How many service processes load at once: SD35_INSTANCES, else the enabled sd35-api@ units, else 1."""
    n = getattr(ctx.settings, "instances", None) if ctx.settings else None
    if n:
        return n, "SD35_INSTANCES"
    if Path("/run/systemd/system").is_dir():
        wants = {p.name for d in Path("/etc/systemd/system").glob("*.wants") for p in d.glob("sd35-api@*.service")}
        if wants:
            return len(wants), f"enabled units: {', '.join(sorted(wants))}"
    return 1, "one process (no enabled sd35-api@ units; SD35_INSTANCES overrides)"


def host_load_bytes(ctx: Context) -> tuple[int, str] | None:
    """Peak host RAM of one load of the configured model, and how it loads (quantized.py, load.py step 3)."""
    from sd35.weights import sizing
    from sd35.precision import PrecisionPlan
    from sd35.weights.quantized import QUANT_MODES, read_record

    plan = _plan(ctx)
    est = _estimate(ctx)
    if plan is None or est is None:
        return None
    folder = _model_folder(ctx)
    s = ctx.settings
    if getattr(s, "transformer", None):
        try:
            size = Path(s.transformer).expanduser().stat().st_size
        except OSError:
            return None
        return est["total"] - est["transformer"] + size, "single-file transformer + the rest"
    record = read_record(folder) if folder is not None else None
    if record is not None:
        return est["total"], "pre-quantized: FP8 data as stored, no bf16 copy"
    if s.lean_load and plan.transformer in QUANT_MODES:
        shard = max((f.stat().st_size for c in ("transformer", "text_encoder_3") for f in
                     (folder / c).glob("*.safetensors")), default=0) if folder is not None else 0
        shard = shard or 5 << 30
        return est["total"] + shard, "lean: FP8 pipeline + one bf16 shard being read"
    bf16 = PrecisionPlan("bf16", "", "off" if plan.t5 == "off" else "bf16", "")
    arch = ctx.known.transformer if ctx.known else {}
    return sizing.pipeline_bytes(arch, bf16, folder)["total"], "bf16 pipeline staged in host RAM, then quantized"


@check
def check_host_ram(ctx: Context) -> Check:
    """Does loading fit in *available* host RAM, for as many service instances as start together?"""
    got = host_load_bytes(ctx)
    if got is None:
        return Check("host RAM while loading", SKIP, f"no config for {ctx.model} without downloading it")
    per, how = got
    n, why = _service_instances(ctx)
    avail = _meminfo_available()
    if avail is None:
        return Check("host RAM while loading", SKIP, f"≈ {fmt_bytes(per)} per load ({how}); /proc/meminfo unreadable")
    need = per * n
    finding = (f"≈ {fmt_bytes(per)} per load ({how}) × {n} ({why}) = {fmt_bytes(need)}; "
               f"MemAvailable {fmt_bytes(avail)}")
    if need <= avail:
        return Check("host RAM while loading", OK, finding)
    model = ctx.settings.model if ctx.settings else "MODEL"
    return Check("host RAM while loading", FAIL, finding,
                 f"pre-quantize once (`sd35 cache quantize --model {model}`) and load that (--model <name>): no "
                 "bf16 copy in RAM; keep SD35_LEAN_LOAD=1; start the instances one after another; or SD35_T5=off")


# --- Hugging Face ----------------------------------------------------------------------------------------

def _token(ctx: Context) -> str | None:
    if ctx.settings and ctx.settings.hf_token:
        return ctx.settings.hf_token.get_secret_value()
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


@check
def check_token(ctx: Context) -> Check:
    token = _token(ctx)
    gated = ctx.known is not None and ctx.known.gated
    if token:
        return Check("hf token", OK, f"present for this user (hf_…{token[-4:]})")
    if gated:
        return Check("hf token", FAIL, f"no Hugging Face token, and {ctx.model} is gated",
                     f"accept the license at https://huggingface.co/{ctx.model}, create a read token and set "
                     "HF_TOKEN in .env (or run `hf auth login`)")
    return Check("hf token", OK, f"none; not needed for {ctx.model} (the SD3.5 repos need one)")


@check
def check_hub_access(ctx: Context) -> Check:
    if ctx.kind != "hub":
        return Check("hub access", SKIP, f"{ctx.model} is not a Hub repo")
    s = ctx.settings
    if s.hf_hub_offline:
        return Check("hub access", SKIP, f"offline (HF_HUB_OFFLINE=1): access to {ctx.model} not checked; "
                     "the cached copy is used")
    from huggingface_hub import HfApi

    from sd35.weights.hub import hub_error

    token = _token(ctx)
    try:
        HfApi(endpoint=s.hf_endpoint, token=token).auth_check(ctx.model, token=token)
    except Exception as exc:  # noqa: BLE001
        from huggingface_hub.errors import HfHubHTTPError

        if not isinstance(exc, HfHubHTTPError):  # no HTTP answer at all: DNS, refused, timeout
            return Check("hub access", WARN, f"the Hub could not be reached ({type(exc).__name__})",
                         "check the network or HF_ENDPOINT; on an offline server set HF_HUB_OFFLINE=1")
        err = hub_error(exc, ctx.model, s)
        return Check("hub access", FAIL, err.cause, err.fix)
    return Check("hub access", OK, f"{'the token' if token else 'anonymous access'} can read {ctx.model}")


@check
def check_hub_cache(ctx: Context) -> Check:
    from sd35.ops.cache import inspect_permissions

    cache = Path(ctx.settings.hf_hub_cache).expanduser()
    if not cache.exists():
        parent = next((p for p in cache.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK):
            return Check("hub cache", FAIL, f"HF_HUB_CACHE={cache} does not exist and {parent} is not writable",
                         "create it (`sd35 cache init PATH --group GROUP` for a shared one) or point HF_HUB_CACHE elsewhere")
        return Check("hub cache", OK, f"HF_HUB_CACHE={cache} (created on first download)")
    if not os.access(cache, os.W_OK | os.X_OK):
        return Check("hub cache", FAIL, f"HF_HUB_CACHE={cache} is not writable by this user",
                     "ask the cache's owner to add you to its group, or use a cache of your own")
    report = inspect_permissions(cache)
    if not report.shared:
        return Check("hub cache", OK, f"HF_HUB_CACHE={cache} (private to this user)")
    if report.ok:
        return Check("hub cache", OK, f"HF_HUB_CACHE={cache} shared with group {report.group}, setgid, group-writable")
    bad = report.not_group_writable + report.dirs_without_setgid + report.other_group
    shown = ", ".join(str(p.relative_to(cache)) for p in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    what = []
    if report.not_group_writable:
        what.append(f"{len(report.not_group_writable)} not group-writable")
    if report.dirs_without_setgid:
        what.append(f"{len(report.dirs_without_setgid)} dirs without setgid")
    if report.other_group:
        what.append(f"{len(report.other_group)} owned by another group")
    return Check("hub cache", FAIL, f"shared cache {cache} (group {report.group}): {'; '.join(what)}: {shown} — "
                 "other users will hit PermissionError on blobs/ and .locks/", report.fix())


@check
def check_model(ctx: Context) -> Check:
    from sd35.errors import ModelError
    from sd35.weights.hub import check_local, find_lfs_pointers, find_local, revision_for

    s = ctx.settings
    if ctx.kind == "tiny":
        return Check("model", OK, "tiny (embedded, built locally on first use; random weights)")
    if ctx.kind == "local":
        try:
            check_local(ctx.model, with_t5=s.t5 != "off")
        except ModelError as exc:
            return Check("model", FAIL, exc.cause, exc.fix)
        return Check("model", OK, f"local diffusers folder {Path(ctx.model).expanduser()}")
    stored = find_local(s) if ctx.kind == "invalid" else None
    if stored is not None:  # a name in the pre-quantized store
        from sd35.weights.quantized import read_record

        try:
            rec = read_record(stored) or {}
            check_local(str(stored), with_t5=s.t5 != "off")
        except ModelError as exc:
            return Check("model", FAIL, exc.cause, exc.fix)
        src = rec.get("source", {})
        return Check("model", OK, f"pre-quantized {rec.get('precision')} copy of {src.get('repo_id') or src.get('requested')}"
                     f"@{(src.get('commit') or '-')[:12]} at {stored}")
    if ctx.kind == "invalid":
        return Check("model", FAIL, f"SD35_MODEL={ctx.model!r} is neither tiny, a folder nor a Hub repo id",
                     "use tiny, medium, large, large-turbo, org/name or a folder path")
    snap = find_local(s)
    rev = revision_for(ctx.model, s) or "main"
    if snap is None:
        if s.hf_hub_offline:
            return Check("model", FAIL, f"{ctx.model}@{rev} is not cached and HF_HUB_OFFLINE=1",
                         f"prefetch it with network access: `HF_HUB_OFFLINE=0 sd35 cache prefetch {ctx.model}`")
        return Check("model", WARN, f"{ctx.model}@{rev} not cached yet: the first run downloads it",
                     f"prefetch it once for everyone: `sd35 cache prefetch {ctx.model}`")
    stubs = find_lfs_pointers(snap)
    if stubs:
        return Check("model", FAIL, f"cached {ctx.model} holds LFS pointer stubs ({stubs[0].relative_to(snap)})",
                     "delete the snapshot and download it again with `sd35 cache prefetch`")
    return Check("model", OK, f"{ctx.model}@{rev} cached at commit {snap.name[:12]}")


@check
def check_disk(ctx: Context) -> Check:
    from sd35.weights import sizing
    from sd35.hardware import detect
    from sd35.precision import resolve

    cache = Path(ctx.settings.hf_hub_cache).expanduser()
    probe = next((p for p in [cache, *cache.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    gb = 1e9
    if ctx.known is None or _model_folder(ctx) is not None:
        return Check("disk", OK if free > 5 * gb else WARN, f"{free / gb:.0f} GB free under {probe}",
                     None if free > 5 * gb else "free some space under HF_HUB_CACHE")
    # On disk the published checkpoints are bf16: size them with the bf16 plan.
    arch = ctx.known.transformer
    t5 = "off" if ctx.settings.t5 == "off" else "bf16"
    size = sizing.pipeline_bytes(arch, resolve("bf16", t5, detect("cpu")))["total"]
    if free < size + gb:
        return Check("disk", FAIL, f"{ctx.model} needs ≈ {size / gb:.0f} GB, {free / gb:.0f} GB free under {probe}",
                     "free space or point HF_HUB_CACHE at a larger disk (`sd35 cache init`)")
    return Check("disk", OK, f"{free / gb:.0f} GB free under {probe}; {ctx.model} needs ≈ {size / gb:.0f} GB")


# --- Workspace -----------------------------------------------------------------------------------------


@check
def check_dotenv(ctx: Context) -> Check:
    example = ctx.root / ".env.example"
    if not ctx.env_file.is_file():
        return Check(".env", OK, "no .env: defaults and the environment apply",
                     None) if not example.is_file() else Check(
            ".env", OK, "no .env: defaults and the environment apply (cp .env.example .env to configure)")
    from sd35.settings import dotenv_keys as env_keys

    known = set(env_keys(example, include_commented=True))
    unknown = [k for k in env_keys(ctx.env_file) if known and k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        return Check(".env", WARN, f"unknown key(s) in {ctx.env_file}: {', '.join(hints)} — they are ignored",
                     "rename them to the keys in .env.example")
    return Check(".env", OK, f"{ctx.env_file}: {len(env_keys(ctx.env_file))} known keys")



@check
def check_debugpy(ctx: Context) -> Check:
    try:
        version = importlib.metadata.version("debugpy")
    except importlib.metadata.PackageNotFoundError:
        return Check("debugpy", WARN, "debugpy is not installed: the VS Code launch targets need it",
                     "run `make setup`")
    from sd35.net import port_free

    if not port_free(ctx.debugpy_port):
        return Check("debugpy", WARN, f"debugpy {version}; port {ctx.debugpy_port} is already in use (fine if it is "
                     "your VS Code's \"Attach: running service\" waiting)",
                     "otherwise stop the other debug session, or use another port in both SD35_DEBUGPY=127.0.0.1:PORT "
                     "and launch.json's \"listen\"; `sd35 doctor`'s listeners check says whose it is")
    return Check("debugpy", OK, f"debugpy {version}; port {ctx.debugpy_port} free")


@check
def check_api_port(ctx: Context) -> Check:
    port = ctx.api_port or (ctx.settings.port if ctx.settings else 8000)
    from sd35.net import port_free

    if not port_free(port):
        return Check("api port", WARN, f"port {port} is in use (another sd35 serve, or another program)",
                     f"`ss -ltnp 'sport = :{port}'` shows who holds it; stop it or serve on another --port")
    return Check("api port", OK, f"port {port} free")


def _answers_without_key(port: int, host: str) -> bool:
    """True when GET /v1/models on the port succeeds with no Authorization header."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://[{host}]:{port}/v1/models" if ":" in host else f"http://{host}:{port}/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@check
def check_listeners(ctx: Context) -> Check:
    """Every TCP port of ours another account could use: 127.0.0.1 is open to every local account."""
    from sd35 import net

    if net.tcp_listeners() is None:
        return Check("listeners", SKIP, "no /proc/net/tcp here: cannot list listening ports")
    others = net.other_login_accounts()
    api_port = ctx.settings.port if ctx.settings else ctx.api_port
    lab_port = ctx.settings.lab_port if ctx.settings else 8888
    bad: list[tuple[str, str, str]] = []  # (status, finding, fix)
    checked = 0
    procs = net.processes_by_inode()
    for x in net.ours():
        proc = procs.get(x.inode)
        pid, cmd = proc if proc else (None, "")
        who = f"{x} (pid {pid}: {cmd[:80]})" if pid else str(x)
        reach = "every account on this machine" if x.local_only else "every account and the network"
        if "debugpy" in cmd and "adapter" in cmd and "--for-server" in cmd:
            bad.append((FAIL, f"a debuggee listens for a debugger on {who}: {reach} can attach and run code as you",
                        "restart it with SD35_DEBUGPY=127.0.0.1:PORT (it connects out to VS Code's \"Attach: running "
                        "service\", which listens) instead of listen:…"))
        elif "ipykernel" in cmd:
            continue  # kernels' ZMQ ports: every message is signed with the key in a 0600 connection file
        elif "jupyter" in cmd or (x.port == lab_port and not cmd):
            bad.append((WARN, f"JupyterLab on TCP {who}: {reach} can reach it; only its token protects it",
                        "restart it with `sd35 lab` (a Unix socket only you can open; no --tcp / SD35_LAB_TCP)"))
        elif (x.port == api_port or ("sd35" in cmd and " serve" in cmd)) and _answers_without_key(x.port, x.host):
            bad.append((FAIL, f"the sd35 API on {who} answers without a key: {reach} can use the GPU, anonymously",
                        "create per-user keys (`sd35 keys add NAME`, SD35_API_KEYS_FILE) or set SD35_API_KEY, then "
                        "restart it without --allow-no-key"))
        checked += 1
    if not bad:
        return Check("listeners", OK, f"{checked} TCP listener(s) of this account checked: none lets another account "
                     "in" + ("" if others else " (and no other account can log in here)"))
    if not others and all(x[0] == FAIL for x in bad):  # nobody else here today: still worth fixing
        bad = [(WARN, f + " (no other login account today)", fix) for _, f, fix in bad]
    status = FAIL if any(b[0] == FAIL for b in bad) else WARN
    return Check("listeners", status, "; ".join(b[1] for b in bad), " / ".join(dict.fromkeys(b[2] for b in bad)))


@check
def check_systemd(ctx: Context) -> Check:
    if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        return Check("systemd", SKIP, "systemd is not running here (container or CI): no units to check")
    try:
        out = subprocess.run(["systemctl", "list-units", "--all", "--no-legend", "--plain", "sd35-api@*"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("systemd", WARN, f"systemctl failed: {exc}")
    units = [line.split()[:4] for line in out.stdout.splitlines() if line.strip()]
    if not units:
        return Check("systemd", OK, "no sd35-api@ unit installed (see docs/hosting.md to serve the team)")
    failed = [u[0] for u in units if len(u) > 3 and u[2] == "failed"]
    if failed:
        return Check("systemd", FAIL, f"failed: {', '.join(failed)}", f"journalctl -u {failed[0]} -n 50")
    return Check("systemd", OK, "; ".join(f"{u[0]} {u[2]}/{u[3]}" for u in units if len(u) > 3))


# --- Output --------------------------------------------------------------------------------------------

def table(results: list[Check]):
    from rich.table import Table

    colour = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}
    t = Table(title="sd35 doctor", show_lines=False)
    t.add_column("check")
    t.add_column("status")
    t.add_column("finding")
    t.add_column("fix")
    for r in results:
        t.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", r.finding, r.fix or "")
    counts = {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL, SKIP)}
    t.caption = " · ".join(f"{n} {s}" for s, n in counts.items())
    return t


