"""Doctor checks of memory: does the configured model fit the GPU, and its load the host RAM?

Why here: both size the pipeline from its configs only (`sd35.weights.sizing`, no download) with the
precision plan this machine resolves to, and compare it with what is free now. The host-RAM check
follows the load paths of `sd35.weights.load` and `quantized` (pre-quantized, lean, bf16 staged).
"""

from __future__ import annotations

from pathlib import Path

from sd35.ops.doctor.context import FAIL, OK, SKIP, Check, Context


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _estimate(ctx: Context) -> dict | None:
    from sd35.weights import sizing

    plan = ctx.plan()
    if plan is None:
        return None
    folder = ctx.model_folder()
    if ctx.model == "tiny" and folder is None:
        return None
    arch = ctx.known.transformer if ctx.known else None
    if folder is None and arch is None:
        return None
    return sizing.pipeline_bytes(arch or {}, plan, folder)


def check_fits(ctx: Context) -> Check:
    from sd35.weights.sizing import ACTIVATION_HEADROOM_BYTES

    hw = ctx.hardware()
    if ctx.plan() is None:
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
    info = info_for(ctx.model, ctx.model_folder())
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
    """Peak host RAM of one load of the configured model, and how it loads (weights/lean.py, load.py step 3)."""
    from sd35.weights import sizing
    from sd35.precision import PrecisionPlan
    from sd35.weights.fp8io import QUANT_MODES
    from sd35.weights.store import read_record

    plan = ctx.plan()
    est = _estimate(ctx)
    if plan is None or est is None:
        return None
    folder = ctx.model_folder()
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
