"""The published SD3.5 transformer architectures, built with random weights: what `bench memory`, `bench load`
and `bench speed` measure.

Why random weights: weight bytes, load paths and step latency depend on shapes and on which layers a
precision mode quantizes, not on the values, so the published configs (`models.ARCHS`, from each Hub repo's
`transformer/config.json`) give exact figures without a 16 GB gated download. One builder, shared, so every
benchmark measures the same model.
"""

from __future__ import annotations

from sd35.models import ARCHS  # the published transformer architectures (and the tiny one), from the registry


def build_transformer(arch: str, seed: int = 0):
    """The published architecture in bf16 on the CPU, random weights (allocated once, no fp32 detour)."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(ARCHS[arch])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():
            b.normal_(0.0, 0.02, generator=gen)
        # The position table is not a weight: as in every real checkpoint, the sin-cos table of the config.
        from sd35.weights.fp8io import computed_pos_embed

        table = computed_pos_embed(model)
        if table is not None:
            model.pos_embed.pos_embed.copy_(table)
    return model.eval()


def on_this_device(device: str | None, arch: str, size: int) -> tuple[str, str, int, str | None]:
    """(device, arch, size, note) for a step-time benchmark: the published architecture on a GPU; on a CPU the
    tiny model at 128², with a note saying these times exercise the code path, not GPU figures."""
    import torch

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return device, arch, size, None
    note = None
    if arch != "tiny" or size > 256:
        note = (f"CPU: ran the tiny model at 128² instead of {arch} at {size}² — these times exercise the code "
                "path on this CPU; GPU figures must be measured on a GPU")
    return device, "tiny", 128, note


def emulates_fp8(device: str, emulate: bool) -> bool:
    """Whether a benchmark's `fp8` rows run emulated: asked for (SD35_FP8_EMULATE) and granted, as a load
    would grant it (`precision.resolve`: a CPU only). The report then says `"emulated": true`: numerics,
    not speed. Refused (a GPU without FP8 tensor cores): False, and the fp8 row says why it did not run."""
    from sd35 import hardware, precision
    from sd35.errors import HardwareError

    if not emulate:
        return False
    try:
        return precision.resolve("fp8", "auto", hardware.detect(device), emulate=True).emulated
    except HardwareError:
        return False
