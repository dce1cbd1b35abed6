"""One generation: check the request, encode, denoise, decode, and write the image with its record.

Why the phases are separate calls instead of one `pipe(...)`: each phase is timed on its own (text
encoding is T5-bound, denoising is MMDiT-bound, decoding is VAE-bound: three different fixes), and the
debugger harness and notebooks hook into the same seams.

Outputs are written atomically (temporary names, then renamed), PNG and JSON sidecar side by side, so
an interrupted run never leaves a half-written image or an image without its record.
"""

from __future__ import annotations

import dataclasses
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

from sd35 import __version__
from sd35.errors import InputError
from sd35.inference import edit as edits
from sd35.weights.load import LoadedPipeline
from sd35.models import ModelInfo

MAX_STEPS = 500
MAX_SEED = 2**63 - 1
MIN_SIZE = 64


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance: float = 4.5
    height: int = 128
    width: int = 128
    seed: int = 0
    loras: tuple | None = None  # LoraChoice(name, scale)s; None: the run's defaults (SD35_LORAS); weights/lora.py
    edit: edits.EditInput | None = field(default=None, compare=False, repr=False)  # img2img / inpainting

    @property
    def denoising_steps(self) -> int:
        """Steps that really run: all of them, or an edit's share (strength) of the schedule."""
        return self.steps if self.edit is None else self.edit.steps_run(self.steps)

    def parameters(self) -> dict:
        """The request as JSON: an edit's inputs by their sha256 (and its strength), not their pixels."""
        record = {k: v for k, v in asdict(dataclasses.replace(self, edit=None)).items()
                  if k != "edit" and not (k == "loras" and v is None)}  # LoRAs are recorded under "lora"
        if self.edit is not None:
            record["edit"] = self.edit.record()
        return record


def image_seeds(seed: int, n: int) -> list[int]:
    """The seed of each of `n` images: seed, seed+1, … (wrapping at MAX_SEED). Image i of a batch is the
    image a request for one image with seed `image_seeds(seed, n)[i]` gives."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def check_request(
    *, prompt: str, negative_prompt: str | None, steps: int | None, guidance: float | None,
    height: int | None, width: int | None, seed: int | str | None, info: ModelInfo,
) -> GenerationRequest:
    """Validate a request up front and fill gaps from the model's defaults and limits (`info`, from the model
    registry). Raises InputError naming the field and the fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty.", 'pass --prompt "a photo of …".', param="prompt")
    d = info.sampling
    steps = d.steps if steps is None else steps
    guidance = d.guidance if guidance is None else guidance
    height = d.height if height is None else height
    width = d.width if width is None else width
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
    multiple, largest = info.size_multiple, info.max_side
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} {value!r} is not an integer.", f"pass --{name} as a multiple of {multiple}.",
                             param=name)
        if value % multiple or not MIN_SIZE <= value <= largest:
            near = min(largest, max(MIN_SIZE, round(value / multiple) * multiple))
            raise InputError(
                f"{name} {value} must be a multiple of {multiple} between {MIN_SIZE} and {largest}: the VAE "
                f"down-samples {info.vae_scale_factor}x, the MMDiT takes {info.patch_size}x{info.patch_size} "
                f"patches, and this model's position embedding covers {largest} px per side at most.",
                f"pass --{name} {near}.", param=name,
            )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps {steps!r} must be an integer from 1 to {MAX_STEPS}.",
                         f"pass --steps {d.steps} (this model's default).", param="steps")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= 30:
        raise InputError(f"guidance {guidance!r} must be a finite number from 0 to 30.",
                         f"pass --guidance {d.guidance:g} (this model's default; Turbo needs 0).", param="guidance")
    return GenerationRequest(prompt, negative_prompt or "", steps, float(guidance), height, width, seed)


@dataclass
class GenerationResult:
    images: list  # PIL images
    request: GenerationRequest
    seeds: list[int] = field(default_factory=list)  # one per image: image i alone = this request with seeds[i]
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)
    decode_mode: str = "batched"  # batched | sliced | tiled (see decode_mode)
    nonfinite: list[int] = field(default_factory=list)  # NaN/Inf values in each image's pixels (0: finite)

    @property
    def finite(self) -> bool:
        return not any(self.nonfinite)


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


