"""Cheap previews of the denoising: SD3 latents → RGB by a fixed linear projection, no VAE.

Why linear: a partial image (the service's `partial_images`, a notebook's trajectory) must cost
microseconds, not a VAE decode (the VAE of SD3.5 at 1024 px takes about as long as several MMDiT
steps). Each of the 16 latent channels contributes a fixed amount to R, G and B; the result is an image
at latent resolution (1/8 of the output per side), blurry but recognisable after a few steps.

Where the numbers come from: the SD3 latent→RGB factors and bias published in ComfyUI's
`comfy/latent_formats.py` (class `SD3`, `latent_rgb_factors` / `latent_rgb_factors_bias`), which ComfyUI
fitted for the SD3/SD3.5 VAE (both use the same 16-channel VAE). They apply to the latents as the MMDiT
sees them (`(z - shift_factor) * scaling_factor`), which is what diffusers' SD3 pipeline hands to its
step callback. Only the numbers are used here (with attribution), not ComfyUI's code.

On the tiny test model (random VAE weights) the same factors are applied: the preview is a faithful
projection of its latents, but, like the tiny model's final images, it depicts nothing.
"""

from __future__ import annotations

# 16 rows (latent channels) x 3 columns (R, G, B) — ComfyUI, comfy/latent_formats.py, class SD3.
SD3_LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)
SOURCE = "ComfyUI comfy/latent_formats.py SD3.latent_rgb_factors (+ _bias)"


def preview_steps(total_steps: int, count: int) -> list[int]:
    """Evenly spaced completed-step numbers (1-based, before the last step) at which to take `count`
    previews. Fewer when there are not enough steps: the final image comes first (as OpenAI documents)."""
    if count <= 0 or total_steps <= 1:
        return []
    steps = sorted({round(total_steps * (i + 1) / (count + 1)) for i in range(count)})
    return [s for s in steps if 1 <= s < total_steps]


def latents_to_rgb(latents):
    """(B, 16, h, w) latents → (B, h, w, 3) uint8 CPU tensor. Runs on the latents' device, in float32."""
    import torch

    if latents.ndim != 4 or latents.shape[1] != len(SD3_LATENT_RGB_FACTORS):
        raise ValueError(f"expected (batch, {len(SD3_LATENT_RGB_FACTORS)}, h, w) SD3 latents, got "
                         f"{tuple(latents.shape)}")
    with torch.no_grad():
        factors = torch.tensor(SD3_LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(SD3_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors) + bias  # roughly [-1, 1]
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(rgb, size: tuple[int, int] | None = None):
    """One (h, w, 3) uint8 tensor → a PIL image, optionally resized (bilinear) to (width, height)."""
    from PIL import Image

    image = Image.fromarray(rgb.numpy())
    if size is not None and image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return image
