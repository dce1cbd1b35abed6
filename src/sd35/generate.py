"""One generation: check the request, encode, denoise, decode, and write the image with its record.

Why the phases are separate calls instead of one `pipe(...)`: each phase is timed on its own (text
encoding is T5-bound, denoising is MMDiT-bound, decoding is VAE-bound: three different fixes), and the
debugger harness and notebooks hook into the same seams.

Outputs are written atomically (temporary names, then renamed), PNG and JSON sidecar side by side, so
an interrupted run never leaves a half-written image or an image without its record.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import InputError
from .load import LoadedPipeline

SIZE_MULTIPLE = 16  # VAE down-sampling (8) x MMDiT patch size (2)
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 500
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance: float = 4.5
    height: int = 128
    width: int = 128
    seed: int = 0


def check_request(
    *, prompt: str, negative_prompt: str | None, steps: int | None, guidance: float | None,
    height: int | None, width: int | None, seed: int | str | None, defaults: dict,
) -> GenerationRequest:
    """Validate a request up front and fill gaps from the model's defaults. Raises InputError."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty.", 'pass --prompt "a photo of …".', param="prompt")
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance"] if guidance is None else guidance
    height = defaults["height"] if height is None else height
    width = defaults["width"] if width is None else width
    if seed is None:
        seed = random.SystemRandom().randrange(0, 2**32)
    try:
        if isinstance(seed, bool) or (isinstance(seed, float) and not seed.is_integer()):
            raise ValueError
        seed = int(str(seed).strip()) if isinstance(seed, str) else int(seed)
    except (TypeError, ValueError):
        raise InputError(f"seed {seed!r} is not an integer.", f"pass --seed N with 0 <= N <= {MAX_SEED}.",
                         param="seed") from None
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed {seed} is out of range.", f"pass --seed N with 0 <= N <= {MAX_SEED}.", param="seed")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} {value!r} is not an integer.", f"pass --{name} as a multiple of {SIZE_MULTIPLE}.",
                             param=name)
        if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
            near = min(MAX_SIZE, max(MIN_SIZE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE))
            raise InputError(
                f"{name} {value} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE} "
                f"(the VAE halves the image 3 times and the MMDiT takes 2x2 patches).",
                f"pass --{name} {near}.", param=name,
            )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps {steps!r} must be an integer from 1 to {MAX_STEPS}.", "pass --steps 28 (or 4 for Turbo).",
                         param="steps")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= 30:
        raise InputError(f"guidance {guidance!r} must be a finite number from 0 to 30.",
                         "pass --guidance 3.5 (0 for Turbo, which needs no classifier-free guidance).", param="guidance")
    return GenerationRequest(prompt, negative_prompt or "", steps, float(guidance), height, width, seed)


@dataclass
class GenerationResult:
    images: list  # PIL images
    request: GenerationRequest
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_memory(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        return {"kind": "cuda_max_allocated", "device": device, "bytes": int(torch.cuda.max_memory_allocated(device))}
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the peak of the whole process so far.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"kind": "process_max_rss", "device": "cpu",
            "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)}


def decode(pipe, latents) -> list:
    """Latents → PIL images with the VAE (SD3's scaling and shift factors)."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def run(
    loaded: LoadedPipeline,
    request: GenerationRequest,
    *,
    num_images: int = 1,
    on_step: Callable[[int, int], None] | None = None,
    on_latents: Callable[[int, object], None] | None = None,
) -> GenerationResult:
    """Generate `num_images` images for one request (encode, denoise, decode, each timed).

    `on_step(step, total)` is called after every denoising step (progress bars, watchdogs, deadlines);
    `on_latents(step, latents)` hands over the latents after that step (trajectories in notebooks)."""
    import torch

    pipe, device = loaded.pipe, loaded.device
    exec_device = pipe._execution_device  # the GPU even when offloading
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict[str, float] = {}
    cfg = request.guidance > 1.0
    # A CPU generator gives the same latents for the same seed on every device.
    generator = torch.Generator("cpu").manual_seed(request.seed)

    with torch.inference_mode():
        # 1. Encode the prompt (two CLIPs + T5).
        t = time.perf_counter()
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=request.prompt, prompt_2=None, prompt_3=None,
            negative_prompt=request.negative_prompt if cfg else None,
            do_classifier_free_guidance=cfg, num_images_per_prompt=num_images, device=exec_device,
        )
        _sync(device)
        timings["encode"] = time.perf_counter() - t

        # 2. Denoise: the MMDiT and the flow-matching scheduler, latents out.
        def step_end(_pipe, i, _t, kwargs):
            if on_latents is not None:
                on_latents(i, kwargs["latents"])
            if on_step is not None:
                on_step(i + 1, request.steps)
            return kwargs

        t = time.perf_counter()
        latents = pipe(
            prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
            negative_pooled_prompt_embeds=nppe, num_inference_steps=request.steps,
            guidance_scale=request.guidance, height=request.height, width=request.width,
            generator=generator, output_type="latent", callback_on_step_end=step_end,
        ).images
        _sync(device)
        timings["denoise"] = time.perf_counter() - t

        # 3. Decode with the VAE.
        t = time.perf_counter()
        images = decode(pipe, latents)
        _sync(device)
        timings["decode"] = time.perf_counter() - t
    pipe.maybe_free_model_hooks()
    return GenerationResult(images, request, timings, _peak_memory(device))


def sidecar(loaded: LoadedPipeline, result: GenerationResult, image_name: str) -> dict:
    """Everything needed to reproduce and judge an image, as JSON."""
    import diffusers
    import torch
    import torchao
    import transformers

    timings = {"load": round(loaded.load_seconds, 4)}
    timings.update({k: round(v, 4) for k, v in result.timings.items()})
    record = {
        "image": image_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": asdict(result.request),
        **loaded.describe(),
        "timings_s": timings,
        "peak_memory": result.peak_memory,
        "versions": {"sd35": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torchao": torchao.__version__},
    }
    if loaded.source.notice:
        record = {"notice": loaded.source.notice, **record}
    return record


def save(loaded: LoadedPipeline, result: GenerationResult, out_dir: Path) -> list[tuple[Path, Path]]:
    """Write `<out>/<timestamp>-<seed>[-i].png` and its `.json` sidecar, atomically. Returns the pairs."""
    from PIL.PngImagePlugin import PngInfo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    written = []
    for i, image in enumerate(result.images):
        base = f"{stamp}-{result.request.seed}" + (f"-{i}" if len(result.images) > 1 else "")
        n = 1
        while (out_dir / f"{base}.png").exists() or (out_dir / f"{base}.json").exists():
            base, n = f"{stamp}-{result.request.seed}-{n}", n + 1
        png, js = out_dir / f"{base}.png", out_dir / f"{base}.json"
        record = sidecar(loaded, result, png.name)
        info = PngInfo()
        info.add_text("parameters", json.dumps(record["parameters"]))
        if loaded.source.notice:
            info.add_text("sd35:notice", loaded.source.notice)
        tmp_png, tmp_js = png.with_name(f".{png.name}.tmp"), js.with_name(f".{js.name}.tmp")
        try:
            image.save(tmp_png, format="PNG", pnginfo=info)
            tmp_js.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp_js, js)
            os.replace(tmp_png, png)
        except BaseException:
            for p in (tmp_png, tmp_js, js):
                p.unlink(missing_ok=True)
            raise
        written.append((png, js))
    return written