# A heuristic upper bound of the VAE decoder's working memory per output pixel (bf16 activations of its
# 128–512-channel up-blocks at full resolution plus fp32 GroupNorm temporaries). It only decides when to
# decode one image at a time or in tiles; measured peaks belong in docs/benchmarks.md.
VAE_DECODE_BYTES_PER_PIXEL = 4096


def decode_mode(free_bytes: int | None, n: int, height: int, width: int) -> str:
    """How to decode `n` images on a device with `free_bytes` free (None: host memory, not planned).

    batched: all at once; sliced: one image at a time (same result, the peak of one image); tiled:
    overlapping tiles (diffusers' VAE tiling; seams are blended) when even one image would not fit."""
    if free_bytes is None:
        return "batched"
    one = height * width * VAE_DECODE_BYTES_PER_PIXEL
    if one > free_bytes:
        return "tiled"
    return "sliced" if n > 1 and n * one > free_bytes else "batched"


def decode_pixels(pipe, latents, mode: str = "batched"):
    """Latents → the VAE's pixel tensor in [-1, 1] (SD3's scaling and shift factors), batched, sliced or tiled."""
    import torch

    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    if mode == "tiled":
        vae.enable_tiling()
    try:
        if mode == "sliced":
            return torch.cat([vae.decode(one.to(vae.dtype), return_dict=False)[0] for one in latents.split(1)])
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    finally:
        if mode == "tiled":
            vae.disable_tiling()


def decode(pipe, latents, mode: str = "batched") -> list:
    """Latents → PIL images (see `decode_pixels`)."""
    return pipe.image_processor.postprocess(decode_pixels(pipe, latents, mode), output_type="pil")


def nonfinite_counts(pixels) -> list[int]:
    """NaN/Inf values per image of a decoded batch. Why here, before the PNG: postprocessing turns NaN into
    black (numpy's cast), so after it an FP8 overflow is a silent all-black image. One reduction over the
    pixels, a few milliseconds against a denoising step of seconds (measured in docs/benchmarks.md)."""
    import torch

    return [int(c) for c in (~torch.isfinite(pixels)).flatten(1).sum(1).tolist()]


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
    return run_many(loaded, [(request, num_images)], on_step=on_step, on_latents=on_latents)[0]


def batchable(a: GenerationRequest, b: GenerationRequest) -> bool:
    """Whether two requests may share one denoising batch (the service's SD35_BATCH_WINDOW_MS): same size,
    steps, guidance and LoRA set; prompts, negative prompts and seeds may differ. Edits never share (each
    has its own source latents and schedule share)."""
    return a.edit is None and b.edit is None and \
        (a.height, a.width, a.steps, a.guidance, a.loras) == (b.height, b.width, b.steps, b.guidance, b.loras)


