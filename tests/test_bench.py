"""`sd35 bench memory`: the same quantization verb the loader uses, measured on a real architecture
(the tiny one here; medium/large are run by hand and recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json

from helpers import run_cli

def test_published_configs_have_sd35_shapes():
    from sd35.models import ARCHS

    med, large = ARCHS["medium"], ARCHS["large"]
    assert med["num_layers"] == 24 and med["dual_attention_layers"] == list(range(13))
    assert large["num_layers"] == 38 and large["caption_projection_dim"] == 38 * 64
    assert med["qk_norm"] == large["qk_norm"] == "rms_norm"


def test_bench_memory_json_on_tiny_arch():
    r = run_cli("bench", "memory", "--arch", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    modes = report["modes"]
    bf16, fp8w, layerwise = modes["bf16"], modes["fp8-weight"], modes["diffusers-layerwise-fp8"]
    assert bf16["ratio_vs_bf16"] == 1.0 and bf16["fp8_linear_params"] == 0
    # every linear but KEEP_BF16 is FP8; diffusers' layerwise casting leaves the AdaLN ("norm") linears
    assert fp8w["fp8_linear_params"] > layerwise["fp8_linear_params"] > 0
    assert fp8w["parameters"] < layerwise["parameters"] < bf16["parameters"]
    assert fp8w["buffers"] == bf16["buffers"]  # the sin-cos position table is not a weight; no mode touches it
    assert report["kept_bf16"] and "goal" in report


def test_bench_rejects_unknown_arch():
    r = run_cli("bench", "memory", "--arch", "xl")
    assert r.returncode == 2 and "unknown architecture" in r.stderr and "--arch medium" in r.stderr
