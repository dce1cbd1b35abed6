"""/openapi.json as the service really behaves: FastAPI's generated schema, corrected.

FastAPI documents a 422 that never comes (validation errors are 400s in OpenAI's shape), knows nothing
about the bearer auth done in a middleware, the 413/408/415 answered there, /readyz's 503 or /metrics
being Prometheus text. Clients generating code from the schema and schemathesis read this, so it must
say what happens.
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
OPEN_PATHS = {"/healthz"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def build(app) -> dict:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                 "description": "SD35_API_KEY (when the service has one)"}}
    keyed = bool(app.state.settings.api_key)
    schema["security"] = [{"bearer": []}] if keyed else [{"bearer": []}, {}]
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in OPEN_PATHS:
                op["security"] = []
            else:
                responses.setdefault("401", _error("Missing or wrong API key"))
            if "requestBody" in op:
                responses.setdefault("400", _error("Malformed JSON or an invalid field (`param` names it)"))
                responses.setdefault("408", _error("The body was not sent within SD35_BODY_TIMEOUT"))
                responses.setdefault("413", _error("The body is over SD35_MAX_BODY_BYTES"))
                responses.setdefault("415", _error("Content-Type is not application/json"))
            if "{" in path:
                responses.setdefault("404", _error("Not found"))
            responses.setdefault("500", _error("Unexpected error: a request id, details in the server log"))
            for status, response in responses.items():
                if status in {"400", "401", "404", "408", "413", "415", "429", "500", "503", "504"}:
                    response["content"] = {"application/json": {"schema": ERROR_REF}}
    readyz = schema["paths"].get("/readyz", {}).get("get")
    if readyz:
        readyz["responses"]["503"] = {"description": "Not ready: loading, warming up, failed or stopping",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "required": ["status"],
                                          "properties": {"status": {"type": "string"},
                                                         "error": {"type": "string"}}}}}}
        readyz["responses"]["200"]["content"] = {"application/json": {"schema": {"type": "object"}}}
    metrics = schema["paths"].get("/metrics", {}).get("get")
    if metrics:
        metrics["responses"]["200"] = {"description": "Prometheus text exposition format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}
    for path in ("/v1/images/generations", "/v1/images/edits"):
        generate = schema["paths"].get(path, {}).get("post")
        if generate:
            ok = generate["responses"]["200"]
            ok["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}},
                             **ok.get("content", {})}
            generate["responses"]["429"] = _error("The GPU queue is full; Retry-After says when to come back")
            generate["responses"]["503"] = _error("Model not ready, out of memory, or shutting down (Retry-After)")
            generate["responses"]["504"] = _error("Not finished within SD35_REQUEST_TIMEOUT")
    _edits(schema)
    return schema


def _edits(schema: dict) -> None:
    """POST /v1/images/edits takes multipart/form-data (its form, with the files, as a component)."""
    from sd35.service.edits import form_schema

    op = schema["paths"].get("/v1/images/edits", {}).get("post")
    if op is None:
        return
    schema["components"]["schemas"]["ImageEditForm"] = form_schema()
    op["responses"]["400"] = _error("An invalid field or file (`param` names it): not an image, truncated, too "
                                    "many pixels, a mask without alpha or of another size")
    op["responses"]["415"] = _error("Content-Type is not multipart/form-data")
