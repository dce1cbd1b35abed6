"""LoRAs applied to the loaded transformer: unfused side paths in hot-swap slots, or fused into bf16 weights.

Why a side path and not `W + BA`: the transformer's linears are FP8 (torchao Float8Tensor) in the modes
this workspace exists for, and adding a low-rank update to FP8 codes means dequantize → add → requantize,
per request, with the requantization error on top. Instead each targeted `nn.Linear` gets a forward hook
computing `y + (x Aᵀ) Bᵀ` in bf16 next to the quantized matmul: it works the same on bf16, fp8-weight and
fp8, on lean, pre-quantized and single-file loads, and the LoRA's own numbers are never quantized.

Why slots: switching LoRAs between requests on a compiled model must not recompile. Each targeted linear
holds two fixed-size buffers, `sd35_lora_down` [R, in] and `sd35_lora_up` [out, R] (non-persistent: not in
state dicts), with R = SD35_LORA_MAX_RANK when serving or compiled (R = the LoRAs' total rank for an
eager one-off run). Activating LoRAs copies their A and B (B pre-scaled by scale × alpha / rank) into the
slots in place, zeros the rest: same tensors, same shapes, same hooks → the compiled graphs stay valid
(measured: tests/test_lora.py, `sd35 bench lora`). Several LoRAs at once share a slot along the rank
axis (their total rank on one layer must fit R). Zeroed slots add exactly 0 (scale 0 is bit-identical to
no LoRA). diffusers' `enable_lora_hotswap` does the same with PEFT's layers; PEFT is not pinned here.

`--lora-fuse` (SD35_LORA_FUSE=1) instead bakes `W + scale·alpha/r·BA` into the bf16 weights before they
are quantized (no side-path cost; not switchable per request; recorded as `lora_fused`). A pre-quantized
folder or an FP8 single file has no bf16 weights to bake into: refused, with the fix.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from sd35.weights import lora_catalog, lora_files
from sd35.weights.lora_catalog import LoraChoice
from sd35.weights.lora_files import LoraError, LoraFile, ModelShape

log = logging.getLogger(__name__)

DOWN, UP = "sd35_lora_down", "sd35_lora_up"


def _side_path(module, args, output):
    """Forward hook: the LoRA's low-rank update in bf16 beside the (possibly FP8) linear."""
    import torch.nn.functional as F

    down, up = getattr(module, DOWN), getattr(module, UP)
    return output + F.linear(F.linear(args[0].to(down.dtype), down), up).to(output.dtype)


def _weight_device(module):
    return module.weight.device


