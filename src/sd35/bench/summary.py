"""`sd35 bench summary`: how long one debugger tensor summary takes for large CPU tensors.

Why: the Variables pane shows a summary (shape, dtype, stats) of every tensor in scope at each stop; if that
took seconds, stepping through a block would be unusable. Summaries are sampled over 2^20 elements and
cached per stop, and this measures both the first (computed) and the next (cached) call.
"""

from __future__ import annotations


def _cases():
    import torch

    return [("2×4096×1536 float32", lambda: torch.randn(2, 4096, 1536)),
            ("2×4096×1536 bfloat16", lambda: torch.randn(2, 4096, 1536, dtype=torch.bfloat16)),
            ("2×4096×1536 float32, transposed (not contiguous)", lambda: torch.randn(2, 4096, 1536).transpose(0, 2)),
            ("268,435,456 float32 (1 GiB)", lambda: torch.empty(1 << 28).normal_())]


def summary_time(repeats: int = 5) -> list[dict]:
    """Time of one tensor summary (what the debugger's Variables pane shows) for large CPU tensors: the first
    call at a stop (computed) and the next one (cached), median of `repeats` stops."""
    import statistics
    import time

    from sd35.debugging import summaries

    rows = []
    for name, make in _cases():
        t = make()
        first, cached = [], []
        for _ in range(repeats):
            summaries.new_stop()
            t0 = time.perf_counter()
            text = summaries.tensor_summary(t)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summaries.tensor_summary(t)
            cached.append(time.perf_counter() - t0)
        rows.append({"tensor": name, "elements": t.numel(), "first_ms": round(statistics.median(first) * 1000, 2),
                     "cached_ms": round(statistics.median(cached) * 1000, 4), "summary": text})
        del t
    return rows
