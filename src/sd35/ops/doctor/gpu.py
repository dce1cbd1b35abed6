"""Doctor checks of torch against the GPUs: its CUDA build, the driver, the architectures, FP8, precision.

Why one module: these checks read the same two sources (`nvidia-smi`, which works even when torch
cannot start CUDA, and torch's build) and share one kind of fix: which torch build to install
(`sd35.ops.cuda` knows the published CUDA lines and the driver floors).
"""

from __future__ import annotations

import shutil
import subprocess

from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context


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


def check_float8(ctx: Context) -> Check:
    import torch

    missing = [d for d in ("float8_e4m3fn", "float8_e5m2") if not hasattr(torch, d)]
    if missing:
        return Check("float8 dtypes", FAIL, f"torch {torch.__version__} lacks {', '.join(missing)}",
                     "install the pinned torch (`make setup`); every FP8 mode needs torch.float8_e4m3fn")
    return Check("float8 dtypes", OK, "torch.float8_e4m3fn and float8_e5m2 available")


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
        said += "; SD35_FP8_EMULATE=1 has no effect here (it only lets an explicit --precision fp8 run on a CPU)"
    return Check("precision", OK, said)
