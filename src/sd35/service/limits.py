"""Limits on what a client can hold: body size (413), a body sent too slowly (408), headers never finished.

Why here and not in uvicorn's defaults: uvicorn reads any body size, waits forever for a body that
stalls half-way, and its keep-alive timer only starts after the first response — a client that opens
a connection and sends half a request line keeps a socket (and, with enough of them, the service) busy.

- `BodyLimitMiddleware` reads the body itself, capped at SD35_MAX_BODY_BYTES and within SD35_BODY_TIMEOUT
  seconds, then hands it to the app; a Content-Length over the cap is refused before reading.
- `header_timeout_protocol()` is uvicorn's h11 protocol with a timer: a connection whose request headers
  are not complete SD35_HEADER_TIMEOUT seconds after it opened (or after the previous response) is closed.
"""

from __future__ import annotations

import asyncio
import time

from sd35.service.schemas import error_body

NO_BODY_METHODS = {"GET", "HEAD", "OPTIONS"}


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in NO_BODY_METHODS:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send, 413, f"the request body is {length.decode('latin-1')[:20]} bytes; the "
                                      f"limit is {self.max_bytes} (SD35_MAX_BODY_BYTES)", "request_too_large")
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, f"the request body did not arrive within {self.timeout:g} s "
                                          "(SD35_BODY_TIMEOUT)", "request_timeout")
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send, 413, f"the request body is over the limit of {self.max_bytes} bytes "
                                          "(SD35_MAX_BODY_BYTES)", "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str) -> None:
        import json

        payload = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def header_timeout_protocol(seconds: float):
    """uvicorn's H11Protocol, closing connections whose request headers do not arrive in `seconds`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer(self.cycle)

        def on_response_complete(self) -> None:
            # The cycle that just answered, taken *before* uvicorn's on_response_complete: that call starts a
            # pipelined request whose headers already arrived (a new cycle) and may run it for longer than
            # `seconds`; the timer only fires while no request after this one has started.
            answered = self.cycle
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer(answered)

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self, waiting_after) -> None:
            """Close the connection in `seconds` unless a request's headers complete after `waiting_after`'s
            (complete headers start a new cycle)."""
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()

            def expire() -> None:
                if self.cycle is waiting_after and not self.transport.is_closing():
                    self.transport.close()

            self._header_timer = self.loop.call_later(seconds, expire)

    return HeaderTimeoutH11Protocol


class CutOffMiddleware:
    """The last resort at shutdown: a request uvicorn cancels (its graceful timeout passed) still gets
    OpenAI's JSON error with 503 instead of a plain-text 500, when nothing was sent yet."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not started:
                import json

                payload = json.dumps(error_body("the service is restarting and could not finish this request; "
                                                "retry in a moment", "server_error", None, "shutting_down")).encode()
                try:
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"10"),
                                            (b"content-length", str(len(payload)).encode())]})
                    await send({"type": "http.response.body", "body": payload})
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    pass
            raise
