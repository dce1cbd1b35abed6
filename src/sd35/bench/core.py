"""Benchmarks. `memory`: weight bytes of the real SD3.5 transformer architectures per precision mode.

Why build the real architecture with random weights: weight bytes depend only on shapes and on which
layers a mode quantizes, not on the values, so the published configs (`models.ARCHS`, from the
`transformer/config.json` of each Hub repo) give the exact figures without a 16 GB download — and the
same `precision.apply` verb the loader uses is what gets measured. Buffers (SD3's fixed sin-cos
position table) are reported separately from parameters: they are not weights, no mode touches them.

For comparison we apply diffusers' default layerwise casting (`enable_layerwise_casting` with FP8
storage), which skips every module whose name matches "pos_embed" or "norm" — and so all AdaLN
modulation linears.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from sd35.models import ARCHS  # the published transformer architectures (and the tiny one), from the registry

GOAL_FP8_WEIGHT_RATIO = 0.52


def build_transformer(arch: str, seed: int = 0):
    """The published architecture in bf16 on the CPU, random weights (allocated once, no fp32 detour)."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(ARCHS[arch])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():
            b.normal_(0.0, 0.02, generator=gen)
        # The position table is not a weight: as in every real checkpoint, the sin-cos table of the config.
        from sd35.weights.fp8io import computed_pos_embed

        table = computed_pos_embed(model)
        if table is not None:
            model.pos_embed.pos_embed.copy_(table)
    return model.eval()


def _measure(model) -> dict:
    from sd35.precision import linear_coverage, weight_bytes

    return {**weight_bytes(model), **linear_coverage(model)}


def memory(arch: str) -> dict:
    """Weight bytes of `arch` in bf16, fp8-weight, fp8 and diffusers' layerwise FP8 casting."""
    import torch

    from sd35 import precision

    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    params = None
    for mode in ("bf16", "fp8-weight", "fp8", "diffusers-layerwise-fp8"):
        model = build_transformer(arch)
        params = params or sum(p.numel() for p in model.parameters())
        note = ""
        if mode in ("fp8-weight", "fp8"):
            try:
                precision.apply(model, mode, device="cpu")
            except Exception as exc:  # noqa: BLE001 - fp8 quantization itself may need a GPU kernel
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                note = f"not quantizable here ({first[:90]}); stores weights as fp8-weight does"
        elif mode == "diffusers-layerwise-fp8":
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        rows[mode] = _measure(model) if not note else {"note": note}
        del model
        gc.collect()

    base = rows["bf16"]["parameters"]
    for row in rows.values():
        if "parameters" in row:
            row["ratio_vs_bf16"] = round(row["parameters"] / base, 4)
    return {
        "arch": arch,
        "config": ARCHS[arch],
        "parameters": params,
        "modes": rows,
        "kept_bf16": precision.KEEP_BF16,
        "goal": {"fp8-weight_ratio_max": GOAL_FP8_WEIGHT_RATIO,
                 "met": rows["fp8-weight"].get("ratio_vs_bf16", 1.0) <= GOAL_FP8_WEIGHT_RATIO},
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }


