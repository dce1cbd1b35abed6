"""SD35_TRANSFORMER / --transformer: SAI/ComfyUI single files (plain, FP8 scaled old and new layouts),
built from the tiny model by tests/comfyfiles.py."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import comfyfiles as cf
import numpy as np
import pytest
import torch
from helpers import run_cli

from sd35 import precision
from sd35.weights import lean, singlefile, tiny
from sd35.errors import ModelError
from sd35.settings import Settings

LAYOUTS = {"plain": ("plain", False), "scaled_fp8": ("scaled_fp8", False), "comfy_quant": ("comfy_quant", False),
           "comfy_quant_header": ("comfy_quant", True)}


@pytest.fixture(scope="session")
def sai(tiny_cache):
    t = lean.load_transformer(tiny.tiny_dir(tiny_cache), quantize=False)
    n, dual = t.config.num_layers, list(t.config.dual_attention_layers)
    return cf.to_sai(t.state_dict(), n, dual), n, dual


@pytest.fixture(scope="session")
def files(sai, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each layout written once: {name: (file, the SAI tensors as the file means them)}."""
    tensors, _, _ = sai
    root = tmp_path_factory.mktemp("single-files")
    out = {}
    for name, (layout, header) in LAYOUTS.items():
        path = root / f"sd3.5_tiny_{name}.safetensors"
        out[name] = (path, cf.write(path, tensors, layout, header_metadata=header))
    return out


def _reference_folder(tiny_cache, meaning, n, dual, target: Path) -> Path:
    """The tiny pipeline with the file's weights (dequantized) as a diffusers transformer."""
    src = tiny.tiny_dir(tiny_cache)
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("transformer"))
    model = lean.load_transformer(src, quantize=False)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in cf.from_sai(meaning, n, dual).items()}, strict=True)
    model.save_pretrained(target / "transformer", safe_serialization=True)
    return target


def _image(**kw):
    from sd35.runtime import Runtime

    rt = Runtime.load(Settings(device="cpu", **kw), breaks=[])
    return rt, np.asarray(rt.generate(rt.check(prompt="a lighthouse at dusk", steps=2, seed=5)).images[0])


def test_inspect_names_each_layout(files):
    expect = {"plain": "plain", "scaled_fp8": "comfy-scaled-fp8", "comfy_quant": "comfy-quant",
              "comfy_quant_header": "comfy-quant"}
    for name, (path, _) in files.items():
        info = singlefile.inspect(path)
        assert info.layout == expect[name] and info.arch == "tiny" and info.num_layers == 4
        assert info.dual_attention_layers == [0, 1]
        assert (info.fp8_layers > 0) == (name != "plain")
        assert "tiny transformer" in info.describe()
    assert singlefile.inspect(files["scaled_fp8"][0]).has_input_scales


def test_fused_qkv_gets_one_scale_and_fp8_codes_are_reused(files, tiny_cache, sai):
    path, meaning = files["comfy_quant"]
    _, n, dual = sai
    model, _ = singlefile.load_transformer(path, tiny.tiny_dir(tiny_cache), "fp8-weight")
    ref = cf.from_sai(meaning, n, dual)
    blk = model.transformer_blocks[0].attn
    scales = [getattr(blk, f"to_{x}").weight.scale for x in "qkv"]
    assert all(torch.equal(scales[0], s) for s in scales) and scales[0].unique().numel() == 1  # one per fused qkv
    # the codes are the file's: dequantizing gives exactly what the file means
    for x in "qkv":
        w = getattr(blk, f"to_{x}").weight
        assert torch.equal((w.qdata.float() * w.scale).to(torch.bfloat16), ref[f"transformer_blocks.0.attn.to_{x}.weight"])
    assert precision.linear_coverage(model)["bf16_linear_params"] > 0  # KEEP_BF16 layers dequantized
    assert model.proj_out.weight.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scaled_fp8", "comfy_quant_header"])
def test_file_reproduces_the_dequantized_folder(files, sai, tiny_cache, tmp_path, name):
    path, meaning = files[name]
    _, n, dual = sai
    folder = _reference_folder(tiny_cache, meaning, n, dual, tmp_path / "dequantized")
    rt_file, from_file = _image(model=str(folder), transformer=path, precision="bf16")
    _, from_folder = _image(model=str(folder), precision="bf16")
    assert rt_file.loaded.load_path == "single-file"
    assert np.array_equal(from_file, from_folder)  # the same weights, the same image
    # FP8 codes used as stored: no further from the dequantized image than FP8-quantizing those same weights
    # on the fly (T5 in bf16 everywhere, so only the transformer differs; torchao's weight-only matmul
    # rounds the scale to bf16, hence not bit-equal)
    rt8, fp8_file = _image(model=str(folder), transformer=path, precision="fp8-weight", t5="bf16")
    assert rt8.loaded.weight_bytes["transformer"]["total"] < rt_file.loaded.weight_bytes["transformer"]["total"]
    _, fp8_folder = _image(model=str(folder), precision="fp8-weight", t5="bf16")  # requantized per row
    err_file = np.abs(fp8_file.astype(int) - from_folder.astype(int)).mean()
    err_requantized = np.abs(fp8_folder.astype(int) - from_folder.astype(int)).mean()
    print(f"mean |Δ| vs bf16: file codes {err_file:.3f}, requantized on the fly {err_requantized:.3f}")
    assert err_file < 2.0 and err_file <= err_requantized


