"""Request and response bodies of the OpenAI Images API (plus our extensions), and its error shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations. OpenAI's fields, then sd35's extensions (all optional)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send quality, style, user, …

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT", e.g. "1024x1024"; default: the model\'s')
    response_format: Literal["b64_json"] | None = "b64_json"
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class GenerationInfo(BaseModel):
    seed: int
    seeds: list[int] = Field(description="each image's own seed: image i alone = this request with seeds[i], n=1")
    steps: int
    guidance_scale: float
    size: str
    precision: str
    device: str
    timings_s: dict[str, float]
    notice: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    sd35: GenerationInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
