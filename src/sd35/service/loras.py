"""The service's LoRAs: GET /v1/loras (what SD35_LORA_DIR offers) and a request's `lora` field.

Why apart from routes.py: listing reads files (headers, sha256) a stranger can name only through this
folder; the rules for names (never out of the folder) live in weights/lora_catalog.py, the application in
weights/lora.py. Here only the HTTP side: the listing, and the request field handed to Runtime.check.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sd35.service.schemas import ErrorBody, LoraList, error_body

router = APIRouter()


def picks(body) -> dict:
    """The request's `lora` field as Runtime.check's keyword (omitted: the service's SD35_LORAS)."""
    from sd35.weights.lora_catalog import LoraChoice

    chosen = getattr(body, "lora", None)
    return {} if chosen is None else {"lora": [LoraChoice(p.name, p.scale) for p in chosen]}


def _listing(folder, adapters) -> list[dict]:
    from sd35.weights import lora_catalog
    from sd35.weights.lora_files import LoraError

    data = []
    for path in lora_catalog.folder_files(folder):
        item = {"name": path.stem, "rank": 0, "layers": 0, "size": path.stat().st_size, "sha256": "",
                "usable": True, "error": None}
        try:
            item.update(lora_catalog.describe(path))
            if adapters is not None:  # checked against the loaded model once ready
                adapters.plan(path, path.stem)
        except LoraError as exc:
            item.update(usable=False, error=exc.cause)
        data.append(item)
    return data


@router.get("/v1/loras", response_model=LoraList,
            responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def list_loras(request: Request):
    """The LoRAs of SD35_LORA_DIR a request's `lora` field can name: name, rank, layers, size, sha256, and
    whether each fits the loaded model."""
    from sd35.weights.lora_files import LoraError

    settings, worker = request.app.state.settings, request.app.state.worker
    adapters = worker.runtime.lora if worker.state == "ready" and worker.runtime is not None else None
    try:
        data = await run_in_threadpool(_listing, settings.lora_dir, adapters)
    except LoraError as exc:  # SD35_LORA_DIR is not a folder: the operator's to fix
        return JSONResponse(error_body(f"{exc.cause} {exc.fix or ''}".strip(), "server_error", None, "lora_dir"),
                            status_code=503)
    return {"object": "list", "data": data, "max_rank": adapters.slot_rank if adapters is not None else None}
