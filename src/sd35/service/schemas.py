"""Request and response bodies of the image API, shaped like openai-python's `image_generate_params` and
`ImagesResponse` so the official SDKs work unchanged.

Why the bounds live here: they are the contract /openapi.json publishes (n, steps, size pattern, prompt
length, enums), and pydantic enforces exactly what the schema says. Values only the loaded model can
judge (the largest size its position embedding covers, the service's SD35_MAX_* limits) are checked in
routes.py with a 400 that names the allowed values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's documented prompt limit for GPT image models; a hard cap before any tokenizer sees the text
# (the encoders read far less: CLIP 77 tokens, T5 256 — the rest is truncated with a note).
PROMPT_MAX_CHARS = 32000
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$"


def has_lone_surrogate(text: str) -> bool:
    """JSON can carry unpaired UTF-16 surrogates ("\\ud800"); no tokenizer (and no UTF-8 response) can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class LoraPick(BaseModel):
    """One LoRA of a request: a name GET /v1/loras lists (a file in SD35_LORA_DIR) and its strength."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255, description="A name from GET /v1/loras (no paths).")
    scale: float = Field(default=1.0, ge=-10, le=10, description="1.0: as trained; 0: no effect.")


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations: OpenAI's fields, then sd35's extensions (all optional)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields newer than this service

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS,
                        description="Text prompt. Longer than the text encoders read (CLIP 77 tokens, T5 256) is "
                        "truncated, with a note in `sd35.notes`.")
    model: str | None = Field(default=None, max_length=256, description="The served model's id (GET /v1/models).")
    n: int = Field(default=1, ge=1, le=10, description="Images to generate (run in batches of SD35_MAX_IMAGES).")
    size: str | None = Field(default=None, pattern=SIZE_PATTERN,
                             description='"WIDTHxHEIGHT" (multiples of 16) or "auto" (the model\'s default size)')
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        default=None, description="Maps to a per-model number of denoising steps (`steps` overrides it).")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100, description="jpeg/webp quality, 0-100.")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None, description="`opaque` or `auto`; `transparent` is refused (SD3.5 has no alpha channel).")
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="`b64_json` (default) or `url` (a short-lived link on this service, same auth).")
    stream: bool | None = Field(default=None, description="Server-Sent Events: partial images, then the final one.")
    partial_images: int | None = Field(default=None, ge=0, le=3, description="Previews streamed before the image.")
    moderation: Literal["low", "auto"] | None = Field(default=None, description="Accepted; no moderation is run.")
    style: Literal["vivid", "natural"] | None = Field(default=None, description="Accepted; has no effect.")
    user: str | None = Field(default=None, max_length=256, description="End-user id, for the access log.")
    safety_identifier: str | None = Field(default=None, max_length=256)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = Field(default=None, ge=1, le=500)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    lora: list[LoraPick] | None = Field(default=None, max_length=8, description="LoRAs from SD35_LORA_DIR for this "
                                        "request; omitted: the service's SD35_LORAS; []: none.")


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits (multipart/form-data): the generation fields (as form fields), the image files
    (service/edits.py reads them) and `strength`."""

    size: str | None = Field(default=None, pattern=SIZE_PATTERN,
                             description='"WIDTHxHEIGHT" (multiples of 16) or "auto" (the input\'s size, rounded to '
                             'what the model takes)')
    strength: float | None = Field(default=None, gt=0, le=1, description="How much to change the input: 0.6 by "
                                   "default, 1.0 with a mask (the masked area is repainted from noise).")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str


class UsageDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: UsageDetails
    output_tokens: int
    total_tokens: int


class GenerationInfo(BaseModel):
    """sd35's own record of a generation: everything needed to reproduce it."""

    seed: int
    seeds: list[int] = Field(description="each image's own seed: image i alone = this request with seeds[i], n=1")
    steps: int
    guidance_scale: float
    size: str
    quality: str
    precision: str
    device: str
    timings_s: dict[str, float]
    notes: list[str] = []
    notice: str | None = None
    lora: dict | None = Field(default=None, description="The LoRAs applied: name, sha256, scale, layers applied.")
    edit: dict | None = Field(default=None, description="An edit's mode (img2img | inpaint), strength, and its "
                              "inputs' sha256 and size")
    batch: dict | None = Field(default=None, description="Present when this request shared its batch with others "
                               "(SD35_BATCH_WINDOW_MS): how many requests and images; timings_s are the batch's")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    quality: Literal["low", "medium", "high"]
    size: str
    usage: Usage
    sd35: GenerationInfo


class LoraObject(BaseModel):
    name: str
    rank: int
    layers: int = Field(description="LoRA layers in the file (a fused qkv counts once)")
    size: int = Field(description="bytes")
    sha256: str
    usable: bool = Field(description="false: the file does not fit the loaded model (see error)")
    error: str | None = None


class LoraList(BaseModel):
    object: Literal["list"]
    data: list[LoraObject]
    max_rank: int | None = Field(default=None, description="SD35_LORA_MAX_RANK: the hot-swap slots' rank")


class ModelCard(BaseModel):
    """sd35's extension of a model object: what a client may ask of the loaded model (GET /v1/models/{id})."""

    ready: bool
    state: str = Field(description="starting | loading | warming up | ready | failed | stopped")
    max_pixels: int = Field(description="SD35_MAX_PIXELS: the largest width x height accepted")
    max_steps: int = Field(description="SD35_MAX_STEPS")
    max_n: int
    max_partial_images: int
    family: str | None = Field(default=None, description="The model family its configs show (once ready).")
    size_multiple: int | None = Field(default=None, description="width and height are multiples of this")
    min_side: int | None = None
    max_side: int | None = Field(default=None, description="The largest side its position embedding covers")
    sizes: list[str] | None = Field(default=None, description="Size presets within these limits, default first")
    defaults: dict | None = Field(default=None, description="size, steps and guidance_scale when not sent")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    sd35: ModelCard | None = Field(default=None, description="GET /v1/models/{id} only: the model's limits")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
