"""What the image endpoint needs besides the GPU: quality → steps, prompt truncation notes and token
usage, batching `n`, encoding (png/jpeg/webp). The short-lived store behind `response_format: url` is
imagestore.py.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import math
import threading
from dataclasses import dataclass

from sd35.inference import generate as gen

# Fractions of the model's recommended steps (Stability AI's defaults: 28 Large, 40 Medium, 4 Turbo).
QUALITY_FRACTION = {"low": 0.5, "medium": 0.75, "high": 1.0}
QUALITY_ALIAS = {"auto": "high", "hd": "high", "standard": "medium", None: "high"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Text beyond this many characters never reaches a tokenizer: 256 T5 tokens of any real prompt span far
# less, and the slow BPE of CLIP is quadratic in the length of a word (a 32000-letter "word" would hold
# the GPU worker for minutes).
ENCODER_TEXT_CHARS = 3000
CLIP_TOKENS = 77  # CLIP-L and CLIP-G read 77 tokens (with begin/end)
T5_TOKENS = 256  # diffusers' SD3 max_sequence_length, which generate.run uses


def resolve_quality(quality: str | None) -> str:
    return QUALITY_ALIAS.get(quality, quality)


def quality_steps(quality: str, default_steps: int) -> int:
    """The per-model preset: low/medium/high = 1/2, 3/4, all of the model's recommended steps."""
    return max(1, math.ceil(default_steps * QUALITY_FRACTION[quality]))


class PromptReader:
    """Counts tokens the way the text encoders see them, on private copies of the pipeline's tokenizers
    (the worker thread uses the originals; fast tokenizers refuse concurrent use)."""

    def __init__(self, pipe):
        self._lock = threading.Lock()
        self.clip = _private(getattr(pipe, "tokenizer", None))
        self.t5 = _private(getattr(pipe, "tokenizer_3", None))

    def read(self, prompt: str) -> tuple[int, str, list[str]]:
        """(tokens the encoders read, the text T5 reads (CLIP's when T5 is off), notes on truncation).
        Raises ValueError when a tokenizer cannot take the text."""
        notes: list[str] = []
        with self._lock:
            try:
                clip_ids = self.clip(prompt, truncation=False, add_special_tokens=True)["input_ids"] if self.clip \
                    else []
                t5_ids = self.t5(prompt, truncation=False, add_special_tokens=True)["input_ids"] if self.t5 else []
            except Exception as exc:  # noqa: BLE001 - any tokenizer failure is the input's fault
                raise ValueError(f"the tokenizer cannot read this text ({type(exc).__name__})") from None
            used = prompt
            if len(clip_ids) > CLIP_TOKENS:
                notes.append(f"prompt is {len(clip_ids)} CLIP tokens; the CLIP encoders read the first {CLIP_TOKENS}")
                if not self.t5:
                    used = self.clip.decode(clip_ids[1:CLIP_TOKENS - 1], skip_special_tokens=True)
            if len(t5_ids) > T5_TOKENS:
                notes.append(f"prompt is {len(t5_ids)} T5 tokens; the T5 encoder reads the first {T5_TOKENS}, "
                             "the rest was ignored")
                used = self.t5.decode(t5_ids[:T5_TOKENS - 1], skip_special_tokens=True)
        tokens = min(len(clip_ids), CLIP_TOKENS) + min(len(t5_ids), T5_TOKENS)
        return tokens, used, notes


def _private(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is used as is (under our lock)
        return tokenizer


def cap_text(text: str) -> tuple[str, list[str]]:
    """The part of a prompt the encoders can possibly read, with a note when the rest is dropped."""
    if len(text) <= ENCODER_TEXT_CHARS:
        return text, []
    return text[:ENCODER_TEXT_CHARS], [f"prompt is {len(text)} characters; only the first {ENCODER_TEXT_CHARS} "
                                       "go to the text encoders (which read at most 77 CLIP / 256 T5 tokens)"]


def image_tokens(width: int, height: int) -> int:
    """Output 'tokens' for OpenAI's usage block: the MMDiT's 2x2 patches of the 8x latent."""
    return (width // 16) * (height // 16)


@dataclass
class BatchResult:
    images: list  # PIL images
    seeds: list[int]  # one per image: image i alone = this request with seeds[i], n=1
    timings: dict[str, float]
    batch: dict | None = None  # shared with other requests (SD35_BATCH_WINDOW_MS): {"requests", "images"}


def run_batched(runtime, request: gen.GenerationRequest, n: int, batch: int, *, on_step=None,
                on_latents=None) -> BatchResult:
    """`n` images in batches of at most `batch` (what fits on the GPU). Image i gets seed + i whichever
    batch it lands in (one generator per image), so a request is reproducible and batching changes no
    pixel. `on_latents(batch_index, step_index, latents)`. Timings are summed."""
    images, seeds, timings = [], [], {}
    done = 0
    for k in range(math.ceil(n / batch)):
        count = min(batch, n - done)
        req = dataclasses.replace(request, seed=gen.image_seeds(request.seed, done + 1)[done])
        result = runtime.generate(req, n=count, on_step=on_step,
                                  on_latents=(lambda i, lat, _k=k: on_latents(_k, i, lat)) if on_latents else None)
        images.extend(result.images)
        seeds.extend(result.seeds or gen.image_seeds(req.seed, count))
        for name, seconds in result.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
        done += count
    return BatchResult(images, seeds, timings)


def encode(image, fmt: str, compression: int | None) -> bytes:
    """PIL image → png/jpeg/webp bytes. `compression` (0-100, OpenAI's `output_compression`) is the
    jpeg/webp quality; png is lossless (fast zlib level 1: ~3x faster than PIL's default for a few %)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=100 if compression is None else max(1, compression))
    else:
        image.save(buf, format="WEBP", quality=100 if compression is None else compression)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