class Adapters:
    """The unfused LoRAs of one transformer: planned files, slots, and what is active now."""

    def __init__(self, transformer, shape: ModelShape, *, folder: Path | None, max_rank: int, hotswap: bool,
                 allow_partial: bool, defaults: list[tuple[LoraChoice, Path]] = ()):
        self.transformer = transformer
        self.shape = shape
        self.folder = folder
        self.max_rank = max_rank
        self.hotswap = hotswap
        self.allow_partial = allow_partial
        self.slot_rank = 0
        self.slots: dict[str, object] = {}
        self.defaults = list(defaults)  # SD35_LORAS / --lora: the selection of a request that names none
        self._plans: dict[tuple, LoraFile] = {}
        self._tensors: OrderedDict = OrderedDict()  # path → loaded tensors (a few, LRU)
        self._active: tuple | None = None

    # --- files -------------------------------------------------------------------------------------------

    def plan(self, path: Path, name: str | None = None) -> LoraFile:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._plans:
            self._plans[key] = lora_files.plan(path, self.shape, allow_partial=self.allow_partial,
                                               max_rank=self.max_rank if self.hotswap else None, name=name)
            log.info("%s", self._plans[key].describe())
        return self._plans[key]

    def _load(self, lf: LoraFile) -> dict:
        import torch

        key = (str(lf.path), lf.path.stat().st_mtime_ns)
        if key not in self._tensors:
            self._tensors[key] = lora_files.load(lf, torch.float32)
            while len(self._tensors) > 4:
                self._tensors.popitem(last=False)
        self._tensors.move_to_end(key)
        return self._tensors[key]

    def selection(self, choices: list[LoraChoice] | None) -> list[tuple[LoraChoice, LoraFile]]:
        """A request's LoRAs (names in the folder only) planned; None: the defaults (SD35_LORAS)."""
        if choices is None:
            return [(c, self.plan(p, Path(c.name).stem)) for c, p in self.defaults]
        picked = []
        for c in choices:
            lora_catalog.check_scale(c.scale, c.name)
            path = lora_catalog.in_folder(self.folder, c.name)
            picked.append((c, self.plan(path, path.stem)))
        self._check_fits(picked)
        return picked

    def _check_fits(self, picked) -> None:
        ranks: dict[str, int] = {}
        for _, lf in picked:
            for t in lf.targets:
                ranks[t.module] = ranks.get(t.module, 0) + t.rank
        if self.slots:
            over = next(((m, r) for m, r in ranks.items() if r > self.slot_rank), None)
            if over:
                raise LoraError(f"the LoRAs asked for add up to rank {over[1]} on {over[0]}, above the hot-swap "
                                f"slots' rank {self.slot_rank} (SD35_LORA_MAX_RANK).",
                                "ask for fewer LoRAs at once, or raise SD35_LORA_MAX_RANK (and restart).")

    # --- slots -------------------------------------------------------------------------------------------

    def install(self, modules: set[str], rank: int) -> int:
        """Give each module in `modules` a rank-`rank` slot and the side-path hook (once); returns how many
        were new (a new hook on a compiled model recompiles once: logged)."""
        import torch

        if self.slots and rank != self.slot_rank:
            raise ValueError("slots have one rank")
        self.slot_rank = rank
        new = 0
        for name in sorted(modules - set(self.slots)):
            mod = self.transformer.get_submodule(name)
            dev = _weight_device(mod)
            mod.register_buffer(DOWN, torch.zeros(rank, mod.in_features, dtype=torch.bfloat16, device=dev),
                                persistent=False)
            mod.register_buffer(UP, torch.zeros(mod.out_features, rank, dtype=torch.bfloat16, device=dev),
                                persistent=False)
            mod.register_forward_hook(_side_path)
            self.slots[name] = mod
            new += 1
        return new

    def activate(self, picked: list[tuple[LoraChoice, LoraFile]]) -> None:
        """Copy the picked LoRAs into the slots (in place; no-op when they are already there)."""
        import torch

        key = tuple((str(lf.path), lf.path.stat().st_mtime_ns, c.scale) for c, lf in picked)
        if key == self._active:
            return
        missing = {t.module for _, lf in picked for t in lf.targets} - set(self.slots)
        if missing:
            log.warning("LoRA layers without a slot (a file added after start): %d new slots; a compiled model "
                        "recompiles once", len(missing))
            self.install(missing, self.slot_rank or max(lf.rank for _, lf in picked))
        with torch.no_grad():
            for mod in self.slots.values():
                getattr(mod, DOWN).zero_()
                getattr(mod, UP).zero_()
            offset: dict[str, int] = {}
            for c, lf in picked:
                for module, (down, up, s) in self._load(lf).items():
                    o, r = offset.get(module, 0), down.shape[0]
                    mod = self.slots[module]
                    getattr(mod, DOWN)[o:o + r].copy_(down)
                    getattr(mod, UP)[:, o:o + r].copy_(up * (s * c.scale))
                    offset[module] = o + r
        self._active = key

    def record(self, picked: list[tuple[LoraChoice, LoraFile]]) -> dict:
        """What a sidecar and a response say about the LoRAs of one generation."""
        return {"mode": "unfused", "slot_rank": self.slot_rank, "slots": len(self.slots),
                "hotswap": self.hotswap, "applied": [entry(c, lf) for c, lf in picked]}


def entry(choice: LoraChoice, lf: LoraFile) -> dict:
    return {"name": lf.name, "path": str(lf.path), "sha256": lora_files.sha256(lf.path), "scale": choice.scale,
            "layout": lf.layout, "rank": lf.rank, "layers_applied": lf.applied_layers,
            "layers_in_file": lf.file_layers, "linears": len(lf.targets), "skipped_keys": len(lf.skipped)}