def memory_table(report: dict):
    from rich.table import Table

    gb = 1e9
    table = Table(title=f"SD3.5 {report['arch']} transformer ({report['parameters'] / 1e9:.2f} B parameters): "
                        "weight bytes per precision mode")
    for col in ("mode", "weights GB", "× bf16", "buffers GB", "FP8 linear params", "bf16 linear params"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode, row in report["modes"].items():
        if "note" in row:
            table.add_row(mode, row["note"], "", "", "", "")
            continue
        table.add_row(mode, f"{row['parameters'] / gb:.3f}", f"{row['ratio_vs_bf16']:.3f}",
                      f"{row['buffers'] / gb:.3f}", f"{row['fp8_linear_params']:,}", f"{row['bf16_linear_params']:,}")
    goal = report["goal"]
    table.caption = (f"goal fp8-weight ≤ {goal['fp8-weight_ratio_max']} × bf16: {'met' if goal['met'] else 'NOT met'}"
                     f" · {report['seconds']} s · torch {report['torch']}")
    return table


# --- sd35 bench serve --------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def serve_overhead(settings, *, requests: int = 20, steps: int = 4, size: int = 128, burst: int = 16,
                   queue_size: int = 4) -> dict:
    """Latency of `requests` sequential generations called directly (in this process, as `sd35 generate`
    does) vs. through a real `sd35 serve` process on loopback, then a burst of `burst` concurrent
    requests against a queue of `queue_size`.

    The service runs as its own process, as in production: PyTorch's CPU thread pool belongs to the
    thread that first uses it, so timing a second thread of the same process would measure an artefact
    (about 2x slower small matmuls on CPU), not the service.
    """
    import json as _json
    import os
    import signal
    import socket
    import statistics
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from sd35.inference import generate as gen
    from sd35.runtime import Runtime

    # 1. A real `sd35 serve` process with the same settings, on loopback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SD35_MODEL": settings.model, "SD35_PRECISION": settings.precision, "SD35_T5": settings.t5,
           "SD35_DEVICE": settings.device, "SD35_CACHE_DIR": str(settings.cache_dir),
           "SD35_QUEUE_SIZE": str(queue_size), "SD35_HOST": "127.0.0.1", "SD35_PORT": str(port)}
    # A one-off key: the service refuses to run keyless where other accounts can log in (and auth is part of
    # the overhead being measured).
    import secrets as _secrets

    key = _secrets.token_urlsafe(24)
    env["SD35_API_KEY"] = key
    auth = {"Authorization": f"Bearer {key}"}
    import tempfile

    # Its log goes to a file: an unread pipe fills with access-log lines and would stall the server.
    log_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "sd35", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=log_file, text=True)
    url = f"http://127.0.0.1:{port}"
    prompt = "benchmark prompt"

    def post(seed: int):
        body = _json.dumps({"prompt": prompt, "size": f"{size}x{size}", "steps": steps, "seed": seed,
                            "guidance_scale": 4.5}).encode()
        r = urllib.request.Request(url + "/v1/images/generations", data=body,
                                   headers={"Content-Type": "application/json", **auth})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(r, timeout=600) as resp:
                resp.read()
                code = resp.status
        except urllib.error.HTTPError as e:
            e.read()
            code = e.code
        return code, time.perf_counter() - t

    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"sd35 serve exited: {log_file.read()[-2000:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url + "/readyz", headers=auth), timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)

        # 2. The same model loaded here, called directly as `sd35 generate` does.
        rt = Runtime.load(settings, breaks=[])
        device, mode = rt.device, rt.loaded.plan.transformer

        def direct_call(seed: int) -> float:
            t = time.perf_counter()
            rt.generate(gen.GenerationRequest(prompt, steps=steps, guidance=4.5, height=size, width=size, seed=seed))
            return time.perf_counter() - t

        direct_call(0), post(0)  # warm-up of both paths
        # 3. Alternate direct and HTTP calls, so drift on a shared machine hits both alike.
        direct, http = [], []
        for i in range(requests):
            direct.append(direct_call(i))
            http.append(post(i)[1])

        # 4. A burst against the bounded queue.
        t0 = time.perf_counter()
        with ThreadPoolExecutor(burst) as pool:
            results = list(pool.map(post, range(burst)))
        burst_s = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    ok = [lat for code, lat in results if code == 200]
    d_mean, h_mean = statistics.mean(direct), statistics.mean(http)
    d50, h50 = _percentile(direct, 0.5), _percentile(http, 0.5)
    return {
        "model": settings.model, "device": device, "precision": mode,
        "steps": steps, "size": f"{size}x{size}", "requests": requests,
        "direct_mean_s": round(d_mean, 4), "direct_p50_s": round(d50, 4),
        "http_mean_s": round(h_mean, 4), "http_p50_s": round(h50, 4),
        "overhead_mean": round((h_mean - d_mean) / d_mean, 4), "overhead_p50": round((h50 - d50) / d50, 4),
        "goal_overhead_max": 0.05,
        "burst": {"concurrent": burst, "queue_size": queue_size, "seconds": round(burst_s, 3),
                  "status_counts": {str(c): sum(1 for x, _ in results if x == c) for c in sorted({x for x, _ in results})},
                  "images_per_s": round(len(ok) / burst_s, 3),
                  "served_p50_s": round(_percentile(ok, 0.5), 4) if ok else None,
                  "served_p95_s": round(_percentile(ok, 0.95), 4) if ok else None},
    }


