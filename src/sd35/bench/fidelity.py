"""FP8 fidelity: how far a precision mode moves each MMDiT block and the final image from bf16.

Why in the package and not in a notebook: the same comparison serves the notebook
(03-fp8-fidelity), tests and, later, the CLI. It runs the same prompt and seed through a reference
pipeline (bf16) and a candidate (fp8-weight or fp8), records the output of every joint transformer
block at one denoising step with forward hooks, and reports per block the relative L2 error and cosine
similarity of the image stream and the text stream, then PSNR/SSIM/relative error of the final images.

The per-block error is *accumulated*: block k of the candidate sees the candidate's own (already
slightly different) inputs, which is what a user's image goes through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd35.inference import generate as gen
from sd35.runtime import Runtime


@dataclass
class BlockError:
    block: int
    image_rel_err: float
    image_cosine: float
    text_rel_err: float | None  # None for the last block, which emits no text stream
    text_cosine: float | None


@dataclass
class FidelityReport:
    reference: str
    candidate: str
    step: int
    blocks: list[BlockError] = field(default_factory=list)
    image_rel_err: float = 0.0
    psnr_db: float = 0.0
    ssim: float = 0.0
    images: tuple = ()  # (reference PIL image, candidate PIL image)

    def rows(self) -> list[dict]:
        return [vars(b) for b in self.blocks]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def capture_blocks(rt: Runtime, request: gen.GenerationRequest, step: int) -> tuple[list, object]:
    """Run `request` and return ([(text_out, image_out) per block at `step`], the generation result)."""
    pipe = rt.pipe
    captured: list = [None] * len(pipe.transformer.transformer_blocks)

    def hook(index):
        def fn(module, args, kwargs, output):
            if (pipe.scheduler.step_index or 0) == step:
                text, image = output if isinstance(output, tuple) else (None, output)
                captured[index] = (None if text is None else text.detach().to("cpu", torch.float32),
                                   image.detach().to("cpu", torch.float32))
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(pipe.transformer.transformer_blocks)]
    try:
        result = rt.generate(request)
    finally:
        for h in handles:
            h.remove()
    return captured, result


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (PIL or arrays)."""
    x = torch.as_tensor(_array(a), dtype=torch.float64)
    y = torch.as_tensor(_array(b), dtype=torch.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def ssim(a, b) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) over the channels of two uint8 images."""
    x = torch.as_tensor(_array(a), dtype=torch.float64).permute(2, 0, 1).unsqueeze(0)
    y = torch.as_tensor(_array(b), dtype=torch.float64).permute(2, 0, 1).unsqueeze(0)
    c = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum())
    win = (g[:, None] * g[None, :]).expand(c, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, win, groups=c)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def image_rel_err(a, b) -> float:
    """Relative L2 difference of two uint8 images (PIL or arrays), `a` the reference."""
    return _rel(torch.as_tensor(_array(a), dtype=torch.float64), torch.as_tensor(_array(b), dtype=torch.float64))


def _array(img):
    import numpy as np

    arr = np.array(img)  # a copy: PIL's buffer is read-only
    return arr[..., None] if arr.ndim == 2 else arr


def compare(reference: Runtime, candidate: Runtime, request: gen.GenerationRequest,
            step: int = 0) -> FidelityReport:
    """Per-block and final-image differences between two loaded runtimes on the same request."""
    ref_blocks, ref_result = capture_blocks(reference, request, step)
    cand_blocks, cand_result = capture_blocks(candidate, request, step)
    report = FidelityReport(reference.loaded.plan.transformer, candidate.loaded.plan.transformer, step)
    for i, (r, c) in enumerate(zip(ref_blocks, cand_blocks)):
        if r is None or c is None:
            continue
        (rt, ri), (ct, ci) = r, c
        report.blocks.append(BlockError(
            i, _rel(ri, ci), _cos(ri, ci),
            None if rt is None else _rel(rt, ct), None if rt is None else _cos(rt, ct)))
    a, b = ref_result.images[0], cand_result.images[0]
    report.images = (a, b)
    report.image_rel_err = image_rel_err(a, b)
    report.psnr_db, report.ssim = psnr(a, b), ssim(a, b)
    return report


def per_block(settings, *, prompt: str, seed: int, steps: int | None = None, step: int | None = None) -> dict:
    """`sd35 fidelity --per-block`: load the model in bf16 and in the candidate precision (settings.precision),
    run the same request through both, and report each block's error at one step (default: the middle one).
    SD35_LORAS (`--lora`) are applied to both: FP8 + LoRA against bf16 + LoRA.
    Returns the JSON document: {"model", "device", "reference", "candidate", "step", "steps", "seed",
    "blocks": [{block, image_rel_err, image_cosine, text_rel_err, text_cosine}, …], "image": {…}}."""
    from sd35.errors import InputError
    from sd35.runtime import precheck

    if settings.precision == "bf16":
        raise InputError("--precision bf16 would compare bf16 with itself.",
                         "pass --precision fp8-weight (any device) or fp8 (SM >= 8.9), or leave it on auto.",
                         param="precision")
    request = precheck(settings, prompt=prompt, steps=steps, seed=str(seed))
    step = request.steps // 2 if step is None else step
    if not 0 <= step < request.steps:
        raise InputError(f"--step {step}: the run has steps 0…{request.steps - 1}.",
                         f"pick a step below {request.steps}.", param="step")
    t5 = settings.t5 if settings.t5 != "auto" else "bf16"
    candidate = Runtime.load(settings.model_copy(update={"t5": t5}), breaks=[])
    if candidate.loaded.plan.transformer == "bf16":
        raise InputError(f"precision {settings.precision} resolved to bf16 on {candidate.device}: nothing to compare.",
                         "pass --precision fp8-weight.", param="precision")
    reference = Runtime.load(settings.model_copy(update={"precision": "bf16", "t5": t5}), breaks=[])
    request = candidate.check(prompt=prompt, steps=steps, seed=request.seed)
    report = compare(reference, candidate, request, step=step)
    return {"model": settings.model, "device": candidate.device, "reference": report.reference,
            "candidate": report.candidate, "emulated": candidate.loaded.plan.emulated, "step": step,
            "steps": request.steps, "seed": request.seed, "blocks": report.rows(), "lora": candidate.lora_record(request),
            "image": {"rel_err": report.image_rel_err, "ssim": report.ssim,
                      "psnr_db": None if report.psnr_db == float("inf") else report.psnr_db}}  # JSON has no inf
