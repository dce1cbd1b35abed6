"""Prometheus metrics of one service process (its own registry, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, worker):
        self.registry = CollectorRegistry()
        self.requests = Counter("sd35_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("sd35_generation_latency_seconds", "Time from request to response for generations",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=self.registry)
        self.images = Counter("sd35_images_generated_total", "Images generated", registry=self.registry)
        queue_depth = Gauge("sd35_queue_depth", "Jobs waiting for the GPU worker", registry=self.registry)
        queue_depth.set_function(lambda: worker.queue.qsize())
        busy = Gauge("sd35_worker_busy", "1 while the GPU worker runs a job", registry=self.registry)
        busy.set_function(lambda: 1.0 if worker.busy else 0.0)
        ready = Gauge("sd35_ready", "1 once the model is loaded and warmed up", registry=self.registry)
        ready.set_function(lambda: 1.0 if worker.state == "ready" else 0.0)

        def plan():  # the runtime's CompilePlan once loaded, else None
            return getattr(getattr(worker, "runtime", None), "compile", None)

        compile_seconds = Gauge("sd35_compile_seconds", "Wall time of the first compiled generation (the warm-up), "
                                "by mode; 0 for the modes not in use", ["mode"], registry=self.registry)
        for mode in ("off", "blocks", "full"):
            compile_seconds.labels(mode=mode).set_function(
                lambda mode=mode: float(plan().seconds or 0.0) if plan() is not None and plan().mode == mode else 0.0)
        cache_hits = Gauge("sd35_compile_cache_hits", "Inductor FX-graph cache hits of this process's compilation",
                           registry=self.registry)
        cache_hits.set_function(lambda: float((plan().cache or {}).get("fxgraph_cache_hit", 0)) if plan() else 0.0)
        from sd35.inference import compilation

        recompiles = Gauge("sd35_recompiles_total", "torch.compile compilations after READY (a request at a shape the "
                           "warm-up did not cover pays its compile inside its latency); stays 0",
                           registry=self.registry)
        recompiles.set_function(lambda: float(compilation.compiles() - plan().compiles_at_ready)
                                if plan() is not None and plan().compiles_at_ready is not None else 0.0)
        limit = Gauge("sd35_compile_limit_hits_total", "Frames torch.compile gave up on (dynamo's recompile limit): "
                      "each runs eager from then on, slower; stays 0", registry=self.registry)
        limit.set_function(lambda: float(compilation.limit_hits()))
        emulated = Gauge("sd35_fp8_emulated", "1 when precision fp8 is emulated on a CPU (SD35_FP8_EMULATE=1: numerics "
                         "only, no FP8 tensor cores)", registry=self.registry)
        emulated.set_function(lambda: 1.0 if getattr(getattr(getattr(worker, "runtime", None), "loaded", None), "plan",
                                                     None) is not None and worker.runtime.loaded.plan.emulated else 0.0)

        import torch

        # Always exported (0 without CUDA), so dashboards and alerts name metrics every instance has; read on
        # the device the worker uses (cuda:1 on a second GPU), not the scraping thread's current one.
        cuda = torch.cuda.is_available()

        def device():
            runtime = worker.runtime
            return torch.device(runtime.device) if cuda and runtime is not None and \
                str(runtime.device).startswith("cuda") else None

        allocated = Gauge("sd35_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated() of the worker's GPU "
                          "(0 without CUDA)", registry=self.registry)
        allocated.set_function(lambda: torch.cuda.memory_allocated(device()) if device() is not None else 0.0)
        reserved = Gauge("sd35_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved() of the worker's GPU "
                         "(0 without CUDA)", registry=self.registry)
        reserved.set_function(lambda: torch.cuda.memory_reserved(device()) if device() is not None else 0.0)
        self._sharing(worker)

    def _sharing(self, worker) -> None:
        """Per-key usage, the keep-alive state and the queue's limits (issue 27)."""
        images = Counter("sd35_images", "Images generated, by API key name", ["key"], registry=self.registry)
        gpu = Counter("sd35_gpu_seconds", "Seconds the GPU worker spent on a key's jobs", ["key"],
                      registry=self.registry)

        def used(key: str, count: int, seconds: float) -> None:
            images.labels(key=key).inc(count)
            gpu.labels(key=key).inc(seconds)

        worker.queue.listeners.append(used)
        keep = worker.keep_alive
        loaded = Gauge("sd35_model_loaded", "1 while the pipeline is in memory; 0 once SD35_KEEP_ALIVE released it "
                       "(or before the first load)", registry=self.registry)
        loaded.set_function(lambda: 1.0 if worker.state == "ready" and keep.loaded else 0.0)
        failed = Gauge("sd35_model_load_failed", "1 when the model failed to load (at start, or reloading after "
                       "a release)", registry=self.registry)
        failed.set_function(lambda: 1.0 if worker.state == "failed" or keep.load_error else 0.0)
        capacity = Gauge("sd35_queue_capacity", "SD35_QUEUE_SIZE: jobs that may wait in all",
                         registry=self.registry)
        capacity.set(worker.queue.capacity)
