"""What clients and monitors read about the service: the short-lived image links (/v1/images/{id}),
/v1/models[/{id}], /healthz, /readyz and /metrics. Nothing here queues work for the GPU.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sd35.service import page
from sd35.service.routes import _ERRORS, error, served_model_ids
from sd35.service.schemas import ErrorBody, ModelList, ModelObject

router = APIRouter()


@router.get("/v1/images/{image_id}", responses={
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                      "image/webp": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The image bytes"},
    401: _ERRORS[401], 404: _ERRORS[404], 405: {"model": ErrorBody}})
async def get_image(image_id: str, request: Request):
    """An image made with `response_format: url`, for SD35_IMAGE_URL_TTL seconds after it was made."""
    if image_id in ("generations", "edits"):  # GET on a POST endpoint
        return error(405, f"use POST for /v1/images/{image_id}", "invalid_request_error", None,
                     "method_not_allowed", headers={"Allow": "POST"})
    item = request.app.state.images.get(image_id)
    if item is None:
        return error(404, f"image {image_id!r} does not exist or has expired (links last "
                     f"{request.app.state.settings.image_url_ttl:g} s)", "invalid_request_error", "image_id",
                     "not_found")
    return Response(item.data, media_type=item.media_type, headers={"Cache-Control": "private, max-age=60"})


@router.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
async def list_models(request: Request):
    settings = request.app.state.settings
    created = request.app.state.started
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "sd35"}
                                       for m in served_model_ids(settings)]}


@router.get("/v1/models/{model_id:path}", response_model=ModelObject,
            responses={401: _ERRORS[401], 404: _ERRORS[404]})
async def get_model(model_id: str, request: Request):
    settings = request.app.state.settings
    if model_id not in served_model_ids(settings):
        return error(404, f"model {model_id!r} is not served here; GET /v1/models lists the served model",
                     "invalid_request_error", "model", "model_not_found")
    return {"id": model_id, "object": "model", "created": request.app.state.started, "owned_by": "sd35",
            "sd35": page.model_card(settings, request.app.state.worker)}


@router.get("/healthz")
async def healthz():
    """Alive (the process answers). No auth, no model needed: for load balancers and HEALTHCHECK."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready to generate: the model is loaded and warmed up. Reports the real device and precision."""
    worker = request.app.state.worker
    if worker.state != "ready":
        body = {"status": worker.state}
        if worker.error is not None:
            body["error"] = str(worker.error).splitlines()[0]
        return JSONResponse(body, status_code=503)
    loaded = worker.runtime.loaded
    return {"status": "ready", "model": loaded.source.requested, "commit": loaded.source.commit,
            "device": loaded.hardware.as_dict(), "precision": loaded.plan.as_dict(), "queue_size":
            request.app.state.settings.queue_size, "queue_depth": worker.queue.qsize(),
            **worker.keep_alive.describe()}  # sharing: loaded / waking_up (SD35_KEEP_ALIVE)


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