def _write_raw(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_refusals_name_what_was_found(files, tmp_path, sai):
    tensors, _, _ = sai
    fp8_path = files["comfy_quant"][0]
    cases = {}
    # truncated
    data = fp8_path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases["cut.safetensors"] = "truncated"
    # Git LFS pointer
    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "1" * 64
                                              + "\nsize 5000000000\n")
    cases["lfs.safetensors"] = "LFS pointer"
    # GGUF
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 64)
    cases["m.gguf"] = "GGUF"
    # Flux, SDXL
    _write_raw(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)})
    cases["flux.safetensors"] = "Flux"
    _write_raw(tmp_path / "sdxl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3, 3)})
    cases["sdxl.safetensors"] = "UNet"
    # nvfp4, int8 block-wise, an FP8 weight without a scale, e5m2
    base = {cf.PREFIX + k: v for k, v in tensors.items()}
    q = cf.PREFIX + "joint_blocks.0.x_block.attn.qkv"
    nv = dict(base)
    nv[q + ".weight"] = torch.zeros(8, 8, dtype=torch.uint8)
    nv[q + ".weight_scale"] = torch.ones(8, 1)
    nv[q + ".weight_scale_2"] = torch.ones(())
    _write_raw(tmp_path / "nvfp4.safetensors", nv)
    cases["nvfp4.safetensors"] = "NVFP4"
    i8 = dict(base)
    i8[q + ".weight"] = torch.zeros(8, 8, dtype=torch.int8)
    i8[q + ".weight_scale"] = torch.ones(1, 1)
    _write_raw(tmp_path / "int8.safetensors", i8, {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {q: {"format": "int8_blockwise", "group_size": 128}}})})
    cases["int8.safetensors"] = "int8_blockwise"
    raw = dict(base)
    raw[q + ".weight"] = base[q + ".weight"].to(torch.float8_e4m3fn)
    _write_raw(tmp_path / "unscaled.safetensors", raw)
    cases["unscaled.safetensors"] = "has no scale"
    e5 = dict(base)
    e5[q + ".weight"] = base[q + ".weight"].to(torch.float8_e5m2)
    e5[q + ".scale_weight"] = torch.ones(())
    _write_raw(tmp_path / "e5m2.safetensors", e5)
    cases["e5m2.safetensors"] = "e5m2"
    for fname, words in cases.items():
        with pytest.raises(ModelError) as exc:
            singlefile.inspect(tmp_path / fname)
        assert words in str(exc.value.cause), (fname, exc.value.cause)
        assert exc.value.fix


def test_architecture_and_size_mismatches_are_refused(sai, tmp_path, tiny_cache):
    tensors, _, _ = sai
    folder = tiny.tiny_dir(tiny_cache)
    # a 3-block file against the 4-block tiny folder (as a Medium file with --model large)
    short = {cf.PREFIX + k: v for k, v in tensors.items() if not k.startswith("joint_blocks.3.")}
    info = singlefile.inspect(_write_raw(tmp_path / "short.safetensors", short))
    with pytest.raises(ModelError, match="same architecture"):
        singlefile.check_matches(info, folder)
    # right block count, one tensor of the wrong size
    wrong = {cf.PREFIX + k: v for k, v in tensors.items()}
    key = cf.PREFIX + "joint_blocks.1.x_block.mlp.fc1.weight"
    wrong[key] = torch.zeros(wrong[key].shape[0] + 16, wrong[key].shape[1], dtype=wrong[key].dtype)
    with pytest.raises(ModelError, match="does not fit"):
        singlefile.load_transformer(_write_raw(tmp_path / "wrong.safetensors", wrong), folder, "bf16")


def test_cli_refuses_a_bad_file_with_exit_2_and_writes_nothing(files, tmp_path):
    data = files["scaled_fp8"][0].read_bytes()
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(data[: len(data) // 3])
    r = run_cli("generate", "--transformer", str(bad), "--out", str(tmp_path / "out"), "--steps", "1")
    assert r.returncode == 2 and "truncated" in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_doctor_says_what_the_file_is(files, tmp_path):
    r = run_cli("doctor", "--json", env={"SD35_TRANSFORMER": str(files["scaled_fp8"][0])})
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    c = checks["transformer file"]
    assert c["status"] == "ok" and "ComfyUI FP8 scaled" in c["finding"] and "tiny" in c["finding"]
    r = run_cli("doctor", "--json", env={"SD35_TRANSFORMER": str(tmp_path / "missing.safetensors")})
    c = {c["name"]: c for c in json.loads(r.stdout)}["transformer file"]
    assert c["status"] == "fail" and "does not exist" in c["finding"]


def test_a_non_2d_fp8_weight_is_refused_clearly(sai, tmp_path, tiny_cache):
    """A scaled-FP8 file whose FP8 layer is not a linear (a 4-D conv, a 1-D norm): a ModelError naming it."""
    tensors, _, _ = sai
    one_d = next((k for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 1), None)
    for key in ["x_embedder.proj.weight"] + ([one_d] if one_d else []):
        raw = {cf.PREFIX + k: v.contiguous() for k, v in tensors.items()}
        codes, scale = cf.quantize_fp8(tensors[key])
        raw[cf.PREFIX + key] = codes
        raw[cf.PREFIX + key[: -len(".weight")] + ".scale_weight"] = scale
        raw[cf.PREFIX + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
        path = _write_raw(tmp_path / f"{key}.safetensors", raw)
        with pytest.raises(ModelError, match="must be 2-D") as info:
            singlefile.load_transformer(path, tiny.tiny_dir(tiny_cache), "fp8-weight")
        assert str(tuple(tensors[key].shape)) in info.value.cause
