"""FP8 from disk (issue #11): the pre-quantized store, lean loading, retargeting, on the tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from sd35 import models, precision
from sd35.weights import fp8io, lean, retarget, store, tiny
from sd35.weights.safetensors_header import read_header
from sd35.errors import InputError, ModelError
from sd35.settings import Settings


@pytest.fixture(scope="session")
def prequantized(tiny_cache, tmp_path_factory) -> Path:
    """One pre-quantized tiny (fp8-weight, T5 FP8) per session, in a store of its own."""
    from sd35.weights import hub

    root = tmp_path_factory.mktemp("sd35-quantized")
    settings = Settings(model="tiny", cache_dir=tiny_cache, quantized_dir=root)
    target = store.check_request(settings, "fp8-weight")
    return store.quantize(settings, hub.resolve(settings), "fp8-weight", "auto", target)


def _image(**kw) -> np.ndarray:
    from sd35.runtime import Runtime

    rt = Runtime.load(Settings(precision="fp8-weight", device="cpu", **kw), breaks=[])
    result = rt.generate(rt.check(prompt="a red fox in the snow", steps=2, seed=11))
    return rt, np.asarray(result.images[0])


def test_store_layout_and_record(prequantized, tiny_cache):
    assert prequantized.name == "tiny-fp8-weight" and prequantized.parent.name.startswith("sd35-quantized")
    record = json.loads((prequantized / "sd35_quant.json").read_text())
    assert record["format"] == store.FORMAT and record["precision"] == "fp8-weight" and record["t5"] == "fp8-weight"
    assert record["source"]["alias"] == "tiny" and record["source"]["path"] == str(tiny.tiny_dir(tiny_cache))
    assert set(record["kept_bf16"]["transformer"]) == set(precision.KEEP_BF16)
    assert {"torch", "torchao", "diffusers", "transformers"} <= set(record["versions"])
    # FP8 data + per-row fp32 scales on disk, KEEP_BF16 layers in bf16
    from safetensors import safe_open

    with safe_open(prequantized / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("transformer_blocks.0.attn.to_q._weight_qdata")
        s = f.get_tensor("transformer_blocks.0.attn.to_q._weight_scale")
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (q.shape[0], 1)
        assert f.get_tensor("proj_out.weight").dtype == torch.bfloat16
    assert "transformer_blocks.0.attn.to_q.weight" not in keys
    # the sin-cos position table is stored, in bf16 as in the source: a stock diffusers load does not recompute it
    assert fp8io.POS_EMBED in keys and "pos_embed" not in record
    with safe_open(prequantized / "text_encoder_3" / "model.safetensors", "pt") as f:
        assert any(k.endswith("._weight_qdata") for k in f.keys())
    # the transformer's bytes on disk: about half of the bf16 source's
    src = tiny.tiny_dir(tiny_cache) / "transformer" / "diffusion_pytorch_model.safetensors"
    dst = prequantized / "transformer" / "diffusion_pytorch_model.safetensors"
    def weights(f):  # file bytes less the position table (a large share of the tiny model, 9% of Medium's)
        start, end = read_header(f).tensors[fp8io.POS_EMBED]["data_offsets"]
        return f.stat().st_size - (end - start)

    # 0.60 on the tiny model, whose bf16-kept layers (KEEP_BF16) are a larger share; Medium's figures are in
    # docs/benchmarks.md
    assert weights(dst) < 0.62 * weights(src)
    # what we wrote is readable by the team (save_pretrained writes 0600)
    assert dst.stat().st_mode & 0o044 == 0o044
    assert models.describe_folder(prequantized).family == "tiny"


def test_lean_and_stored_transformers_equal_the_on_the_fly_one(prequantized, tiny_cache):
    folder = tiny.tiny_dir(tiny_cache)
    ref = lean.load_transformer(folder, quantize=False)
    precision.apply(ref, "fp8-weight", device="cpu")
    for model in (lean.load_transformer(folder, quantize=True), fp8io.load_transformer(prequantized)):
        assert precision.linear_coverage(model) == precision.linear_coverage(ref)
        a, b = ref.state_dict(), model.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            if hasattr(a[k], "qdata"):
                assert torch.equal(a[k].qdata.view(torch.uint8), b[k].qdata.view(torch.uint8)), k
                assert torch.equal(a[k].scale, b[k].scale), k
            else:
                assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_prequantized_lean_and_todays_path_give_the_same_image(prequantized, tiny_cache, monkeypatch):
    monkeypatch.setenv("SD35_QUANTIZED_DIR", str(prequantized.parent))
    rt_today, today = _image(model="tiny", lean_load=False)
    rt_lean, lean = _image(model="tiny")
    rt_store, stored = _image(model=prequantized.name)  # by name in the store
    assert (rt_today.loaded.load_path, rt_lean.loaded.load_path, rt_store.loaded.load_path) == (
        "bf16-quantize", "lean", "prequantized")
    assert rt_store.loaded.source.kind == "quantized" and rt_store.info.family == "tiny"
    assert rt_store.loaded.source.notice == tiny.TINY_NOTICE  # a store made from tiny keeps its notice
    assert rt_store.loaded.weight_bytes["transformer"] == rt_today.loaded.weight_bytes["transformer"]
    assert np.array_equal(today, lean) and np.array_equal(today, stored)
    _, by_path = _image(model=str(prequantized))  # by path
    assert np.array_equal(today, by_path)


@pytest.mark.slow
def test_a_stock_diffusers_load_of_the_store_gives_our_image(prequantized, monkeypatch):
    """Issue #30: the store is plain diffusers/transformers torchao safetensors. A stock
    `StableDiffusion3Pipeline.from_pretrained` of it (diffusers' and transformers' own torchao loaders, no sd35
    code) generates our image bit for bit: the position table is stored, not recomputed in float32."""
    import dataclasses
    import warnings

    from diffusers import StableDiffusion3Pipeline

    from sd35.runtime import Runtime

    rt, ours = _image(model=str(prequantized))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stock = StableDiffusion3Pipeline.from_pretrained(prequantized, torch_dtype=torch.bfloat16, use_safetensors=True)
    assert not [w for w in caught if "newly initialized" in str(w.message)]
    assert stock.transformer.pos_embed.pos_embed.dtype == torch.bfloat16
    assert precision.linear_coverage(stock.transformer) == precision.linear_coverage(rt.pipe.transformer)
    assert precision.linear_coverage(stock.text_encoder_3) == precision.linear_coverage(rt.pipe.text_encoder_3)
    stock.set_progress_bar_config(disable=True)
    rt_stock = Runtime(dataclasses.replace(rt.loaded, pipe=stock))
    result = rt_stock.generate(rt_stock.check(prompt="a red fox in the snow", steps=2, seed=11))
    assert np.array_equal(np.asarray(result.images[0]), ours)


def test_retarget_wraps_the_same_bytes_for_fp8_and_back(prequantized):
    t = fp8io.load_transformer(prequantized)
    w0 = t.transformer_blocks[0].attn.to_q.weight
    assert w0.act_quant_kwargs is None
    assert retarget.retarget(t, "fp8") > 0
    w1 = t.transformer_blocks[0].attn.to_q.weight
    assert w1.act_quant_kwargs is not None and w1.qdata.data_ptr() == w0.qdata.data_ptr()
    retarget.retarget(t, "fp8-weight")
    assert t.transformer_blocks[0].attn.to_q.weight.act_quant_kwargs is None


def test_bf16_from_a_prequantized_folder_is_refused(prequantized):
    r = run_cli("generate", "--model", str(prequantized), "--precision", "bf16", "--steps", "1", "--out", "out")
    assert r.returncode == 2 and "pre-quantized FP8" in r.stderr and "--model tiny" in r.stderr
    assert not Path("out").exists()


def test_store_copies_private_source_files_and_leaves_their_mode(prequantized, tiny_cache):
    """The tiny model's files are 0600: a hard link would keep that mode (teammates could not read the
    store) and a chmod on the link would change the source. They are copied; what the store owns is
    readable by all."""
    src_dir = tiny.tiny_dir(tiny_cache)
    for f in sorted(prequantized.rglob("*")):
        if not f.is_file():
            continue
        st = f.stat()
        assert st.st_mode & 0o444 == 0o444, f
        src = src_dir / f.relative_to(prequantized)
        if src.is_file() and src.stat().st_mode & 0o777 != st.st_mode & 0o777:
            assert not os.path.samefile(src, f), f  # a different mode: a copy, never the source's inode
    private = [f for f in src_dir.rglob("*.safetensors") if not f.stat().st_mode & 0o044]
    assert private, "the tiny model's weights are private (0600): the case this guards"


def test_unreadable_store_file_is_named_permission_denied(prequantized, tmp_path):
    """diffusers reports permission denied as FileNotFoundError; the load check names it."""
    import shutil

    from sd35.weights import hub

    folder = tmp_path / "store"
    shutil.copytree(prequantized, folder)
    bad = folder / "vae" / "diffusion_pytorch_model.safetensors"
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp:  # root reads anything: pretend to be a teammate
        mp.setattr(hub.os, "access", lambda p, m: Path(p) != bad and real_access(p, m))
        with pytest.raises(ModelError) as exc:
            hub.check_local(str(folder))
    assert "permission denied" in exc.value.cause and str(bad) in exc.value.cause
    assert "sd35 cache quantize" in exc.value.fix


def test_quantize_refuses_bad_requests_before_reading(tmp_path):
    settings = Settings(model="tiny", quantized_dir=tmp_path / "q")
    with pytest.raises(InputError, match="cannot be stored"):
        store.check_request(settings, "bf16")
    with pytest.raises(InputError, match="not storable"):
        store.check_request(settings, "fp8-weight", t5="off")
    (tmp_path / "q" / "tiny-fp8-weight").mkdir(parents=True)
    (tmp_path / "q" / "tiny-fp8-weight" / "x").write_text("")
    r = run_cli("cache", "quantize", "--model", "tiny", env={"SD35_QUANTIZED_DIR": str(tmp_path / "q")})
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("cache", "quantize", "--precision", "int4", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot be stored" in r.stderr and not (tmp_path / "o").exists()


def test_cache_ls_and_verify_know_the_store(prequantized, tmp_path):
    env = {"SD35_QUANTIZED_DIR": str(prequantized.parent)}
    r = run_cli("cache", "ls", "--json", env=env)
    rows = json.loads(r.stdout)
    assert any(row.get("type") == "sd35-quantized" and row["name"] == "tiny-fp8-weight" for row in rows)
    assert run_cli("cache", "verify", env=env).returncode == 0
    # a truncated copy of the store is found
    import shutil

    bad_root = tmp_path / "q"
    shutil.copytree(prequantized, bad_root / "broken", copy_function=shutil.copyfile)
    f = bad_root / "broken" / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    r = run_cli("cache", "verify", env={"SD35_QUANTIZED_DIR": str(bad_root)})
    assert r.returncode == 1 and "truncated" in r.stderr and "sd35 cache quantize" in r.stderr


def test_store_name_resolves_only_with_a_record(tmp_path):
    settings = Settings(quantized_dir=tmp_path)
    (tmp_path / "medium-fp8").mkdir()
    (tmp_path / "medium-fp8" / "model_index.json").write_text("{}")
    assert store.find("medium-fp8", settings) is None  # no record: not ours
    (tmp_path / "medium-fp8" / "sd35_quant.json").write_text(json.dumps({"format": store.FORMAT,
                                                                         "source": {"alias": "medium"}}))
    assert store.find("medium-fp8", settings) == tmp_path / "medium-fp8"
    assert models.family_of(tmp_path / "medium-fp8")[0] == "sd3.5-medium"
    assert store.find("../etc", settings) is None
    assert Settings().quantized_dir is None
    assert store.store_dir(Settings(hf_hub_cache=tmp_path / "hub")) == tmp_path / "hub" / "sd35-quantized"
    with pytest.raises(ModelError):
        (tmp_path / "medium-fp8" / "sd35_quant.json").write_text("{")
        store.read_record(tmp_path / "medium-fp8")


def test_doctor_host_ram_per_load_path_and_instances(prequantized, tiny_cache, monkeypatch):
    from sd35.ops import doctor
    from sd35.ops.doctor import memory

    def ctx(**kw):
        return doctor.Context(settings=Settings(device="cpu", precision="fp8-weight", cache_dir=tiny_cache, **kw))

    stored, how = memory.host_load_bytes(ctx(model=str(prequantized)))
    assert "pre-quantized" in how
    staged, how = memory.host_load_bytes(ctx(model="tiny", lean_load=False))
    assert "bf16 pipeline" in how and staged > stored
    assert "lean" in memory.host_load_bytes(ctx(model="tiny"))[1]
    c = memory.check_host_ram(ctx(model=str(prequantized), instances=3))
    assert c.status == doctor.OK and "× 3 (SD35_INSTANCES)" in c.finding and "MemAvailable" in c.finding
    monkeypatch.setattr(memory, "_meminfo_available", lambda: stored * 2)
    c = memory.check_host_ram(ctx(model="tiny", lean_load=False, instances=3))
    assert c.status == doctor.FAIL and "sd35 cache quantize --model tiny" in c.fix


@pytest.mark.slow
def test_bench_load_reports_our_modes_and_diffusers(tmp_path):
    r = run_cli("bench", "load", "--arch", "tiny", "--json", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert set(report["modes"]) == {"bf16-quantize", "lean", "prequantized", "diffusers-torchao",
                                    "diffusers-prequantized"}
    for row in report["modes"].values():
        assert row["seconds"] > 0 and row["rss_peak_bytes"] > 0 and row["disk_bytes"] > 0
        assert row["fp8_linear_params"] > 0  # each mode ends in fp8-weight
    assert report["modes"]["prequantized"]["disk_bytes"] < report["modes"]["lean"]["disk_bytes"]
    assert len({row["weight_bytes"] for row in report["modes"].values()}) == 1  # the same model five ways
    assert set(report["goal"]["met"]) == {"disk", "rss_peak", "seconds"}
    assert set(report["prequantized_vs_diffusers"]["goal"]["met"]) == {"seconds", "rss_peak"}
    assert list(tmp_path.iterdir()) == []  # the copies are removed


def test_position_table_is_recomputed_bit_identically_in_bands():
    """`sd35 bench load` gives its random transformers SD3's real sin-cos table, computed a band of rows at a
    time: the result must be diffusers' own table, bit for bit (checked for Medium by hand: 147456×1536)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(tiny.TINY_SPEC["transformer"])
    pe = model.pos_embed
    ref = get_2d_sincos_pos_embed(pe.proj.out_channels, pe.pos_embed_max_size, base_size=pe.base_size,
                                  interpolation_scale=pe.interpolation_scale, output_type="pt")
    for rows in (1, 7, 16, 1000):
        assert torch.equal(fp8io.computed_pos_embed(model, rows), ref.float().unsqueeze(0).to(torch.bfloat16))
