"""Edits: img2img (an input image, no mask) and inpainting (with a mask), from the components already loaded.

Why this shape: an edit is a generation request with an input image (+ mask, strength). The prompt is
encoded and the latents decoded exactly as for a generation (generate.run); only the denoising differs, so
only that phase calls diffusers' StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline. Those
pipelines are built as `from_pipe` builds them, from the loaded pipeline's components: the same
transformer, VAE, encoders and scheduler objects — no second copy of the weights, whatever the precision,
compiled or not, with the debugger's hooks and LoRA adapters (all put on those modules) in effect.
(`from_pipe` itself ends with `.to(dtype)` on every shared module — float32 unless told — which would
upcast bf16 in place and which torchao's FP8 tensors refuse; so its first half only.)

Inpainting keeps the source pixels outside the mask: the VAE round trip would change them, so the
result is composited back onto the input with a feathered edge that lies *inside* the mask (as A1111 and
ComfyUI do), leaving every pixel outside the mask exactly as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sd35.errors import InputError
from sd35.inference.inputs import Picture

DEFAULT_STRENGTH = 0.6  # img2img: keeps the input's composition
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting: the masked region is repainted from noise
FEATHER_FRACTION = 1 / 64  # of the shorter side: the blend width inside the mask's edge (min 2 px)


@dataclass(frozen=True)
class EditInput:
    """What turns a generation request into an edit: the input (and mask) at the request's size."""

    image: object  # PIL RGB, width x height of the request
    mask: object | None  # PIL L (255 = repaint), same size, or None for img2img
    strength: float
    image_sha256: str
    mask_sha256: str | None = None
    source_size: tuple[int, int] = (0, 0)  # the input's own (width, height), before resizing

    @property
    def mode(self) -> str:
        return "img2img" if self.mask is None else "inpaint"

    def steps_run(self, steps: int) -> int:
        """Denoising steps that really run: diffusers skips the first (1 - strength) of the schedule."""
        return steps - int(max(steps - steps * self.strength, 0))

    def record(self) -> dict:
        """For the sidecar and the response: enough to find the inputs again and repeat the edit."""
        return {"mode": self.mode, "strength": self.strength, "image_sha256": self.image_sha256,
                "mask_sha256": self.mask_sha256, "source_size": list(self.source_size)}


def auto_size(width: int, height: int, multiple: int, max_side: int, max_pixels: int | None = None,
              min_side: int = 64) -> tuple[int, int]:
    """The input's size rounded to what the model accepts: scaled down (aspect kept) under its largest
    side and `max_pixels`, then each side rounded to a multiple of `multiple`."""
    scale = min(1.0, max_side / max(width, height))
    if max_pixels:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    w, h = width * scale, height * scale

    def fit(side: float) -> int:
        return int(min(max_side // multiple * multiple, max(min_side, round(side / multiple) * multiple)))

    w, h = fit(w), fit(h)
    while max_pixels and w * h > max_pixels:  # rounding up may cross the pixel limit: step the longer side down
        if w >= h:
            w -= multiple
        else:
            h -= multiple
    return w, h


def prepare(image: Picture, mask: Picture | None, strength: float | None, width: int, height: int,
            steps: int) -> EditInput:
    """Check `strength` (and that it leaves at least one step) and bring the input and mask to the request's
    size. Raises InputError naming `strength`."""
    from PIL import Image

    if strength is None:
        strength = DEFAULT_STRENGTH if mask is None else DEFAULT_INPAINT_STRENGTH
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise InputError(f"strength {strength!r} must be a number above 0 and at most 1.",
                         "pass --strength 0.6 (0.3 stays close to the input, 1.0 repaints it).", param="strength")
    edit = EditInput(image.image, mask.image if mask else None, float(strength), image.sha256,
                     mask.sha256 if mask else None, image.size)
    if edit.steps_run(steps) < 1:
        raise InputError(f"strength {strength:g} of {steps} steps runs no denoising step.",
                         f"raise strength to at least {1 / steps:.2f} or the steps to {math.ceil(1 / strength)}.",
                         param="strength")
    if image.size != (width, height):
        pic = image.image.resize((width, height), Image.Resampling.LANCZOS)
        repaint = mask.image.resize((width, height), Image.Resampling.NEAREST) if mask else None
        edit = EditInput(pic, repaint, edit.strength, edit.image_sha256, edit.mask_sha256, image.size)
    return edit


def pipeline(pipe, mode: str):
    """The img2img or inpaint pipeline over `pipe`'s own components (cached on it: built once)."""
    cache = pipe.__dict__.setdefault("_sd35_edit_pipes", {})
    if mode not in cache:
        import inspect

        from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

        cls = StableDiffusion3Img2ImgPipeline if mode == "img2img" else StableDiffusion3InpaintPipeline
        wanted = inspect.signature(cls.__init__).parameters
        # = cls.from_pipe(pipe) without its closing `.to(dtype)`: that cast would reach the shared modules
        # (float32 by default; torchao's FP8 tensors refuse it).
        cache[mode] = cls(**{k: v for k, v in pipe.components.items() if k in wanted})
        cache[mode].set_progress_bar_config(disable=True)
    edit_pipe = cache[mode]
    # Components replaced on the loaded pipeline since (a compiled transformer, a new scheduler) follow.
    for name, component in pipe.components.items():
        if name in edit_pipe.components and getattr(edit_pipe, name, None) is not component:
            setattr(edit_pipe, name, component)
    return edit_pipe


def denoise(pipe, edit: EditInput, n: int, *, embeds: tuple, steps: int, guidance: float, height: int,
            width: int, generator, step_end):
    """The edit's denoising: latents out, as the text-to-image path's `pipe(..., output_type="latent")`."""
    pe, npe, ppe, nppe = embeds
    extra = {} if edit.mask is None else {"mask_image": [edit.mask] * n}
    return pipeline(pipe, edit.mode)(
        image=[edit.image] * n, strength=edit.strength, prompt_embeds=pe, negative_prompt_embeds=npe,
        pooled_prompt_embeds=ppe, negative_pooled_prompt_embeds=nppe, num_inference_steps=steps,
        guidance_scale=guidance, height=height, width=width, generator=generator, output_type="latent",
        callback_on_step_end=step_end, **extra,
    ).images


def feather(mask, radius: int):
    """A 0..1 blend weight: 0 outside the mask, rising to 1 within `radius` px inside its edge."""
    import numpy as np
    from PIL import ImageFilter

    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    return np.clip(2.0 * blurred - 1.0, 0.0, 1.0) * (np.asarray(mask) > 127)


def composite(images: list, edit: EditInput) -> list:
    """Inpainting: the source pixels outside the mask, the generated ones inside, blended at the edge."""
    import numpy as np
    from PIL import Image

    if edit.mask is None:
        return images
    radius = max(2, round(min(edit.mask.size) * FEATHER_FRACTION))
    weight = feather(edit.mask, radius)[..., None]
    source = np.asarray(edit.image, dtype=np.float32)
    out = []
    for im in images:
        made = np.asarray(im.convert("RGB"), dtype=np.float32)
        out.append(Image.fromarray(np.round(source * (1 - weight) + made * weight).astype(np.uint8), "RGB"))
    return out
