"""`stream: true`: Server-Sent Events exactly as OpenAI's image API sends them.

    event: image_generation.partial_image      (0-3 of them, `partial_image_index` 0, 1, 2)
    data: {"type": ..., "b64_json": ..., "partial_image_index": 0, "size", "quality", "background",
           "output_format", "created_at"}

    event: image_generation.completed           (one per image)
    data: {"type": ..., "b64_json": ..., "size", ..., "usage": {...}}

An edit (/v1/images/edits) sends the same with `image_edit.partial_image` / `image_edit.completed`.

Partial images are previews of the first image of the batch at evenly spaced denoising steps, made by
`sd35.inference.preview` (a linear latent→RGB projection, no VAE) in the worker thread at the step boundary and
handed to the event loop. An error after the stream started is an `event: error` with OpenAI's error
body, which both SDKs raise as an APIError. A client that disconnects cancels its job at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.concurrency import run_in_threadpool

from sd35.inference import preview
from sd35.service import images
from sd35.service.worker import ShuttingDown


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def preview_callback(loop: asyncio.AbstractEventLoop, out: asyncio.Queue, steps: int, count: int):
    """An on_latents(batch, step_index, latents) for the worker: projects the first image's latents at
    the chosen steps and posts (index, rgb) to `out` from the worker thread."""
    wanted = {s: i for i, s in enumerate(preview.preview_steps(steps, count))}

    def on_latents(batch: int, step_index: int, latents) -> None:
        index = wanted.get(step_index + 1)
        if batch != 0 or index is None:
            return
        rgb = preview.latents_to_rgb(latents[:1])[0]
        try:
            loop.call_soon_threadsafe(out.put_nowait, (index, rgb))
        except RuntimeError:  # the event loop is closed (shutdown): a preview nobody can receive
            pass

    return on_latents


async def events(job, previews: asyncio.Queue, plan, finish, fail, cut_off):
    """The SSE body: partial images as they come, then `finish(result)` → completed events, or
    `fail(exc)` → an error event (also when the deadline passes or `cut_off()` says the shutdown grace
    is over). Cancels the job when the client goes away."""
    fields = {"background": "opaque", "output_format": plan.output_format, "quality": plan.quality,
              "size": plan.size}
    done = asyncio.wrap_future(job.future)
    done.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even when the client left
    try:
        while True:
            getter = asyncio.ensure_future(previews.get())
            finished, _ = await asyncio.wait({getter, done}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                index, rgb = getter.result()
                width, height = map(int, plan.size.split("x"))
                data = await run_in_threadpool(
                    lambda: images.encode(preview.to_pil(rgb, (width, height)), plan.output_format,
                                          plan.output_compression))
                yield event(f"{plan.kind}.partial_image", {
                    "type": f"{plan.kind}.partial_image", "b64_json": images.b64(data),
                    "partial_image_index": index, "created_at": int(time.time()), **fields})
                continue
            getter.cancel()
            if not finished:
                if time.monotonic() > job.deadline:
                    job.cancelled.set()
                    yield event("error", fail(asyncio.TimeoutError()))
                    return
                if cut_off():
                    job.cancelled.set()
                    yield event("error", fail(ShuttingDown("the shutdown grace ended")))
                    return
                continue
            try:
                result = done.result()
            except Exception as exc:  # noqa: BLE001 - every job failure becomes an error event
                yield event("error", fail(exc))
                return
            for item in await finish(result):
                yield event(f"{plan.kind}.completed", {
                    "type": f"{plan.kind}.completed", "b64_json": item["b64_json"],
                    "created_at": int(time.time()), **fields, "usage": item["usage"]})
            return
    finally:
        if not job.future.done():
            job.cancelled.set()  # the client went away (or the server stops): stop at the next step