# --- sd35 bench break -------------------------------------------------------------------------------------

def break_overhead(settings, *, runs: int = 20, steps: int = 4, size: int = 128, nan: bool = False) -> dict:
    """Denoising time with SD35_BREAK armed on every block, attention, the transformer and the scheduler at a
    step that never comes, vs. nothing armed — alternating runs on the same loaded pipeline. With `nan`:
    SD35_BREAK=nan instead (a finiteness check on every module's output, every step, nothing non-finite)."""
    import statistics

    from sd35.debugging import breakpoints
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
            "wrappers_armed": sum(map(breakpoints.watched, rt.pipe.transformer.modules())) if nan else len(breaks),
            "steps": steps, "size": f"{size}x{size}", "runs": runs,
            "step_ms_plain_median": round(p * 1000, 3), "step_ms_armed_median": round(a * 1000, 3),
            "overhead": round((a - p) / p, 4), "goal_overhead_max": None if nan else 0.01}


# --- sd35 bench summary -----------------------------------------------------------------------------------

def summary_time(repeats: int = 5) -> list[dict]:
    """Time of one tensor summary (what the debugger's Variables pane shows) for large CPU tensors: the first
    call at a stop (computed) and the next one (cached), median of `repeats` stops."""
    import statistics
    import time

    import torch

    from sd35.debugging import breakpoints

    cases = [("2×4096×1536 float32", lambda: torch.randn(2, 4096, 1536)),
             ("2×4096×1536 bfloat16", lambda: torch.randn(2, 4096, 1536, dtype=torch.bfloat16)),
             ("2×4096×1536 float32, transposed (not contiguous)", lambda: torch.randn(2, 4096, 1536).transpose(0, 2)),
             ("268,435,456 float32 (1 GiB)", lambda: torch.empty(1 << 28).normal_())]
    rows = []
    for name, make in cases:
        t = make()
        first, cached = [], []
        for _ in range(repeats):
            breakpoints.new_stop()
            t0 = time.perf_counter()
            text = breakpoints.tensor_summary(t)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            breakpoints.tensor_summary(t)
            cached.append(time.perf_counter() - t0)
        rows.append({"tensor": name, "elements": t.numel(), "first_ms": round(statistics.median(first) * 1000, 2),
                     "cached_ms": round(statistics.median(cached) * 1000, 4), "summary": text})
        del t
    return rows



# --- sd35 bench load ----------------------------------------------------------------------------------------

LOAD_MODES = ("bf16-quantize", "lean", "prequantized", "diffusers-torchao", "diffusers-prequantized")
# Issue #11's targets, pre-quantized vs today's path (bf16 from disk, then quantize).
LOAD_GOALS = {"disk_ratio_max": 0.52, "rss_peak_ratio_max": 0.6, "seconds_ratio_max": 0.5}
# Issue #30's targets, our pre-quantized load vs diffusers' own from_pretrained of the same files.
PEER_GOALS = {"seconds_ratio_max": 1.0, "rss_peak_ratio_max": 0.85}