def run_many(
    loaded: LoadedPipeline,
    parts: list[tuple[GenerationRequest, int]],
    *,
    on_step: Callable[[int, int], None] | None = None,
    on_latents: Callable[[int, object], None] | None = None,
) -> list[GenerationResult]:
    """Several requests (each with its image count) as one batch: each prompt encoded on its own, the rows
    stacked, one denoising loop, one decode, then split back into one GenerationResult per request.

    Why images stay what they would be alone: every image keeps its own CPU generator, seeded as if its
    request ran by itself (`image_seeds`), so its starting noise is the same; only the batch size of the
    matmuls changes (the difference is measured in docs/benchmarks.md). Timings and the peak are the
    batch's, shared. `on_latents(step, latents)` sees every row, in the order of `parts`."""
    import torch

    request = parts[0][0]
    if any(not batchable(request, other) for other, _ in parts[1:]):
        raise ValueError("run_many: these requests cannot share a batch (see generate.batchable)")
    pipe, device = loaded.pipe, loaded.device
    exec_device = pipe._execution_device  # the GPU even when offloading
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict[str, float] = {}
    cfg = request.guidance > 1.0
    total = sum(n for _, n in parts)
    # One generator per image, so each image is reproducible on its own (`image_seeds`); CPU generators give
    # the same latents for the same seed on every device.
    seeds = [image_seeds(r.seed, n) for r, n in parts]
    generator = [torch.Generator("cpu").manual_seed(s) for part in seeds for s in part]

    with torch.inference_mode():
        # 1. Encode each prompt (two CLIPs + T5), then stack the rows of every request.
        t = time.perf_counter()
        encoded = [pipe.encode_prompt(
            prompt=r.prompt, prompt_2=None, prompt_3=None, negative_prompt=r.negative_prompt if cfg else None,
            do_classifier_free_guidance=cfg, num_images_per_prompt=n, device=exec_device) for r, n in parts]
        pe, npe, ppe, nppe = (None if e[0] is None else torch.cat(e) for e in zip(*encoded))
        _sync(device)
        timings["encode"] = time.perf_counter() - t

        # 2. Denoise: the MMDiT and the flow-matching scheduler, latents out.
        def step_end(_pipe, i, _t, kwargs):
            if on_latents is not None:
                on_latents(i, kwargs["latents"])
            if on_step is not None:
                on_step(i + 1, request.denoising_steps)
            return kwargs

        t = time.perf_counter()
        if request.edit is not None:  # img2img / inpainting over the same components (edit.py)
            latents = edits.denoise(pipe, request.edit, total, embeds=(pe, npe, ppe, nppe),
                                    steps=request.steps, guidance=request.guidance, height=request.height,
                                    width=request.width, generator=generator, step_end=step_end)
        else:
            latents = pipe(
                prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                negative_pooled_prompt_embeds=nppe, num_inference_steps=request.steps,
                guidance_scale=request.guidance, height=request.height, width=request.width,
                generator=generator, output_type="latent", callback_on_step_end=step_end,
            ).images
        _sync(device)
        timings["denoise"] = time.perf_counter() - t

        # 3. Decode with the VAE: one image at a time, or in tiles, when the batch would not fit.
        from sd35.hardware import free_memory

        mode = decode_mode(free_memory(str(exec_device)), total, request.height, request.width)
        t = time.perf_counter()
        pixels = decode_pixels(pipe, latents, mode)
        nonfinite = nonfinite_counts(pixels)  # 4. before postprocessing turns NaN into black
        images = pipe.image_processor.postprocess(pixels, output_type="pil")
        if request.edit is not None:
            images = edits.composite(images, request.edit)  # inpainting: source pixels outside the mask
        _sync(device)
        timings["decode"] = time.perf_counter() - t
    pipe.maybe_free_model_hooks()
    # 5. Split the batch back into one result per request.
    results, at, peak = [], 0, _peak_memory(device)
    for (r, n), part in zip(parts, seeds):
        results.append(GenerationResult(images[at:at + n], r, part, dict(timings), peak, mode,
                                         nonfinite[at:at + n]))
        at += n
    return results


def sidecar(loaded: LoadedPipeline, result: GenerationResult, image_name: str, index: int = 0,
            extra: dict | None = None) -> dict:
    """Everything needed to reproduce and judge image `index` of `result`, as JSON. Its `parameters` alone
    reproduce it (their seed is this image's own); `batch` says where it came from."""
    import diffusers
    import torch
    import torchao
    import transformers

    seeds = result.seeds or [result.request.seed]
    timings = {"load": round(loaded.load_seconds, 4)}
    timings.update({k: round(v, 4) for k, v in result.timings.items()})
    record = {
        "image": image_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": {**result.request.parameters(), "seed": seeds[index]},
        "batch": {"n": len(seeds), "index": index, "seeds": seeds, "request_seed": result.request.seed},
        **loaded.describe(),
        **(extra or {}),
        "timings_s": timings,
        "peak_memory": result.peak_memory,
        "decode_mode": result.decode_mode,
        "finite": not (result.nonfinite and result.nonfinite[index]),
        "nonfinite_values": result.nonfinite[index] if result.nonfinite else 0,
        "versions": {"sd35": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torchao": torchao.__version__},
    }
    if loaded.source.notice:
        record = {"notice": loaded.source.notice, **record}
    return record


def save(loaded: LoadedPipeline, result: GenerationResult, out_dir: Path,
         extra: dict | None = None) -> list[tuple[Path, Path]]:
    """Write `<out>/<timestamp>-<seed>.png` (each image's own seed) and its `.json` sidecar, atomically.
    Returns the pairs."""
    from PIL.PngImagePlugin import PngInfo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    written = []
    seeds = result.seeds or [result.request.seed] * len(result.images)
    for i, image in enumerate(result.images):
        base = f"{stamp}-{seeds[i]}"
        n = 1
        while (out_dir / f"{base}.png").exists() or (out_dir / f"{base}.json").exists():
            base, n = f"{stamp}-{seeds[i]}-{n}", n + 1
        png, js = out_dir / f"{base}.png", out_dir / f"{base}.json"
        record = sidecar(loaded, result, png.name, i, extra)
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
