"""Load SD3.5 once, in the chosen precision, onto the chosen device.

Why one function for every entry point: the CLI, the service and the notebooks must get the same
pipeline for the same settings, and the expensive, error-prone steps (resolving the model, FP8
quantization, placement) must happen exactly once per process, never per request.

The procedure, in order:
  1. Detect the hardware and resolve the precision plan (refuse impossible requests before loading).
  2. Resolve the model to a local diffusers folder (tiny | local folder | Hub cache | pre-quantized store);
     with SD35_TRANSFORMER the transformer comes from one SAI/ComfyUI file instead (singlefile.py),
     checked from its header first and refused unless it has the folder's architecture.
  3. Read the pipeline on the CPU, component by component, safetensors only (lean.py; fp8io.py for pre-quantized):
     - a pre-quantized folder (`sd35 cache quantize`): transformer and T5 come off disk as FP8 data +
       scales, mapped from the files as stored (torchao's own deserializer), no bf16 copy anywhere;
     - a bf16 source in an FP8 mode (SD35_LEAN_LOAD=1, the default): transformer and T5 are quantized
       as their shards are read, so host RAM holds one FP8 component, never the bf16 pipeline;
     - otherwise everything in bf16 (`StableDiffusion3Pipeline.from_pretrained`).
  4. Quantize what is still bf16 with torchao, moving one layer at a time to the device (the GPU never
     holds a full bf16 copy next to the FP8 one); FP8 weights read in step 3 are only rewrapped for
     the mode (`retarget.retarget`: `fp8` adds dynamic activation quantization to the same bytes).
  5. Place the rest: onto the device, or accelerate's CPU offload for GPUs that cannot hold it all.
  6. Record what was loaded: source, precision with reasons, weight bytes per component, timing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sd35 import hardware, precision
from sd35.weights import fp8io, hub, lean, retarget, singlefile, store
from sd35.weights.fp8io import QUANT_MODES
from sd35.errors import ModelError
from sd35.settings import Settings

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


@dataclass
class LoadedPipeline:
    """A ready pipeline plus the facts every output records about it."""

    pipe: object  # diffusers.StableDiffusion3Pipeline
    source: hub.ModelSource
    hardware: hardware.Hardware
    plan: precision.PrecisionPlan
    offload: str
    load_seconds: float
    weight_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    load_path: str = "bf16-quantize"  # prequantized | lean | bf16-quantize | single-file (how step 3 read them)
    lora_fused: list[dict] = field(default_factory=list)  # --lora-fuse: LoRAs baked into the weights (lora.py)

    @property
    def device(self) -> str:
        return self.hardware.device

    def describe(self) -> dict:
        return {
            "model": self.source.as_dict(),
            "device": self.hardware.as_dict(),
            "precision": self.plan.as_dict(),
            "offload": self.offload,
            "weight_bytes": self.weight_bytes,
            "load_path": self.load_path,
            **({"lora_fused": self.lora_fused} if self.lora_fused else {}),
        }


def load(settings: Settings, *, compiled: bool | None = None) -> LoadedPipeline:
    """Load the pipeline described by `settings` (see the module docstring for the steps). `compiled`:
    whether the caller will compile the MMDiT (`auto` precision picks fp8 only then)."""
    import torch

    from sd35 import logs

    started = time.perf_counter()

    # 1. Hardware and precision: an impossible request stops here, before any download or load.
    hw = hardware.detect(settings.device)
    plan = precision.resolve(settings.precision, settings.t5, hw, emulate=settings.fp8_emulate, compiled=compiled)
    log.info("device: %s", hw.describe())
    log.info("precision: transformer %s (%s); T5 %s (%s)", plan.transformer, plan.transformer_reason,
             plan.t5, plan.t5_reason)
    offload = settings.offload
    if offload != "none" and not hw.is_cuda:
        log.warning("offload=%s ignored: it moves weights between a GPU and the CPU, and the device is %s",
                    offload, hw.device)
        offload = "none"

    # A single-file transformer (SD35_TRANSFORMER) is checked from its header before anything is loaded.
    file_info = singlefile.inspect(settings.transformer) if settings.transformer else None

    # 2. Model files.
    with_t5 = plan.t5 != "off"
    source = hub.resolve(settings, with_t5=with_t5)
    log.info("model: %s (%s) from %s", source.requested, source.kind, source.path)
    if file_info is not None:
        singlefile.check_matches(file_info, source.path)
        log.info("transformer: %s", file_info.describe())

    # 3. Read the pipeline in bf16 on the CPU.
    logs.quiet(logging.getLogger("sd35").getEffectiveLevel() > logging.DEBUG)
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    record = store.read_record(source.path)
    if record is not None:
        store.check_plan(record, plan, source.path)
        log.info("pre-quantized folder: %s from %s", record.get("precision"), record.get("source", {}))
    fp8_t5_on_disk = record is not None and record.get("t5") in QUANT_MODES
    lean_read = settings.lean_load and plan.transformer in QUANT_MODES
    load_path = "prequantized" if record is not None else ("lean" if lean_read else "bf16-quantize")
    if file_info is not None:
        load_path = "single-file"
    fused = _lora_fuse_plan(settings, source.path, load_path)  # [] unless --lora-fuse
    try:
        if file_info is not None:
            extra["transformer"], _ = singlefile.load_transformer(settings.transformer, source.path, plan.transformer)
        elif record is not None:
            extra["transformer"] = fp8io.load_transformer(source.path)
        elif lean_read:
            extra["transformer"] = lean.load_transformer(source.path, quantize=True,
                                                         transform=_lora_transform(fused))
        if with_t5 and (fp8_t5_on_disk or (settings.lean_load and plan.t5 in QUANT_MODES)):
            extra["text_encoder_3"] = lean.load_t5(source.path, quantize=not fp8_t5_on_disk)
        pipe = StableDiffusion3Pipeline.from_pretrained(  # safetensors only: a pickle runs its writer's code
            source.path, dtype=torch.bfloat16, use_safetensors=not settings.allow_pickle_weights, **extra)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign folder gets a cause and a fix
        raise ModelError(
            f"diffusers could not load {source.path} as a Stable Diffusion 3.5 pipeline: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "check that the folder is a complete SD3/SD3.5 diffusers checkpoint (`sd35 cache verify`), "
            "or re-download it" + ("; weights load from .safetensors only: convert the .bin files, or trust "
                                   "their writer and set SD35_ALLOW_PICKLE_WEIGHTS=1." if "safetensors" in str(exc)
                                   else "."),
        ) from None
    pipe.set_progress_bar_config(disable=True)
    if fused and load_path != "lean":  # bf16 weights, not yet quantized: baked in now
        from sd35.weights import lora

        lora.fuse_into(pipe.transformer, fused)

    # 4. Quantize once, layer by layer on the target device (or rewrap what came off disk as FP8).
    target = hw.device
    for module, mode, component in ((pipe.transformer, plan.transformer, "transformer"),
                                    (pipe.text_encoder_3 if with_t5 else None, plan.t5, "t5")):
        if module is None:
            continue
        if retarget.is_fp8(module):
            if mode == "fp8":
                retarget.retarget(module, mode)
        else:
            precision.apply(module, mode, device=target, component=component, emulated=plan.emulated)

    # 5. Placement.
    if offload == "model":
        pipe.enable_model_cpu_offload(device=target)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=target)
    else:
        pipe.to(target)

    # 6. Record.
    weights = {name: precision.weight_bytes(getattr(pipe, name, None)) for name in COMPONENTS}
    weights["total"] = {k: sum(w[k] for w in weights.values()) for k in ("parameters", "buffers", "total")}
    seconds = time.perf_counter() - started
    log.info("loaded in %.1f s; transformer weights %.3f GB", seconds, weights["transformer"]["total"] / 1e9)
    if source.notice:
        log.warning("%s", source.notice)
    from sd35.weights import lora

    return LoadedPipeline(pipe, source, hw, plan, offload, seconds, weights, load_path, lora.fused_record(fused))


def _lora_fuse_plan(settings: Settings, folder, load_path: str) -> list:
    """--lora-fuse: SD35_LORAS read and checked against the folder's transformer config (a meta-built
    model: no weights), before the weights they are baked into are read."""
    if not settings.lora_fuse or not settings.loras:
        return []
    import json

    import torch
    from diffusers import SD3Transformer2DModel

    from sd35.weights import lora, lora_files

    if load_path == "prequantized":
        raise lora_files.LoraError(
            f"--lora-fuse needs bf16 weights to bake the LoRA into; {folder} is pre-quantized (FP8 on disk).",
            "drop --lora-fuse (unfused LoRAs work on FP8), or load the bf16 model.")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        meta = SD3Transformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return lora.fuse_plan(settings, lora_files.ModelShape.of(meta))


def _lora_transform(fused: list):
    if not fused:
        return None
    from sd35.weights import lora

    return lambda name, t: lora.fused_weight(name[: -len(".weight")], t, fused) if name.endswith(".weight") else t
