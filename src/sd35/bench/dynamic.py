"""`sd35 bench dynamic`: how the compiled MMDiT covers the shapes requests bring, two ways, side by side.

Why: a request at a shape the warm-up did not compile pays the compile inside its latency, with no step
heartbeat. Two ways to avoid that: let the warm-up run every shape class so torch's automatic dynamic shapes
make the batch and sequence symbolic on the second size ("warm-up"), or mark those dimensions dynamic before
the first compile ("marked", what `compilation.apply` does). Both end with no recompile after the warm-up;
they differ in warm-up time, graph count (dynamo's recompile limit is 8 graphs per frame, and the blocks
share one frame) and perhaps step time. Each way runs in a fresh process with an empty kernel cache:
1. build the transformer (random weights) in the mode; 2. compile the blocks; 3. the service's warm-up
shapes (batch 2 = n 1 with CFG, batch 4 at another size, batch 1 = no CFG), timed; 4. 16 request shapes
(batch 1, 2, 4, 8 × four sizes), counting new graphs; 5. step times at the first size.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

APPROACHES = ("warm-up", "marked")


def measure(approach: str, arch: str, size: int, mode: str, device: str, emulated: bool,
            backend: str = "inductor") -> dict:
    """One approach in this process (`run` gives each a fresh one). `backend="eager"`: dynamo alone, which
    decides the graphs and the limit (seconds); its times are not compiled ones."""
    import torch

    from sd35 import precision
    from sd35.bench.arch import build_transformer
    from sd35.bench.gpu import _sync, step_inputs
    from sd35.inference import compilation

    model = build_transformer(arch)  # 1.
    precision.apply(model, mode, device=device, emulated=emulated and mode == "fp8")
    model = model.to(device)
    plan = compilation.CompilePlan("blocks", "bench dynamic", tempfile.mkdtemp(prefix="sd35-bench-dynamic-"))
    compilation.apply(model, plan, mark_dynamic=approach == "marked", backend=backend)  # 2.

    def call(batch: int, side: int) -> float:
        inputs = step_inputs(arch, side, device, batch=batch)
        with torch.inference_mode():
            _sync(device)
            t = time.perf_counter()
            model(**inputs, return_dict=False)
            _sync(device)
            return time.perf_counter() - t

    other = size - 16
    started = time.perf_counter()
    for batch, side in ((2, size), (4, other), (1, size)):  # 3.
        call(batch, side)
    warm_up = time.perf_counter() - started
    at_ready = compilation.compiles()
    for side in (size - 48, size - 32, size + 16, size):  # 4.
        for batch in (1, 2, 4, 8):
            call(batch, side)
    steps = {}
    for batch in (1, 2, 8):  # 5.
        call(batch, size)
        steps[str(batch)] = round(statistics.median(call(batch, size) for _ in range(7)) * 1000, 2)
    return {"warm_up_s": round(warm_up, 1), "graphs_at_ready": at_ready,
            "graphs_after_ready": compilation.compiles() - at_ready, "limit_hits": compilation.limit_hits(),
            "step_ms": steps, "emulated": emulated and mode == "fp8"}


def run(arch: str, size: int, *, modes=("bf16", "fp8"), device: str | None = None, emulate: bool = False,
        backend: str = "inductor") -> dict:
    """Both approaches for each mode, each in a fresh process (no dynamo state or kernels carried over)."""
    import torch

    from sd35.bench.arch import emulates_fp8, on_this_device

    device, arch, size, note = on_this_device(device, arch, size)
    emulated = emulates_fp8(device, emulate)
    rows: dict = {}
    for mode in modes:
        for approach in APPROACHES:
            args = repr((approach, arch, size, mode, device, emulated, backend))
            code = f"import json; from sd35.bench import dynamic; print(json.dumps(dynamic.measure(*{args})))"
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                rows.setdefault(mode, {})[approach] = {"note": f"not run here: {tail[:200]}"}
                continue
            rows.setdefault(mode, {})[approach] = json.loads(r.stdout.strip().splitlines()[-1])
    return {"arch": arch, "size": size, "device": device, "note": note, "emulated": emulated and "fp8" in modes,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
            "torch": torch.__version__, "backend": backend, "modes": rows}
