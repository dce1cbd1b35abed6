"""The runtime: one loaded pipeline and everything done with it — check, break, generate, save.

Why one object: the CLI, the service worker, the notebooks and the benchmarks all run the same
sequence — check the request against *this* model's defaults and limits, arm the debugger's
breakpoints, generate with step callbacks (progress bars, watchdogs, cancellation, previews), then save
PNG + sidecar. Written once here, a feature that touches a generation (compilation, streaming previews,
a NaN watch, Ray replicas) is added once, and every entry point gets it. (Encoding for HTTP — png, jpeg,
webp at a client's compression — is the API's concern: service/images.py.)

    rt = Runtime.load(settings)                       # load once (precision, device, breakpoints)
    request = rt.check(prompt="a lighthouse", steps=None, seed=None)   # defaults from the model's configs
    result = rt.generate(request, n=2, on_step=print) # per-image seeds, timings, peak memory
    rt.save(result, "outputs")                        # PNG + JSON sidecar, atomically

The layering: settings → models / hardware / precision → load → runtime → CLI | service | notebooks |
bench. Nothing here imports the CLI or the service.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from sd35.inference import compilation
from sd35.debugging import breakpoints
from sd35 import hardware, models
from sd35.inference import edit as edits
from sd35.inference import generate as gen
from sd35.weights import lora as lora_slots
from sd35.inference.inputs import Picture, check_pair
from sd35.weights.load import LoadedPipeline
from sd35.weights.load import load as load_pipeline
from sd35.errors import NonFiniteOutput
from sd35.settings import Settings

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
LatentsCallback = Callable[[int, object], None]


class Cancelled(Exception):
    """A generation stopped at a step boundary: its `cancel` event was set, or (the service) its deadline
    passed or its client gave up."""


class Runtime:
    """A loaded pipeline, the facts about its model (`info`) and the armed breakpoints."""

    def __init__(self, loaded: LoadedPipeline, breaks: list[breakpoints.Break] | None = None,
                 compile_plan: compilation.CompilePlan | None = None, out_dir: Path | str | None = None,
                 lora: lora_slots.Adapters | None = None):
        self.loaded = loaded
        self.lora = lora  # unfused LoRAs: slots installed before compiling (below), so switching never recompiles
        self.out_dir = out_dir  # where `sd35_dump()` at a breakpoint writes
        # Defaults and limits from the loaded folder's own configs (a Turbo folder gets Turbo's steps).
        self.info: models.ModelInfo = models.describe_folder(loaded.source.path, loaded.source.requested)
        self.breaks = list(breaks or [])
        self.harness = None
        if self.breaks:
            breakpoints.validate(self.breaks, loaded.pipe)
            self.harness = breakpoints.arm(loaded.pipe, self.breaks, out_dir)
        log.info("model family %s (%s); defaults %s", self.info.family, self.info.family_reason,
                 self.info.sampling.as_dict())
        # torch.compile of the MMDiT (compiles at the first generation; the service's is its warm-up).
        self.compile = compilation.apply(loaded.pipe.transformer,
                                         compile_plan or compilation.CompilePlan("off", "not requested"))

    @classmethod
    def load(cls, settings: Settings, *, breaks: list[breakpoints.Break] | None = None,
             purpose: str = "generate") -> Runtime:
        """Load the model `settings` describe, arm SD35_BREAK (`breaks` overrides it) and compile as
        SD35_COMPILE says for `purpose` ("generate": a one-off run, "serve": many requests)."""
        breaks = breakpoints.parse(settings.breaks) if breaks is None else breaks
        # The compile plan first: `auto` precision picks fp8 only for a run that compiles, and a compile cache
        # that must be refused is refused in a second, not after the load.
        plan = compilation.resolve(settings, device=hardware.detect(settings.device).device, purpose=purpose)
        loaded = load_pipeline(settings, compiled=plan.mode != "off")
        adapters = lora_slots.prepare(loaded.pipe.transformer, settings,
                                      hotswap=purpose == "serve" or plan.mode != "off")
        return cls(loaded, breaks, plan, settings.output_dir, lora=adapters)

    # --- facts ----------------------------------------------------------------------------------------

    @property
    def pipe(self):
        return self.loaded.pipe

    @property
    def device(self) -> str:
        return self.loaded.device

    def describe(self) -> dict:
        """What every record of an output says about the model and how it was loaded."""
        return {**self.loaded.describe(), "model_info": self.info.as_dict(), "compile": self.compile.as_dict()}

    # --- 1. check -------------------------------------------------------------------------------------

    def check(self, *, prompt: str, negative_prompt: str | None = None, steps: int | None = None,
              guidance: float | None = None, height: int | None = None, width: int | None = None,
              seed: int | str | None = None, image: Picture | None = None, mask: Picture | None = None,
              strength: float | None = None, lora: list | None = None) -> gen.GenerationRequest:
        """A request filled with this model's defaults and checked against its limits and the armed
        breakpoints; with `image` (+ `mask`, `strength`) an edit. Raises InputError (a flag or field, and the fix).
        `lora`: LoraChoices from the LoRA folder (None: the run's SD35_LORAS)."""
        if image is not None:  # an edit's size defaults to its input's, rounded to what the model takes
            width, height = edit_size(self.info, image, width, height)
        request = gen.check_request(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                    height=height, width=width, seed=seed, info=self.info)
        if image is not None:
            request = with_edit(request, image, mask, strength)
        if self.breaks:
            breakpoints.validate(self.breaks, self.pipe, request.denoising_steps)
        if lora is not None:
            request = self._check_lora(request, lora)
        return request

    def _check_lora(self, request: gen.GenerationRequest, lora: list) -> gen.GenerationRequest:
        import dataclasses

        from sd35.weights.lora_files import LoraError

        if lora and self.lora is None:
            raise LoraError("this run has no LoRA slots (no SD35_LORA_DIR, no unfused SD35_LORAS).",
                            "set SD35_LORA_DIR to the folder of LoRAs to offer, and restart.")
        if self.lora is not None:
            self.lora.selection(list(lora))  # names, scales, shapes and ranks checked now: 400 before the queue
        return dataclasses.replace(request, loras=tuple(lora))

    def lora_record(self, request: gen.GenerationRequest) -> dict | None:
        """The LoRAs of a generation (unfused ones active for it, fused ones baked in), for its record."""
        fused = self.loaded.lora_fused
        if self.lora is None:
            return {"mode": "fused", "applied": fused} if fused else None
        record = self.lora.record(self.lora.selection(_choices(request)))
        return {**record, "fused": fused} if fused else record

    # --- 2. generate ----------------------------------------------------------------------------------

    def generate(self, request: gen.GenerationRequest, *, n: int = 1, on_step: StepCallback | None = None,
                 on_latents: LatentsCallback | None = None, cancel: threading.Event | None = None,
                 keep_nonfinite: bool = False) -> gen.GenerationResult:
        """Generate `n` images (image i uses seed `request.seed + i`). `on_step(step, total)` after every
        denoising step; `on_latents(step, latents)` hands over the latents (previews, trajectories);
        setting `cancel` stops the run at the next step with `Cancelled`. An image whose pixels hold NaN/Inf
        raises NonFiniteOutput (it would be saved all black) unless `keep_nonfinite`."""

        def step(i: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {i}/{total}")
            if on_step is not None:
                on_step(i, total)

        result, = self.generate_many([(request, n)], on_step=step, on_latents=on_latents)
        if not result.finite and not keep_nonfinite:
            raise nonfinite_error(result, self.loaded.plan.as_dict(), kept=False)
        return result

    def generate_many(self, parts: list[tuple[gen.GenerationRequest, int]], *,
                      on_step: StepCallback | None = None,
                      on_latents: LatentsCallback | None = None) -> list[gen.GenerationResult]:
        """Several requests that `gen.batchable` lets share a batch (the service's SD35_BATCH_WINDOW_MS),
        as one batch: one result per request. Non-finite images are not raised here: the caller decides
        per request (`nonfinite_error`), so one overflowing prompt does not fail the others."""
        if self.lora is not None:  # the requests' LoRAs into the slots (in place: no recompile)
            self.lora.activate(self.lora.selection(_choices(parts[0][0])))
        with compilation.FirstCall(self.compile):
            results = gen.run_many(self.loaded, parts, on_step=on_step, on_latents=on_latents)
        if self.harness is not None:
            self.harness.report_nan_watch()
        return results

    def warm_up(self, on_step: StepCallback | None = None) -> gen.GenerationResult:
        """A 1-step generation through the same path as a request (kernels, allocator, caches). Compiled, two
        more cover the shapes requests bring — n=2 with CFG at another size (`blocks` marks batch and sequence
        dynamic from the start; `full` makes them symbolic here), then n=1 without CFG (a batch of 1 is its
        own graph) — so no request recompiles
        (compilation.py: New sizes); the compile time recorded covers all three."""
        import time

        d = self.info.sampling
        side = min(d.height, 512)
        request = gen.GenerationRequest("warm-up", steps=1, guidance=d.guidance, height=side,
                                        width=min(d.width, 512), seed=0)
        if self.harness is not None:  # a warm-up must not stop in the debugger
            self.harness.disarm()
        started = time.perf_counter()
        try:
            result = self.generate(request, on_step=on_step, keep_nonfinite=True)
            if not result.finite:  # the warm-up's prompt only: each request is checked on its own
                log.warning("%s", nonfinite_error(result, self.loaded.plan.as_dict(), kept=False).cause)
            if self.compile.mode != "off":  # the shapes requests bring (compilation.py: New sizes)
                other = max(gen.MIN_SIZE, side - 2 * self.info.size_multiple)
                cfg = max(d.guidance, 4.5)
                self.generate(gen.GenerationRequest("warm-up", steps=1, guidance=cfg, height=other,
                                                    width=request.width, seed=0), n=2, on_step=on_step,
                              keep_nonfinite=True)
                self.generate(gen.GenerationRequest("warm-up", steps=1, guidance=0.0, height=side,
                                                    width=request.width, seed=0), on_step=on_step,
                              keep_nonfinite=True)
                self.compile.seconds = round(time.perf_counter() - started, 3)
                self.compile.cache = compilation.cache_counters()
                self.compile.compiles_at_ready = compilation.compiles()
            return result
        finally:
            if self.harness is not None:
                self.harness = breakpoints.arm(self.pipe, self.breaks, self.out_dir)

    # --- 3. save / encode -----------------------------------------------------------------------------

    def save(self, result: gen.GenerationResult, out_dir: Path | str) -> list[tuple[Path, Path]]:
        """PNG + JSON sidecar per image, written atomically; returns the (png, json) pairs."""
        lora = self.lora_record(result.request)
        return gen.save(self.loaded, result, Path(out_dir),
                        extra={"model_info": self.info.as_dict(), "compile": self.compile.as_dict(),
                               **({"lora": lora} if lora else {})})


def _choices(request: gen.GenerationRequest) -> list | None:
    return None if request.loras is None else list(request.loras)


def nonfinite_error(result: gen.GenerationResult, plan: dict, *, kept: bool) -> NonFiniteOutput:
    """The error for images whose decoded pixels hold NaN/Inf: which ones, and how to find where it began."""
    bad = [f"seed {s}: {k:,} values" for s, k in zip(result.seeds, result.nonfinite) if k]
    mode = plan["transformer"] + (" (emulated)" if plan.get("emulated") else "")
    cause = (f"{len(bad)} of {len(result.nonfinite)} image(s) decoded with NaN/Inf ({'; '.join(bad)}) with "
             f"precision {mode}: saved, such an image is all black. "
             + ("It was kept as asked (--keep-nonfinite); its sidecar says \"finite\": false." if kept
                else "Nothing was written."))
    fix = ("find the first module whose output stops being finite with SD35_BREAK=nan (or --break nan), and "
           "compare with --precision bf16; --keep-nonfinite writes the image anyway.")
    return NonFiniteOutput(cause, fix)


def precheck(settings: Settings, **fields) -> gen.GenerationRequest:
    """Check a request *before* loading, with what the model's name and local files tell (no download):
    bad input is refused before a minute of loading. `Runtime.check` checks again once loaded."""
    from sd35.weights import hub

    info = models.info_for(settings.model, hub.find_local(settings))
    image = fields.get("image")
    if image is not None:
        fields["width"], fields["height"] = edit_size(info, image, fields.get("width"), fields.get("height"))
    request = gen.check_request(info=info, **{k: fields.get(k) for k in (
        "prompt", "negative_prompt", "steps", "guidance", "height", "width", "seed")})
    if image is not None:
        request = with_edit(request, image, fields.get("mask"), fields.get("strength"))
    return request


# --- edits (img2img / inpainting): a generation request with an input image ------------------------------

def edit_size(info: models.ModelInfo, image: Picture, width: int | None, height: int | None,
              max_pixels: int | None = None) -> tuple[int | None, int | None]:
    """The size of an edit: what was asked, the rest from the input's size rounded to what the model takes."""
    w, h = edits.auto_size(*image.size, info.size_multiple, info.max_side, max_pixels, gen.MIN_SIZE)
    return (w if width is None else width), (h if height is None else height)


def with_edit(request: gen.GenerationRequest, image: Picture, mask: Picture | None,
              strength: float | None) -> gen.GenerationRequest:
    """`request` turned into an edit of `image` (inpainting with `mask`), inputs at its size."""
    import dataclasses

    check_pair(image, mask)
    return dataclasses.replace(request, edit=edits.prepare(image, mask, strength, request.width, request.height,
                                                           request.steps))