def _folder_bytes(folder) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _evict(folder) -> None:
    """Drop `folder`'s files from the page cache (posix_fadvise, these files only), so each mode reads from
    disk as a fresh start does, not from pages the previous mode or the preparation left behind."""
    import os
    from pathlib import Path

    for f in Path(folder).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(f, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _vm_hwm() -> int | None:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a child started by a big parent would report the parent's size (measured: every mode showed the
    parent's 5.4 GB)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def load_child(mode: str, folder: str) -> dict:
    """One mode, in this (fresh) process: load the transformer in `folder` into fp8-weight on the CPU."""
    import resource
    from pathlib import Path

    t0 = time.perf_counter()
    import diffusers  # noqa: F401 - imports are timed apart from the load
    import torch  # noqa: F401
    import torchao.quantization  # noqa: F401
    from diffusers import SD3Transformer2DModel, TorchAoConfig  # noqa: F401

    from sd35 import precision
    from sd35.weights import fp8io, lean

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    if mode == "bf16-quantize":  # today's path (SD35_LEAN_LOAD=0): diffusers' from_pretrained in bf16, then quantize
        import torch

        model = SD3Transformer2DModel.from_pretrained(Path(folder) / "transformer", torch_dtype=torch.bfloat16)
        precision.apply(model, "fp8-weight", device="cpu")
    elif mode == "lean":
        model = lean.load_transformer(folder, quantize=True)
    elif mode == "prequantized":
        model = fp8io.load_transformer(folder)
    else:
        model = _diffusers_load(mode, folder)
    _touch(model)  # a mapped load reads its pages on first use: count that reading here, for every mode alike
    seconds = time.perf_counter() - t1
    cov = precision.linear_coverage(model)
    return {"seconds": round(seconds, 2), "import_seconds": round(t_import, 2),
            "rss_peak_bytes": _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "weight_bytes": precision.weight_bytes(model)["total"], **cov}


def _diffusers_load(mode: str, folder: str):
    """The peer rows (issue #30), diffusers' own loader on the same files: `diffusers-torchao` quantizes the
    bf16 folder as it loads (TorchAoConfig, our KEEP_BF16 included), `diffusers-prequantized` is a stock
    `from_pretrained` of the pre-quantized folder."""
    import torch
    from diffusers import SD3Transformer2DModel

    from sd35.weights.fp8io import transformer_config

    kw = {"quantization_config": transformer_config()} if mode == "diffusers-torchao" else {}
    if mode not in ("diffusers-torchao", "diffusers-prequantized"):
        raise ValueError(mode)
    return SD3Transformer2DModel.from_pretrained(Path(folder) / "transformer", torch_dtype=torch.bfloat16,
                                                 use_safetensors=True, **kw)


def _touch(model) -> None:
    """Read one byte of every page of every tensor's storage, so a memory-mapped load (`prequantized`) has
    read its file by the time it is timed and its RSS measured, as the copying loaders have."""
    import torch

    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        for part in (t.qdata, t.scale) if hasattr(t, "qdata") else (t,):
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].sum()


def _vs_diffusers(rows: dict) -> dict:
    """Our pre-quantized load against diffusers' stock load of the same folder, with issue #30's goals."""
    ours, peer = rows["prequantized"], rows["diffusers-prequantized"]
    ratios = {"seconds_ratio": round(ours["seconds"] / peer["seconds"], 3),
              "rss_peak_ratio": round(ours["rss_peak_bytes"] / peer["rss_peak_bytes"], 3)}
    return {**ratios, "goal": {**PEER_GOALS, "met": {
        "seconds": ratios["seconds_ratio"] <= PEER_GOALS["seconds_ratio_max"],
        "rss_peak": ratios["rss_peak_ratio"] <= PEER_GOALS["rss_peak_ratio_max"]}}}


