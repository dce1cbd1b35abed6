"""The quality grid of `sd35 bench report` and notebook 03: one prompt and seed in bf16 | fp8-weight | fp8,
each FP8 image with an amplified difference heatmap against bf16, PSNR, SSIM, LPIPS and the per-block error.

Why a column is never filled in by guesswork: an `fp8` that cannot run here (no FP8 tensor cores, and no CPU
emulation in this build) and an LPIPS without local weights each carry the reason instead of a number. The
model is labelled for what it is: the tiny model's random weights make noise, so its grid exercises the code
and says so, never presented as SD3.5's quality.
"""

from __future__ import annotations

from pathlib import Path

from sd35.bench import fidelity
from sd35.bench.perceptual import scorer
from sd35.errors import Sd35Error
from sd35.runtime import Runtime

CANDIDATES = ("fp8-weight", "fp8")
AMPLIFY_MAX = 50  # a difference heatmap is scaled up by at most this much (the factor is printed with it)


def model_label(rt: Runtime) -> str:
    """What the images are made with, said plainly (tiny: random weights, noise)."""
    if rt.info.family == "tiny":
        return "tiny (embedded, random weights: the images are noise, not SD3.5's quality)"
    return f"{rt.loaded.source.requested} ({rt.info.family})"


def _candidate_settings(settings, mode: str):
    """`settings` for one candidate; `fp8` on a machine without FP8 tensor cores asks for CPU emulation where
    this build has it (SD35_FP8_EMULATE)."""
    update = {"precision": mode, "t5": "bf16"}
    if mode == "fp8" and "fp8_emulate" in type(settings).model_fields:
        update["fp8_emulate"] = True
    return settings.model_copy(update=update)


def load_reference(settings) -> Runtime:
    """The bf16 pipeline every candidate is compared with (T5 in bf16 on both sides: only the MMDiT differs)."""
    return Runtime.load(settings.model_copy(update={"precision": "bf16", "t5": "bf16"}), breaks=[])


def load_candidates(settings) -> dict[str, Runtime | str]:
    """Each FP8 candidate loaded, or for one that cannot load here, the reason."""
    candidates: dict[str, Runtime | str] = {}
    for mode in CANDIDATES:
        try:
            rt = Runtime.load(_candidate_settings(settings, mode), breaks=[])
        except Sd35Error as exc:
            emulation = "" if mode != "fp8" or "fp8_emulate" in type(settings).model_fields else \
                " This build has no CPU emulation of fp8 (SD35_FP8_EMULATE)."
            candidates[mode] = f"{mode} not available here: {exc.cause}{emulation}"
            continue
        got = rt.loaded.plan.transformer
        candidates[mode] = rt if got == mode else f"{mode} resolved to {got} here ({rt.loaded.plan.transformer_reason})"
    return candidates


def diff_heatmap(a, b, amplify: float | None = None):
    """|a − b| averaged over RGB, scaled by `amplify` (default: so the largest difference is bright, at most
    AMPLIFY_MAX×), in matplotlib's magma colours: (PIL image, factor used, largest difference in 0…255)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    diff = np.abs(np.asarray(a, dtype=np.int16)[..., :3] - np.asarray(b, dtype=np.int16)[..., :3]).mean(-1)
    largest = float(diff.max())
    if amplify is None:
        amplify = float(min(AMPLIFY_MAX, max(1, int(255 / max(largest, 1.0)))))
    rgb = colormaps["magma"](np.clip(diff * amplify / 255.0, 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).astype(np.uint8)), amplify, round(largest, 2)


def compare_all(reference: Runtime, candidates: dict[str, Runtime | str], request, *, step: int,
                settings) -> tuple[dict, dict]:
    """Every candidate against the reference on `request`: (the JSON-able report, {name: PIL image}); images
    are named "<mode>" and "<mode>-diff"."""
    lpips, lpips_source = scorer(settings)
    columns: dict[str, dict] = {"bf16": {"precision": "bf16"}}
    images: dict = {}
    for mode, rt in candidates.items():
        if isinstance(rt, str):
            columns[mode] = {"missing": rt}
            continue
        r = fidelity.compare(reference, rt, request, step=step)
        images.setdefault("bf16", r.images[0])
        heat, amplify, largest = diff_heatmap(*r.images)
        images[mode], images[f"{mode}-diff"] = r.images[1], heat
        columns[mode] = {"precision": mode, "psnr_db": None if r.psnr_db == float("inf") else round(r.psnr_db, 3),
                         "ssim": round(r.ssim, 5), "rel_err": round(r.image_rel_err, 5),
                         "lpips": None if lpips is None else round(lpips(*r.images), 5),
                         "amplify": amplify, "max_abs_diff": largest, "blocks": r.rows()}
        if lpips is None:
            columns[mode]["lpips_missing"] = lpips_source
    if "bf16" not in images:  # no candidate ran: the reference alone
        images["bf16"] = reference.generate(request).images[0]
    report = {"model": model_label(reference), "tiny": reference.info.family == "tiny",
              "device": reference.device, "prompt": request.prompt, "seed": request.seed, "steps": request.steps,
              "size": f"{request.width}x{request.height}", "step": step,
              "lpips": {"available": lpips is not None, "source": lpips_source}, "columns": columns}
    return report, images


def run(settings, *, prompt: str = "a bowl of ramen, studio photo", seed: int = 0,
        steps: int | None = None) -> tuple[dict, dict]:
    """Load bf16 and the candidates as `settings` describe, compare them at the middle step."""
    reference, candidates = load_reference(settings), load_candidates(settings)
    request = reference.check(prompt=prompt, steps=steps, seed=seed)
    return compare_all(reference, candidates, request, step=request.steps // 2, settings=settings)


def save_images(report: dict, images: dict, out: Path) -> None:
    """Write the grid's PNGs into `out` and name them in the report's columns (`image`, `diff`)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        img.save(out / f"quality-{name}.png")
    for mode, col in report["columns"].items():
        if mode in images:
            col["image"] = f"quality-{mode}.png"
        if f"{mode}-diff" in images:
            col["diff"] = f"quality-{mode}-diff.png"