def prepare(transformer, settings, *, hotswap: bool) -> Adapters | None:
    """The unfused LoRAs of a run (SD35_LORAS, unless fused) and the service's folder (SD35_LORA_DIR): plan
    every file, install the slots, activate the defaults. None when there are no LoRAs at all."""
    folder = Path(settings.lora_dir).expanduser() if settings.lora_dir else None
    choices = [] if settings.lora_fuse else lora_catalog.parse_specs(settings.loras)
    if not choices and folder is None:
        return None
    shape = ModelShape.of(transformer)
    defaults = [(c, lora_catalog.resolve(c, folder, allow_paths=True)) for c in choices]
    ad = Adapters(transformer, shape, folder=folder, max_rank=settings.lora_max_rank, hotswap=hotswap,
                  allow_partial=settings.lora_allow_partial, defaults=defaults)
    picked = ad.selection(None)
    modules = {t.module for _, lf in picked for t in lf.targets}
    for path in lora_catalog.folder_files(folder):
        try:
            modules |= {t.module for t in ad.plan(path, path.stem).targets}
        except LoraError as exc:  # offered by the folder but unusable: said now, refused when asked for
            log.warning("SD35_LORA_DIR: %s", exc.cause)
    total = sum(lf.rank for _, lf in picked)
    rank = settings.lora_max_rank if hotswap else max(total, 1)
    if hotswap and total > rank:
        raise LoraError(f"SD35_LORAS add up to rank {total}, above SD35_LORA_MAX_RANK={rank}.",
                        f"raise SD35_LORA_MAX_RANK to {total}, or use fewer LoRAs.")
    ad.install(modules, rank)
    ad.activate(picked)
    log.info("LoRA slots: %d linears, rank %d (%s)", len(ad.slots), rank,
             "hot-swap: switching LoRAs does not recompile" if hotswap else "eager, sized to the LoRAs")
    return ad


# --- fused ---------------------------------------------------------------------------------------------


def fuse_plan(settings, shape: ModelShape) -> list[tuple[LoraChoice, LoraFile, dict]]:
    """SD35_LORAS read for fusing (--lora-fuse): each choice, its plan and tensors."""
    import torch

    if not settings.lora_fuse:
        return []
    folder = Path(settings.lora_dir).expanduser() if settings.lora_dir else None
    out = []
    for c in lora_catalog.parse_specs(settings.loras):
        path = lora_catalog.resolve(c, folder, allow_paths=True)
        lf = lora_files.plan(path, shape, allow_partial=settings.lora_allow_partial, name=Path(c.name).stem)
        log.info("%s (fused)", lf.describe())
        out.append((c, lf, lora_files.load(lf, torch.float32)))
    return out


def fused_weight(name: str, weight, fused) -> object:
    """`weight` (bf16) with every fused LoRA's update for module `name` added (in fp32, rounded once)."""
    total = None
    for c, _, tensors in fused:
        if name in tensors:
            down, up, s = tensors[name]
            d = (up @ down) * (s * c.scale)
            total = d if total is None else total + d
    if total is None:
        return weight
    return (weight.float() + total.to(weight.device)).to(weight.dtype)


def fuse_into(transformer, fused) -> int:
    """Bake the fused LoRAs into `transformer`'s bf16 linear weights in place; returns linears changed."""
    import torch

    changed = 0
    names = {m for _, _, tensors in fused for m in tensors}
    with torch.no_grad():
        for name in sorted(names):
            mod = transformer.get_submodule(name)
            if type(mod.weight.data) is not torch.Tensor:
                raise LoraError(f"--lora-fuse: {name} is already quantized ({type(mod.weight.data).__name__}); "
                                "fusing needs the bf16 weights.", "drop --lora-fuse (unfused works on FP8).")
            mod.weight.data = fused_weight(name, mod.weight.data, fused)
            changed += 1
    return changed


def fused_record(fused) -> list[dict]:
    return [{**entry(c, lf), "mode": "fused"} for c, lf, _ in fused]
