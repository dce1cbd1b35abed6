"""The embedded tiny SD3.5: a random-weight pipeline with SD3.5's shape, built locally.

Why: the Hugging Face Hub is not always reachable (CI, a laptop on a train, a locked-down server) and
real weights are 10-25 GB. Everything that is not about image quality — loading, precision modes,
the CLI, the service, the debugger harness, notebooks — can be exercised on a model that has the same
components and the same code paths as SD3.5: an `SD3Transformer2DModel` with RMS QK-norm and
dual-attention layers, two CLIP encoders with projection, a T5 encoder, a 16-channel `AutoencoderKL`
and `FlowMatchEulerDiscreteScheduler(shift=3.0)`.

It is built once (seeded, so byte-for-byte the same on every machine) into a cache folder in diffusers
layout and then loaded by the *same* `from_pretrained` call as a real checkpoint. Tokenizers are built
from a small local vocabulary: nothing is downloaded.

Its images are noise-like: it exercises code, it does not make pictures. Every output says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from sd35 import models

TINY_NOTICE = (
    "Made with the embedded tiny SD3.5-shaped model: random weights for exercising code, not a picture."
)

# Its architecture lives in the model registry (`models.TINY_SPEC`), like the published ones.
TINY_SPEC = models.TINY_SPEC


def spec_digest() -> str:
    return hashlib.sha256(json.dumps(TINY_SPEC, sort_keys=True).encode()).hexdigest()[:12]


def tiny_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"tiny-sd35-{spec_digest()}"


def _clip_vocab() -> dict[str, int]:
    """Byte-level vocabulary (each of the 256 byte symbols, alone and word-final) plus CLIP's specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram vocabulary: T5's special ids first (pad=0, eos=1, unk=2), then single characters."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return vocab


def build(target: Path) -> Path:
    """Build the tiny pipeline into `target` (diffusers layout). Deterministic for a given TINY_SPEC."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    from diffusers.utils import logging as dlogging

    from sd35 import logs

    logs.quiet()
    dlogging.disable_progress_bar()
    spec = TINY_SPEC
    seed = spec["seed"]

    # 1. Tokenizers, from local vocabularies.
    clip_vocab = _clip_vocab()
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    tokenizer_3 = T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=256)

    # 2. Text encoders: two CLIPs with projection (as CLIP-L and OpenCLIP-G) and a T5 encoder.
    clip_cfg = dict(
        spec["clip"],
        vocab_size=len(clip_vocab),
        bos_token_id=clip_vocab["<|startoftext|>"],
        eos_token_id=clip_vocab["<|endoftext|>"],
        pad_token_id=clip_vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    torch.manual_seed(seed + 2)
    text_encoder_3 = T5EncoderModel(T5Config(**spec["t5"], vocab_size=len(_t5_vocab()), decoder_start_token_id=0))

    # 3. The MMDiT, the VAE and the scheduler.
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(**spec["transformer"])
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        **spec["vae"],
        down_block_types=["DownEncoderBlock2D"] * len(spec["vae"]["block_out_channels"]),
        up_block_types=["UpDecoderBlock2D"] * len(spec["vae"]["block_out_channels"]),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**spec["scheduler"])

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    # 4. Save in diffusers layout, bf16 like the published checkpoints.
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(target, safe_serialization=True)
    (target / "README.md").write_text(
        f"# tiny-sd35 (spec {spec_digest()})\n\n{TINY_NOTICE}\nBuilt by `sd35.weights.tiny.build`.\n"
    )
    return target


def ensure(cache_dir: Path) -> Path:
    """Return the tiny model's folder, building it first if needed (atomically: a half-built folder is
    never left where a later run would load it, and two processes racing both end with a whole one)."""
    target = tiny_dir(cache_dir)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race to a broken folder: retry once
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
