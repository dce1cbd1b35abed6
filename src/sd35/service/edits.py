"""OpenAI's POST /v1/images/edits: img2img (no mask) and inpainting (a mask), multipart/form-data.

Why only parsing lives here: an edit is a generation request with an input image, so after its form is
read the generations route's machinery does the rest (routes.answer: checks, the GPU queue, waiting or
streaming, the response), with `image_edit.*` as the streamed events' names. What is new is the form:
files read with limits (at most 16 images, non-file fields small), each file's content type and bytes
checked (service-side: inference/inputs.py refuses bombs from the header, before decoding), and every
problem answered with a 400 naming the field — never a 5xx.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from sd35.errors import InputError
from sd35.inference import inputs
from sd35.service.routes import _ERRORS, _GENERATE_RESPONSES, answer, error
from sd35.service.schemas import ImageEditRequest, ImagesResponse

router = APIRouter()
MAX_IMAGES = 16  # OpenAI's limit for image[]
FILE_FIELDS = ("image", "image[]", "mask")
CONTENT_TYPES = ("image/png", "image/webp", "image/jpeg", "image/jpg", "application/octet-stream")

EDIT_RESPONSES = {**_GENERATE_RESPONSES, 200: {**_GENERATE_RESPONSES[200], "description": (
    "The edited images (JSON), or with `stream: true` Server-Sent Events: image_edit.partial_image, then "
    "image_edit.completed")}, 415: _ERRORS[415]}


def _bad(message: str, param: str | None, code: str = "invalid_value"):
    return error(400, message, "invalid_request_error", param, code)


async def _read_file(value, param: str) -> bytes:
    """A file part's bytes; refused when it is a plain text field or declares a non-image content type."""
    if not isinstance(value, UploadFile):
        raise InputError(f"{param} must be a file (png, webp or jpeg), not a text field.",
                         f"send {param} as a file part of the multipart form.", param=param)
    ctype = (value.content_type or "application/octet-stream").split(";")[0].strip().lower()
    if ctype not in CONTENT_TYPES:
        raise InputError(f"{param} was sent as {ctype!r}, which is not an image type.",
                         f"send {param} as image/png, image/webp or image/jpeg.", param=param)
    return await value.read()


async def _form(request: Request):
    """The multipart form: (files by field, the other fields), or a JSONResponse refusing it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        return error(415, f"Content-Type must be multipart/form-data (got {ctype or 'none'!r}): send the image as a "
                     "file", "invalid_request_error", None, "unsupported_media_type")
    try:
        form = await request.form(max_files=MAX_IMAGES + 1, max_fields=64, max_part_size=1024 * 1024)
    except Exception as exc:  # noqa: BLE001 - starlette/python-multipart refuse malformed bodies many ways
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        return _bad(f"the multipart body cannot be read: {detail}", None, "invalid_multipart")
    files: dict[str, list] = {name: form.getlist(name) for name in FILE_FIELDS}
    items = [(k, v) for k, v in form.multi_items() if k not in FILE_FIELDS]
    fields = {k: v for k, v in items if not k.startswith("lora")}
    try:
        chosen = _loras(items)
    except InputError as exc:
        return _bad(f"{exc.cause} {exc.fix}".strip(), "lora")
    if chosen is not None:
        fields["lora"] = chosen
    return files, fields


def _loras(items: list[tuple[str, object]]) -> list | None:
    """The form's LoRAs, in either spelling: `lora` as JSON text (`curl -F 'lora=[{"name": "x", "scale":
    0.8}]'`), or the OpenAI SDKs' flattening of `extra_body={"lora": [...]}` into `lora[][name]` and
    `lora[][scale]` fields, in order (a name starts the next LoRA)."""
    picks: list[dict] = []
    for key, value in items:
        if key == "lora":
            try:
                return json.loads(value) if isinstance(value, str) else value
            except ValueError:
                raise InputError("lora is not JSON.", 'send lora=[{"name": "NAME", "scale": 0.8}] (names: GET '
                                 "/v1/loras).") from None
        if key == "lora[][name]":
            picks.append({"name": value})
        elif key == "lora[][scale]" and picks and "scale" not in picks[-1]:
            picks[-1]["scale"] = value
        elif key.startswith("lora"):
            raise InputError(f"the form field {key!r} is not one this endpoint reads.",
                             "send lora[][name] (then lora[][scale]) per LoRA, or lora as JSON text.")
    return picks or None


async def _pictures(files: dict[str, list]) -> tuple[list, object | None]:
    """Decode every image (all checked, the first edited) and the mask, off the event loop."""
    sent = [("image", v) for v in files["image"]] + [(f"image[{i}]", v) for i, v in enumerate(files["image[]"])]
    if not sent:
        raise InputError("image is missing.", "send the picture to edit as the file field `image` (or `image[]`).",
                         param="image")
    if len(sent) > MAX_IMAGES:
        raise InputError(f"{len(sent)} images were sent; the limit is {MAX_IMAGES}.", "send fewer images.",
                         param="image")
    if len(files["mask"]) > 1:
        raise InputError("more than one mask was sent.", "send one `mask` (it applies to the first image).",
                         param="mask")
    pictures = []
    for param, value in sent:
        data = await _read_file(value, param)
        pictures.append(await run_in_threadpool(inputs.read_image, data, param))
    mask = None
    if files["mask"]:
        data = await _read_file(files["mask"][0], "mask")
        mask = await run_in_threadpool(inputs.read_mask, data, "mask")
        inputs.check_pair(pictures[0], mask, sent[0][0], "mask")
    return pictures, mask


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=EDIT_RESPONSES,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                 "schema": {"$ref": "#/components/schemas/ImageEditForm"}}}}})
async def edit_image(request: Request):
    """OpenAI's image edit: `image` (or `image[]`: png, webp, jpeg; the first is edited) and a `mask` (PNG,
    transparent = repaint, the first image's size) make an inpainting; no mask, an img2img. The other fields
    are the generations' (size `auto` = the input's size), plus `strength`."""
    parsed = await _form(request)
    if not isinstance(parsed, tuple):
        return parsed
    files, fields = parsed
    worker = request.app.state.worker
    if worker.state != "ready" or worker.shutdown_deadline is not None:  # 503s as for generations (the body
        return await answer(ImageEditRequest.model_construct(prompt="-"), request)  # is not read before them)
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:  # the app's handler: 400 naming the field, as for JSON bodies
        raise RequestValidationError(exc.errors()) from None
    try:
        pictures, mask = await _pictures(files)
    except InputError as exc:
        return _bad(f"{exc.cause} {exc.fix}".strip(), exc.param)
    notes = () if len(pictures) == 1 else (f"{len(pictures)} images were sent; the first was edited (Stable "
                                           "Diffusion 3.5 has no multi-image conditioning)",)
    return await answer(body, request, {"image": pictures[0], "mask": mask, "strength": body.strength}, notes)


def form_schema() -> dict:
    """The multipart body as /openapi.json describes it: the JSON fields plus the files."""
    schema = ImageEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {**binary, "description": "The image to edit: png, webp or jpeg (at most 4096x4096 pixels)."},
        "image[]": {"type": "array", "items": binary, "maxItems": MAX_IMAGES,
                    "description": "Several images (the first is edited; SD3.5 has no multi-image conditioning)."},
        "mask": {**binary, "description": "PNG with alpha: transparent pixels are repainted; the first image's size."},
        **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]  # or image[] (the SDKs' spelling of a list)
    schema["title"] = "ImageEditForm"
    return schema