def load_modes(arch: str, work_dir=None, keep: bool = False) -> dict:
    """Load one random-weight transformer of `arch` five ways, each in its own process:
    `bf16-quantize` (today: bf16 from disk, then quantize), `lean` (quantized as the shards are read),
    `prequantized` (FP8 data + scales mapped from disk), and diffusers' own loader on the same files
    (`diffusers-torchao`, `diffusers-prequantized`). Reports seconds, peak RSS and bytes read from disk."""
    import json as _json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    from sd35.weights import fp8io, lean, store

    # 1. The two folders on disk: bf16 (as published) and pre-quantized (as `sd35 cache quantize` writes it).
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"sd35-bench-load-{arch}-", dir=work_dir))
    try:
        bf16 = root / "bf16"
        model = build_transformer(arch)
        model.save_pretrained(bf16 / "transformer", safe_serialization=True)
        del model
        gc.collect()
        stored = root / "prequantized"
        q = lean.load_transformer(bf16, quantize=True)
        fp8io.store_transformer(q, stored)  # what `sd35 cache quantize` writes for it
        del q
        gc.collect()
        prep = time.perf_counter() - t0

        # 2. Each mode in a fresh process, files evicted from the page cache first.
        rows = {}
        for mode in LOAD_MODES:
            folder = stored if mode.endswith("prequantized") else bf16
            _evict(folder)
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "sd35.bench.core", "load-child", mode, str(folder)],
                               capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                raise RuntimeError(f"bench load {mode} failed: {r.stderr[-2000:]}")
            row = _json.loads(r.stdout.strip().splitlines()[-1])
            row["process_seconds"] = round(wall, 2)
            row["disk_bytes"] = _folder_bytes(folder / "transformer")
            rows[mode] = row
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    base, pre = rows["bf16-quantize"], rows["prequantized"]
    ratios = {"disk_ratio": round(pre["disk_bytes"] / base["disk_bytes"], 3),
              "rss_peak_ratio": round(pre["rss_peak_bytes"] / base["rss_peak_bytes"], 3),
              "seconds_ratio": round(pre["seconds"] / base["seconds"], 3),
              "lean_rss_peak_ratio": round(rows["lean"]["rss_peak_bytes"] / base["rss_peak_bytes"], 3)}
    peer = _vs_diffusers(rows)
    met = {"disk": ratios["disk_ratio"] <= LOAD_GOALS["disk_ratio_max"],
           "rss_peak": ratios["rss_peak_ratio"] <= LOAD_GOALS["rss_peak_ratio_max"],
           "seconds": ratios["seconds_ratio"] <= LOAD_GOALS["seconds_ratio_max"]}
    return {"arch": arch, "linear_parameters": base["fp8_linear_params"] + base["bf16_linear_params"],
            "modes": rows, "prequantized_vs_bf16_quantize": ratios, "goal": {**LOAD_GOALS, "met": met},
            "prequantized_vs_diffusers": peer,
            "prepare_seconds": round(prep, 1), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "versions": store.versions(),
            "notes": "seconds: the load itself (imports excluded, in import_seconds); rss_peak_bytes: the child "
                     "process's VmHWM (imports included, ~0.4 GB, the same for every mode); files evicted from the "
                     "page cache before each mode."}



# --- sd35 bench speed ---------------------------------------------------------------------------------------

def _step_inputs(config: dict, size: int, device: str, batch: int = 2):
    """One denoising step's transformer inputs at `size`² (batch 2 = the CFG pair), random, bf16."""
    import torch

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    return dict(
        hidden_states=torch.randn(batch, config["in_channels"], lat, lat, generator=g),
        encoder_hidden_states=torch.randn(batch, 77 + 256, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 500.0),
    ), device


