"""Batching across requests (SD35_BATCH_WINDOW_MS): compatible jobs from the queue share one denoising batch.

Why: a GPU running one 512² image, or a 4-step Turbo image, is mostly idle — the MMDiT's matmuls are too
small to fill it. Eight such requests run as one batch cost little more than one (measured elsewhere: 3–6×
more images/s at 512² or few steps; about 1.15× at 1024² on Large, where one image already fills the GPU).
Our own figures, CPU and GPU, are in docs/benchmarks.md (`sd35 bench serve --batch-window MS`).

How it composes with the fair queue (scheduler.py): the head job — the one whose turn it is — chooses.
It waits up to the window (counted from when it was queued, so a job that already waited that long waits
no more), and queued jobs that `generate.batchable` says may share its batch (same size, steps, guidance and
LoRA set) join in the order their turns would come, up to SD35_MAX_IMAGES images. Edits never join.

What each request keeps: its own images (every image keeps its own seeded generator: the same image as
alone, within the PSNR measured in docs/benchmarks.md), its own usage (GPU-seconds split by images) and
response. A client that leaves stops only its own job: its rows still ride along to the end of the batch
(the others' steps cannot be re-planned mid-loop), but its answer is given at once and nothing is kept.
"""

from __future__ import annotations

import time

from sd35.inference import generate as gen
from sd35.runtime import nonfinite_error
from sd35.service import images


def gather(queue, head, settings) -> list:
    """HEAD and the queued jobs that share its batch (just [HEAD] with the window off, or nothing to join)."""
    window = settings.batch_window_ms / 1000
    limit = settings.max_images
    if window <= 0 or head.n >= limit or head.request.edit is not None:
        return [head]
    jobs, end = [head], getattr(head, "queued_at", time.monotonic()) + window

    def fits(job) -> bool:
        return gen.batchable(head.request, job.request)

    while True:
        jobs += queue.join(fits, limit - sum(j.n for j in jobs))
        left = end - time.monotonic()
        if sum(j.n for j in jobs) >= limit or left <= 0:
            return jobs
        queue.wait_for_jobs(left)


def run(runtime, jobs: list, *, on_step=None) -> list:
    """Run JOBS as one batch: for each job its images.BatchResult, or the exception its request gets (a
    non-finite image fails only the request it belongs to)."""
    parts = [(job.request, job.n) for job in jobs]
    total = sum(n for _, n in parts)
    for job in jobs:
        job.share = job.n / total  # the scheduler splits the batch's GPU-seconds by images

    def on_latents(step: int, latents) -> None:  # each job's streamed previews see its own rows only
        at = 0
        for job, (_, n) in zip(jobs, parts):
            if job.on_latents is not None and not job.future.done():
                job.on_latents(0, step, latents[at:at + n])
            at += n

    streamed = any(job.on_latents is not None for job in jobs)
    results = runtime.generate_many(parts, on_step=on_step, on_latents=on_latents if streamed else None)
    out = []
    batch = {"requests": len(jobs), "images": total}
    for result in results:
        if not result.finite:
            out.append(nonfinite_error(result, runtime.loaded.plan.as_dict(), kept=False))
        else:
            out.append(images.BatchResult(result.images, result.seeds, result.timings, batch=batch))
    return out
