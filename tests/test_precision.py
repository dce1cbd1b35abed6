"""Precision plans (which mode, why) and what torchao's fp8-weight does to the MMDiT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd35 import precision
from sd35.errors import HardwareError, InputError
from sd35.hardware import Hardware


def hw(cap=None, name="CPU"):
    if cap is None:
        return Hardware("cpu", "CPU", None, None, False, "fp8 compute: no CUDA device", True)
    ok = cap >= (8, 9)
    return Hardware("cuda:0", name, cap, 80 << 30, ok, f"fp8 compute: SM {cap[0]}.{cap[1]} {'>=' if ok else '<'} 8.9", True)


def test_auto_picks_fp8_on_hopper_and_fp8_weight_elsewhere():
    p = precision.resolve("auto", "auto", hw((9, 0), "H100"))
    assert (p.transformer, p.t5) == ("fp8", "fp8-weight")
    assert "SM 9.0 >= 8.9" in p.transformer_reason
    for machine in (hw(), hw((8, 6), "A10")):
        p = precision.resolve("auto", "auto", machine)
        assert p.transformer == "fp8-weight" and p.t5 == "fp8-weight"
        assert p.transformer_reason.startswith("auto:")


def test_fp8_refused_without_fp8_tensor_cores_and_suggests_fp8_weight():
    for machine in (hw(), hw((8, 6), "NVIDIA A10")):
        with pytest.raises(HardwareError) as e:
            precision.resolve("fp8", "auto", machine)
        assert "fp8-weight" in e.value.fix and "8.9" in e.value.cause


def test_t5_modes():
    assert precision.resolve("bf16", "auto", hw()).t5 == "bf16"
    assert precision.resolve("bf16", "off", hw()).t5 == "off"
    assert precision.resolve("fp8-weight", "bf16", hw()).t5 == "bf16"
    with pytest.raises(InputError):
        precision.resolve("bf16", "int4", hw())
    with pytest.raises(InputError):
        precision.resolve("fp16", "auto", hw())


def test_no_float8_dtype_refuses_fp8_modes():
    machine = Hardware("cpu", "CPU", None, None, False, "no cuda", has_float8_dtype=False)
    with pytest.raises(HardwareError, match="float8"):
        precision.resolve("fp8-weight", "auto", machine)
    assert precision.resolve("bf16", "auto", machine).transformer == "bf16"


def _tiny_transformer(tiny_cache):
    from diffusers import SD3Transformer2DModel

    from sd35.weights import tiny

    return SD3Transformer2DModel.from_pretrained(tiny.tiny_dir(tiny_cache) / "transformer", dtype=torch.bfloat16)


def test_fp8_weight_quantizes_every_linear_but_the_listed_ones(tiny_cache):
    model = _tiny_transformer(tiny_cache)
    precision.apply(model, "fp8-weight", device="cpu")
    kept, fp8 = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            (fp8 if "Float8" in type(m.weight).__name__ else kept).append(name)
    # AdaLN modulation linears (which diffusers' layerwise casting skips) are FP8.
    assert "transformer_blocks.0.norm1.linear" in fp8
    assert "transformer_blocks.0.norm1_context.linear" in fp8
    assert "norm_out.linear" in fp8
    assert "transformer_blocks.0.attn2.to_q" in fp8  # dual-attention layer
    # Exactly the listed ones stay in bf16.
    assert kept and all(any(__import__("fnmatch").fnmatch(k, p) for p in precision.KEEP_BF16) for k in kept)
    assert "proj_out" in kept and any(k.startswith("time_text_embed.") for k in kept)
    w = model.transformer_blocks[0].attn.to_q.weight
    assert w.qdata.dtype == torch.float8_e4m3fn
    assert w.scale.shape[0] == w.shape[0]  # one scale per output channel


def test_weight_bytes_see_inside_fp8_tensors(tiny_cache):
    model = _tiny_transformer(tiny_cache)
    before = precision.weight_bytes(model)
    cov_before = precision.linear_coverage(model)
    precision.apply(model, "fp8-weight")
    after = precision.weight_bytes(model)
    cov = precision.linear_coverage(model)
    assert cov_before["fp8_linear_params"] == 0
    assert cov["fp8_linear_params"] + cov["bf16_linear_params"] == cov_before["bf16_linear_params"]
    # FP8 linears hold 1 byte per weight + a 4-byte scale per row; the rest is unchanged.
    linear_bytes_saved = cov["fp8_linear_params"]  # 2 bytes -> 1 byte each
    assert before["parameters"] - after["parameters"] <= linear_bytes_saved
    assert after["parameters"] < before["parameters"] * 0.75
    assert after["buffers"] == before["buffers"]