def _time_steps(model, inputs: dict, device: str, repeats: int) -> list[float]:
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            model(**inputs, return_dict=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
    return times


def speed(arch: str = "large", size: int = 1024, *, device: str | None = None, modes=("bf16", "fp8-weight", "fp8"),
          compiled: bool = True, repeats: int = 10, cache_dir: str | None = None) -> dict:
    """Transformer step latency (and peak GPU memory) per precision mode, eager and compiled, in one run.

    Random weights of the published architecture. On a CPU the tiny model runs instead (and the report says
    so): those figures exercise the code path, they are not GPU numbers."""
    import statistics
    import tempfile

    import torch

    from sd35.inference import compilation
    from sd35 import precision

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    note = None
    if not device.startswith("cuda"):
        if arch != "tiny" or size > 256:
            note = (f"CPU: ran the tiny model at 128² instead of {arch} at {size}² — these times exercise the code "
                    "path on this CPU; GPU figures must be measured on a GPU")
        arch, size = "tiny", 128
    config = ARCHS[arch]
    cache = cache_dir or tempfile.mkdtemp(prefix="sd35-bench-compile-")
    rows: dict[str, dict] = {}
    for mode in modes:
        row: dict = {}
        rows[mode] = row
        model = build_transformer(arch)
        try:
            precision.apply(model, mode, device=device)
            model.to(device)
            inputs, _ = _step_inputs(config, size, device)
            inputs = {k: v.to(device=device, dtype=torch.bfloat16 if v.is_floating_point() and k != "timestep"
                               else v.dtype) for k, v in inputs.items()}
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            _time_steps(model, inputs, device, 2)  # warm-up
            eager = _time_steps(model, inputs, device, repeats)
            row["eager"] = {"step_ms_median": round(statistics.median(eager) * 1000, 3),
                            "step_ms_min": round(min(eager) * 1000, 3)}
            if device.startswith("cuda"):
                row["eager"]["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
            if compiled:
                plan = compilation.apply(model, compilation.CompilePlan("blocks", "benchmark", cache))
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(device)
                first = _time_steps(model, inputs, device, 1)[0]
                _time_steps(model, inputs, device, 2)
                comp = _time_steps(model, inputs, device, repeats)
                row["compiled"] = {"step_ms_median": round(statistics.median(comp) * 1000, 3),
                                   "step_ms_min": round(min(comp) * 1000, 3),
                                   "first_call_s": round(first, 2), "mode": plan.mode}
                if device.startswith("cuda"):
                    row["compiled"]["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
        except Exception as exc:  # noqa: BLE001 - e.g. fp8 compute needs FP8 tensor cores
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            row["note"] = f"not run here: {type(exc).__name__}: {first_line[:160]}"
        finally:
            del model
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    base = rows.get("bf16", {})
    for mode, row in rows.items():
        for kind in ("eager", "compiled"):
            ref = base.get("compiled" if kind == "compiled" else "eager", {}).get("step_ms_median")
            if kind in row and ref:
                row[kind]["ratio_vs_bf16"] = round(row[kind]["step_ms_median"] / ref, 3)
    import diffusers
    import torchao

    return {
        "arch": arch, "size": size, "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        "note": note, "repeats": repeats, "modes": rows, "compile_cache_dir": cache,
        "goal": {"fp8_compiled_vs_bf16_compiled_max": 0.60},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchao": torchao.__version__},
    }


def compile_cache(settings, *, steps: int = 1) -> dict:
    """Two `sd35 generate --compile blocks` processes sharing a fresh compile cache: the second one's compile
    seconds against the first's (goal <= 0.4x), read from their sidecars."""
    import json as _json
    import os
    import subprocess
    import sys
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="sd35-compile-cache-"))
    env = {**os.environ, "SD35_COMPILE_CACHE": str(work / "cache"), "SD35_MODEL": settings.model,
           "SD35_CACHE_DIR": str(settings.cache_dir), "SD35_PRECISION": settings.precision}
    runs = []
    for i in range(2):
        out = work / f"out{i}"
        r = subprocess.run([sys.executable, "-m", "sd35", "generate", "--compile", "blocks", "--steps", str(steps),
                            "--seed", "0", "--out", str(out)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"sd35 generate failed: {r.stderr[-1500:]}")
        record = _json.loads(next(out.glob("*.json")).read_text())
        runs.append(record["compile"])
    cold, warm = runs[0]["seconds"], runs[1]["seconds"]
    return {"model": settings.model, "cold": runs[0], "warm": runs[1], "ratio": round(warm / cold, 3),
            "goal_ratio_max": 0.4}

if __name__ == "__main__":  # `python -m sd35.bench.core load-child MODE FOLDER` (used by load_modes)
    import json as _json
    import logging
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if len(sys.argv) == 4 and sys.argv[1] == "load-child":
        print(_json.dumps(load_child(sys.argv[2], sys.argv[3])))
    else:
        sys.exit("usage: python -m sd35.bench.core load-child MODE FOLDER")
