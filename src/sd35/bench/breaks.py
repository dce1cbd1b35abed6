"""`sd35 bench break [--nan]`: what armed SD35_BREAK hooks cost a denoising step when they do not match.

Why measure it: the debugger harness wraps every block, attention and the scheduler; the promise is that an
armed breakpoint that never fires costs within noise of a step (goal ≤ 1 %), and that the NaN watch
(`SD35_BREAK=nan`, a finiteness check on every module output) has a known, documented price. Runs alternate
plain and armed on the same loaded pipeline, so drift on a shared machine hits both alike.
"""

from __future__ import annotations


def break_overhead(settings, *, runs: int = 20, steps: int = 4, size: int = 128, nan: bool = False) -> dict:
    """Denoising time with SD35_BREAK armed on every block, attention, the transformer and the scheduler at a
    step that never comes, vs. nothing armed — alternating runs on the same loaded pipeline. With `nan`:
    SD35_BREAK=nan instead (a finiteness check on every module's output, every step, nothing non-finite)."""
    import statistics

    from sd35.debugging import breakpoints, nanwatch
    from sd35.inference import generate as gen
    from sd35.runtime import Runtime

    rt = Runtime.load(settings, breaks=[])
    n = len(rt.pipe.transformer.transformer_blocks)
    never = 10**9
    spec = ",".join([f"transformer@{never}", f"scheduler@{never}"] + [f"block.{k}@{never}" for k in range(n)]
                    + [f"attn.{k}@{never}" for k in range(n)])
    breaks = breakpoints.parse("nan" if nan else spec)
    req = gen.GenerationRequest("benchmark prompt", steps=steps, guidance=4.5, height=size, width=size, seed=0)
    rt.generate(req)  # warm-up
    plain, armed = [], []
    for _ in range(runs):
        plain.append(rt.generate(req).timings["denoise"] / steps)
        harness = breakpoints.arm(rt.pipe, breaks)
        armed.append(rt.generate(req).timings["denoise"] / steps)
        harness.disarm()
    p, a = statistics.median(plain), statistics.median(armed)
    return {"model": settings.model, "device": rt.device, "precision": rt.loaded.plan.transformer,
            "break": "nan" if nan else "every block/attn/transformer/scheduler at a step that never comes",
            "wrappers_armed": sum(map(nanwatch.watched, rt.pipe.transformer.modules())) if nan else len(breaks),
            "steps": steps, "size": f"{size}x{size}", "runs": runs,
            "step_ms_plain_median": round(p * 1000, 3), "step_ms_armed_median": round(a * 1000, 3),
            "overhead": round((a - p) / p, 4), "goal_overhead_max": None if nan else 0.01}
