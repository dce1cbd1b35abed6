"""GPU tier: runs where a CUDA GPU is present (`make test-gpu`), skipped with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch
from helpers import requires_fp8, requires_gpu
from torch import nn

from sd35.bench.arch import build_transformer
from sd35 import precision
from sd35.inference import generate as gen
from sd35.weights.load import load
from sd35.settings import Settings

pytestmark = pytest.mark.gpu


@requires_gpu
@pytest.mark.slow
def test_quantizing_never_holds_the_full_bf16_transformer_on_the_gpu():
    """precision.apply(device=cuda) moves one Linear at a time: the GPU peak stays near the FP8 size."""
    model = build_transformer("medium")  # bf16 on the CPU, 4.5 GB
    largest = max(m.weight.numel() * 2 for m in model.modules() if isinstance(m, nn.Linear))
    bf16 = sum(p.numel() * 2 for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    precision.apply(model, "fp8-weight", device="cuda")
    model.to("cuda")
    peak = torch.cuda.max_memory_allocated()
    fp8 = precision.weight_bytes(model)["total"]
    assert peak <= fp8 + 4 * largest, (peak, fp8, largest)
    assert peak < 0.7 * bf16


@requires_gpu
def test_generate_on_cuda_records_gpu_peak_and_device():
    loaded = load(Settings(device="cuda", precision="fp8-weight"))
    assert loaded.device.startswith("cuda") and "Float8" in type(
        loaded.pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__
    result = gen.run(loaded, gen.GenerationRequest("a cube", steps=2, seed=0))
    assert result.peak_memory["kind"] == "cuda_max_allocated" and result.peak_memory["bytes"] > 0


@requires_gpu
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_generate(offload):
    loaded = load(Settings(device="cuda", precision="bf16", offload=offload))
    assert loaded.offload == offload
    assert gen.run(loaded, gen.GenerationRequest("a cube", steps=2, seed=0)).images[0].size == (128, 128)


@requires_fp8
@pytest.mark.fp8
def test_auto_picks_fp8_on_an_fp8_gpu_only_for_a_compiled_run():
    loaded = load(Settings(device="cuda"), compiled=True)
    assert loaded.plan.transformer == "fp8" and "8.9" in loaded.plan.transformer_reason
    assert not loaded.plan.emulated
    eager = load(Settings(device="cuda"), compiled=False)  # FP8 compute pays off only compiled
    assert eager.plan.transformer == "fp8-weight" and "only compiled" in eager.plan.transformer_reason


@requires_gpu
@pytest.mark.slow
def test_compiled_blocks_on_cuda_match_eager_and_reuse_the_graph_for_a_new_size(tmp_path):
    """`blocks` on CUDA: the compiled image matches eager; after a second size, a third adds no graphs."""
    from sd35.inference.compilation import CompilePlan
    from sd35.bench.fidelity import psnr
    from sd35.runtime import Runtime

    eager = Runtime.load(Settings(device="cuda", precision="fp8-weight"), breaks=[])
    req = eager.check(prompt="a cube", steps=2, seed=0)
    ref = eager.generate(req).images[0]
    del eager
    rt = Runtime(load(Settings(device="cuda", precision="fp8-weight")), [],
                 CompilePlan("blocks", "test", str(tmp_path / "cache")))
    img = rt.generate(req).images[0]
    assert rt.compile.seconds and psnr(ref, img) >= 35
    from torch._dynamo.utils import counters

    rt.generate(rt.check(prompt="a cube", steps=1, seed=0, height=192, width=160))  # a second size
    graphs = counters["stats"]["unique_graphs"]
    rt.generate(rt.check(prompt="a cube", steps=1, seed=0, height=256, width=192))
    assert counters["stats"]["unique_graphs"] == graphs  # inputs marked dynamic: a new size adds no graph
