"""The full SD3.5 pipeline of a published architecture in random weights, put in a precision mode as the
loader would: what `sd35 bench gpu` measures the peak memory of ("peak VRAM of the full fp8 pipeline").

Why the whole pipeline and not the transformer alone: a real run holds the MMDiT, both CLIPs, T5-XXL and the
VAE at once, and its peak comes from the VAE decode or the CFG-doubled denoising step on top of all of them.
Why random weights built in place: nothing is downloaded (the gated repos are 16-25 GB), and bytes depend on
shapes and on what a mode quantizes, not on values. The modules are created directly on the target device
in bf16 (random init on a GPU takes seconds for Large), from the registry's configs (`models.MODELS[arch]`).
Precision follows the loader's own plan (`precision.resolve` with T5 `auto`, then `precision.apply` per
component), so what is quantized here is what a `--precision fp8` load quantizes. The tokenizers are the
tiny model's local ones (`weights.tiny`): their ids fit every vocabulary, and nothing is fetched.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from sd35 import hardware, models, precision
from sd35.weights import hub, load, tiny


@contextmanager
def _building(device: str):
    """New parameters are created on `device` in bf16 (no fp32 copy, no host detour)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _tokenizers(cache_dir: Path) -> tuple:
    from transformers import CLIPTokenizer, T5Tokenizer

    folder = tiny.ensure(cache_dir)
    return (CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            T5Tokenizer.from_pretrained(folder / "tokenizer_3"))


def _modules(spec: models.ModelSpec, tokenizers: tuple) -> dict:
    """The five modules of `spec`'s architecture, random init, on the current default device and dtype. A
    config without a vocabulary (the tiny model's) takes its tokenizer's size."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok, tok_2, tok_3 = tokenizers
    clip_l, clip_g, t5 = spec.text_encoders

    def clip(config: dict, t):
        ids = dict(bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
        return CLIPTextModelWithProjection(CLIPTextConfig(**{"vocab_size": len(t), **config, **ids}))

    blocks = len(spec.vae["block_out_channels"])
    vae = {"down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
           **spec.vae}
    return {
        "transformer": SD3Transformer2DModel.from_config(spec.transformer),
        "vae": AutoencoderKL.from_config(vae),
        "text_encoder": clip(clip_l, tok),
        "text_encoder_2": clip(clip_g, tok_2),
        "text_encoder_3": T5EncoderModel(T5Config(**{"vocab_size": len(tok_3), **t5}, decoder_start_token_id=0)),
    }


def build(arch: str, device: str, *, emulated: bool, cache_dir: Path, mode: str = "fp8",
          t5: str = "auto") -> load.LoadedPipeline:
    """The full pipeline of `arch` on `device` in `mode`: 1. resolve the precision plan as a load would
    (T5 `auto` unless `t5` says); 2. build every module in bf16 on the device; 3. quantize the transformer and T5 with the
    loader's verb; 4. wrap it as a LoadedPipeline, so `generate.run` runs it like a loaded model."""
    import time

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    started = time.perf_counter()
    hw = hardware.detect(device)
    plan = precision.resolve(mode, t5, hw, emulate=emulated, compiled=False)  # 1.
    tokenizers = _tokenizers(cache_dir)
    spec = models.MODELS[arch]
    with _building(device):  # 2.
        parts = _modules(spec, tokenizers)
    for module in parts.values():  # what diffusers computes in fp32 (the position table) is bf16 on disk
        module.to(torch.bfloat16).eval().requires_grad_(False)
    precision.apply(parts["transformer"], plan.transformer, device=device, emulated=plan.emulated)  # 3.
    precision.apply(parts["text_encoder_3"], plan.t5, device=device, component="t5")
    pipe = StableDiffusion3Pipeline(  # 4.
        scheduler=FlowMatchEulerDiscreteScheduler(**models.SCHEDULER),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2], **parts)
    pipe.set_progress_bar_config(disable=True)
    weights = {name: precision.weight_bytes(getattr(pipe, name)) for name in load.COMPONENTS}
    weights["total"] = {k: sum(w[k] for w in weights.values()) for k in ("parameters", "buffers", "total")}
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    source = hub.ModelSource(f"{arch} (random weights)", "random", Path(cache_dir))
    return load.LoadedPipeline(pipe, source, hw, plan, "none", time.perf_counter() - started, weights, "random")


def quantized(loaded: load.LoadedPipeline) -> list[str]:
    """What the plan put in FP8, as `component: mode` (the rest stays bf16)."""
    plan = loaded.plan
    return [f"{name}: {mode}" + (" (emulated)" if name == "transformer" and plan.emulated else "")
            for name, mode in (("transformer", plan.transformer), ("text_encoder_3 (T5)", plan.t5))
            if mode not in ("bf16", "off")]
