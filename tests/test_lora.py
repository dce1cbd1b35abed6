"""LoRAs on the tiny model (random LoRAs written by tests/lorafiles.py in each layout): scale 0 is bit-identical
to no LoRA and scale 1 changes the image; the same LoRA in the diffusers, kohya and ComfyUI layouts gives the
same image; fp8-weight + LoRA stays close to bf16 + LoRA; files for another architecture, unknown keys,
text-encoder keys and too-large ranks are refused by name (or skipped with allow_partial); names outside
SD35_LORA_DIR are refused over HTTP; switching LoRAs on a compiled model does not recompile."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import lorafiles
from helpers import run_cli

LAYOUTS = ("diffusers", "kohya", "comfyui")
# fp8-weight + LoRA vs bf16 + LoRA on the tiny model (4 steps, 64², seed 5), measured on CPU: 41.9 dB (the
# same pair without a LoRA: 42.0 dB — the LoRA's bf16 side path adds no error of its own); fp8 (emulated)
# + LoRA: 41.2 dB (41.3 dB without). The bound leaves
# ~4 dB of room; a LoRA lost on one side would fall far below it (scale 1 moves pixels by > 1/255 on average).
PSNR_BOUND_DB = 38.0


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_cache):
    """A folder with one LoRA in three layouts, a second LoRA, and one for a wider (other) architecture."""
    from sd35.settings import Settings
    from sd35.weights.load import load

    folder = tmp_path_factory.mktemp("loras")
    tr = load(Settings(_env_file=None, device="cpu", precision="bf16", cache_dir=tiny_cache)).pipe.transformer
    one = lorafiles.sai_lora(tr, rank=4, seed=1, std=0.1)
    for layout in LAYOUTS:
        lorafiles.write(folder / f"one-{layout}.safetensors", one, layout, tr)
    lorafiles.write(folder / "two.safetensors", lorafiles.sai_lora(tr, rank=8, seed=2, std=0.1), "kohya", tr)
    other = tmp_path_factory.mktemp("elsewhere")
    lorafiles.write(other / "medium.safetensors", lorafiles.sai_lora(tr, rank=4, seed=3, width=1536), "comfyui", tr)
    lorafiles.write(other / "rank128.safetensors", lorafiles.sai_lora(tr, rank=128, seed=4), "kohya", tr)
    return folder, other, tr


def _runtime(tiny_cache, folder, precision="bf16", **kw):
    from sd35.runtime import Runtime
    from sd35.settings import Settings

    s = Settings(_env_file=None, device="cpu", precision=precision, cache_dir=tiny_cache, lora_dir=folder,
                 lora_max_rank=16, **kw)
    return Runtime.load(s, breaks=[], purpose="serve")


@pytest.fixture(scope="module")
def rt(tiny_cache, lora_dir):
    return _runtime(tiny_cache, lora_dir[0])


def _image(rt, lora, seed=5):
    from sd35.weights.lora_catalog import LoraChoice

    req = rt.check(prompt="a lighthouse", steps=4, height=64, width=64, seed=seed,
                   lora=[LoraChoice(n, s) for n, s in lora])
    return np.asarray(rt.generate(req).images[0], dtype=np.float64)


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_three_layouts_read_to_the_same_tensors(rt, lora_dir):
    from sd35.weights import lora_files

    shape = lora_files.ModelShape.of(rt.pipe.transformer)
    read = {lay: lora_files.load(lora_files.plan(lora_dir[0] / f"one-{lay}.safetensors", shape)) for lay in LAYOUTS}
    ref = read["diffusers"]
    assert len(ref) == 68  # every linear of the tiny MMDiT: q, k, v split out of each fused qkv
    for lay in ("kohya", "comfyui"):
        assert read[lay].keys() == ref.keys()
        for m, (down, up, s) in ref.items():
            d2, u2, s2 = read[lay][m]
            assert s == s2 == 0.5 and (down == d2).all() and (up == u2).all(), (lay, m)


def test_scale_zero_is_bit_identical_and_scale_one_changes_the_image(rt):
    none = _image(rt, [])
    assert (none == _image(rt, [("one-kohya", 0.0)])).all()
    one = _image(rt, [("one-kohya", 1.0)])
    assert np.abs(one - none).mean() > 1.0
    record = rt.lora_record(rt.check(prompt="x", lora=[_choice("one-kohya", 0.8)]))
    applied = record["applied"][0]
    assert (applied["name"], applied["scale"], applied["layers_applied"], applied["layers_in_file"]) == \
        ("one-kohya", 0.8, 48, 48)
    assert len(applied["sha256"]) == 64 and record["slot_rank"] == 16


def _choice(name, scale):
    from sd35.weights.lora_catalog import LoraChoice

    return LoraChoice(name, scale)


def test_the_same_lora_in_three_layouts_gives_the_same_image(rt):
    images = [_image(rt, [(f"one-{lay}", 1.0)]) for lay in LAYOUTS]
    assert (images[0] == images[1]).all() and (images[0] == images[2]).all()
    both = _image(rt, [("one-kohya", 1.0), ("two", 0.5)])  # two LoRAs share the slots along the rank axis
    assert not (both == images[0]).all()


@pytest.mark.parametrize("precision", ["fp8-weight", "fp8"])
def test_fp8_with_lora_stays_close_to_bf16_with_lora(rt, tiny_cache, lora_dir, precision):
    """fp8-weight (FP8 storage) and fp8 (FP8 weights and activations, emulated on this CPU: SD35_FP8_EMULATE):
    the LoRA's bf16 side path sits next to the quantized linear in both."""
    fp8 = _runtime(tiny_cache, lora_dir[0], precision, fp8_emulate=precision == "fp8")
    assert fp8.loaded.plan.transformer == precision and fp8.lora is not None
    pick = [("one-comfyui", 1.0)]
    with_lora = _image(fp8, pick)
    got = psnr(with_lora, _image(rt, pick))
    plain = psnr(_image(fp8, []), _image(rt, []))
    print(f"PSNR {precision}+LoRA vs bf16+LoRA: {got:.1f} dB; without LoRA {plain:.1f} dB")
    assert PSNR_BOUND_DB < got < float("inf")
    assert psnr(with_lora, _image(fp8, [])) < PSNR_BOUND_DB  # the LoRA changed the fp8 image


def test_files_that_do_not_fit_are_refused_by_name(rt, lora_dir, tmp_path):
    import torch

    from sd35.weights import lora_files
    from sd35.weights.lora_files import LoraError

    shape = lora_files.ModelShape.of(rt.pipe.transformer)
    wider = r"context_embedder.lora_down.weight has shape \[4, 1536\].*expects \[4, 64\].*medium's.*another arch"
    with pytest.raises(LoraError, match=wider) as e:
        lora_files.plan(lora_dir[1] / "medium.safetensors", shape)
    assert e.value.exit_code == 2 and e.value.param == "lora"
    with pytest.raises(LoraError, match="rank 128, above the hot-swap maximum SD35_LORA_MAX_RANK=64"):
        lora_files.plan(lora_dir[1] / "rank128.safetensors", shape, max_rank=64)
    tr = rt.pipe.transformer
    one = lorafiles.sai_lora(tr, rank=2, seed=9)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}
    with pytest.raises(LoraError, match=r"another architecture: key lora_unet_double_blocks_0.*Flux"):
        lora_files.plan(lorafiles.write(tmp_path / "flux.safetensors", one, "kohya", tr, extra=flux), shape)
    extra = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}
    te = lorafiles.write(tmp_path / "te.safetensors", one, "kohya", tr, extra=extra)
    with pytest.raises(LoraError, match="lora_te1_text_model_encoder_layers_0_mlp_fc1.* text-encoder"):
        lora_files.plan(te, shape)
    partial = lora_files.plan(te, shape, allow_partial=True)
    assert (partial.applied_layers, partial.file_layers, len(partial.skipped)) == (48, 49, 2)
    beyond = {"lora_unet_joint_blocks_9_x_block_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
              "lora_unet_joint_blocks_9_x_block_mlp_fc1.lora_up.weight": torch.zeros(256, 2)}
    with pytest.raises(LoraError, match=r"unknown key lora_unet_joint_blocks_9_x_block_mlp_fc1.*4 blocks"):
        lora_files.plan(lorafiles.write(tmp_path / "deep.safetensors", one, "kohya", tr, extra=beyond), shape)


def test_names_outside_the_folder_are_refused(lora_dir, tmp_path):
    from sd35.weights import lora_catalog
    from sd35.weights.lora_files import LoraError

    folder, other, _ = lora_dir
    link = folder / "escape.safetensors"
    if not link.exists():
        os.symlink(other / "medium.safetensors", link)
    for name in ("../elsewhere/medium", str(other / "medium.safetensors"), "escape", "..", ".hidden", "a/b"):
        with pytest.raises(LoraError):
            lora_catalog.in_folder(folder, name)
    assert lora_catalog.in_folder(folder, "two").name == "two.safetensors"
    assert "escape.safetensors" not in {p.name for p in lora_catalog.folder_files(folder)}
    assert lora_catalog.parse_spec("/x/y.safetensors:0.8") == lora_catalog.LoraChoice("/x/y.safetensors", 0.8)
    assert lora_catalog.parse_spec("c:style") == lora_catalog.LoraChoice("c:style", 1.0)


@pytest.fixture(scope="module")
def lora_service(lora_dir, tiny_cache):
    from test_service import KEY, InProcessServer, free_port

    from sd35.settings import Settings

    s = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(), api_key=KEY,
                 lora_dir=lora_dir[0], lora_max_rank=16, request_timeout=120)
    with InProcessServer(s) as srv:
        yield srv


@pytest.mark.slow
def test_service_lists_loras_applies_them_and_refuses_traversal(lora_service):
    from test_service import call

    url = lora_service.url
    status, _, listing = call(url + "/v1/loras")
    assert status == 200 and listing["max_rank"] == 16
    two = next(x for x in listing["data"] if x["name"] == "two")
    assert (two["rank"], two["layers"], two["usable"], len(two["sha256"])) == (8, 48, True, 64)
    body = {"prompt": "a cube", "size": "64x64", "steps": 2, "seed": 1}
    for name in ("../elsewhere/medium", "/etc/passwd", "escape", "missing"):
        status, _, err = call(url + "/v1/images/generations", "POST", {**body, "lora": [{"name": name}]})
        assert status == 400 and err["error"]["param"] == "lora", (name, err)
    status, _, ok = call(url + "/v1/images/generations", "POST",
                         {**body, "lora": [{"name": "one-diffusers", "scale": 0.7}]})
    assert status == 200, ok
    applied = ok["sd35"]["lora"]["applied"][0]
    assert (applied["name"], applied["scale"], applied["layers_applied"]) == ("one-diffusers", 0.7, 68)


@pytest.mark.slow
def test_an_edit_takes_loras_from_the_sdk_and_as_json_text(lora_service):
    """/v1/images/edits is multipart: the OpenAI SDK flattens extra_body's `lora` into lora[][name] and
    lora[][scale] fields; curl users send `lora` as JSON text. Both apply the LoRA; a traversal is a 400."""
    import httpx
    from openai import BadRequestError, OpenAI
    from test_edits import encoded, gradient
    from test_service import KEY

    png = encoded(gradient(64, 64))
    client = OpenAI(base_url=lora_service.url + "/v1", api_key=KEY, max_retries=0)
    r = client.images.edit(image=("in.png", png, "image/png"), prompt="a cube",
                           extra_body={"steps": 2, "seed": 1, "lora": [{"name": "one-diffusers", "scale": 0.7}]})
    applied = r.model_extra["sd35"]["lora"]["applied"][0]
    assert (applied["name"], applied["scale"], applied["layers_applied"]) == ("one-diffusers", 0.7, 68)
    assert r.model_extra["sd35"]["edit"]["mode"] == "img2img"
    headers = {"Authorization": f"Bearer {KEY}"}
    form = httpx.post(lora_service.url + "/v1/images/edits", headers=headers, timeout=120,
                      files={"image": ("x.png", png, "image/png")},
                      data={"prompt": "a cube", "steps": "2", "lora": '[{"name": "two", "scale": 0.5}]'})
    assert form.status_code == 200, form.text
    assert form.json()["sd35"]["lora"]["applied"][0]["name"] == "two"
    for bad in ('[{"name": "../elsewhere/medium"}]', "not json"):
        refused = httpx.post(lora_service.url + "/v1/images/edits", headers=headers, timeout=120,
                             files={"image": ("x.png", png, "image/png")}, data={"prompt": "x", "lora": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora", refused.text
    with pytest.raises(BadRequestError) as exc:
        client.images.edit(image=("in.png", png, "image/png"), prompt="x", extra_body={"lora": [{"name": "/etc/passwd"}]})
    assert exc.value.body["param"] == "lora"


@pytest.mark.slow
def test_page_lora_picker_sends_the_picked_lora_and_its_scale(lora_service):
    from test_page import CHROMIUM, CHROMIUM_ARGS, Page
    from test_service import KEY

    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = Page(browser, lora_service.url)
        p = page.page
        page.use_key(KEY)
        p.locator("#lora-field").wait_for(state="visible")
        p.locator("#generate:not([disabled])").wait_for()
        p.locator('input[data-lora="one-diffusers"]').check()
        p.get_by_label("one-diffusers scale").fill("0.7")
        p.get_by_label("Prompt", exact=True).fill("a lighthouse")
        p.get_by_label("Steps").fill("2")
        sent = []
        p.on("request", lambda r: r.method == "POST" and sent.append(r.post_data_json))
        p.get_by_role("button", name="Generate").click()
        entry = p.locator("#gallery .entry").first
        p.locator("#gallery .entry, #error:not([hidden])").first.wait_for(timeout=240_000)
        assert p.locator("#error").is_hidden(), (p.locator("#error").inner_text(), page.console, sent)
        assert sent and sent[0]["lora"] == [{"name": "one-diffusers", "scale": 0.7}], sent
        assert "one-diffusers ×0.7" in entry.locator(".params").inner_text()
        python = entry.locator("pre.python").text_content()  # in a closed <details>
        assert 'extra_body={' in python and '"lora": [{"name":"one-diffusers","scale":0.7}]' in python, python
        assert page.js_errors() == []
        page.close()
        browser.close()


def test_cli_generate_records_the_lora_and_refuses_another_architecture(lora_dir, tmp_path):
    folder, other, _ = lora_dir
    r = run_cli("generate", "--precision", "fp8-weight", "--steps", "1", "--height", "64", "--width", "64",
                "--lora", f"{folder / 'one-kohya.safetensors'}:0.5", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "LoRA one-kohya ×0.5 (unfused): applied to 48 layers (48 in the file)" in r.stderr
    record = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert record["lora"]["applied"][0]["scale"] == 0.5 and record["lora"]["hotswap"] is False
    bad = run_cli("generate", "--steps", "1", "--lora", str(other / "medium.safetensors"), "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "context_embedder" in bad.stderr and "medium" in bad.stderr, bad.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_fused_matches_unfused_and_prequantized_refuses_fuse(lora_dir, tiny_cache, rt):
    from sd35.runtime import Runtime
    from sd35.settings import Settings

    spec = f"{lora_dir[0] / 'one-kohya.safetensors'}:1.0"
    fused = Runtime.load(Settings(_env_file=None, device="cpu", precision="bf16", cache_dir=tiny_cache,
                                  loras=spec, lora_fuse=True), breaks=[])
    assert fused.lora is None and fused.loaded.describe()["lora_fused"][0]["layers_applied"] == 48
    req = fused.check(prompt="a lighthouse", steps=4, height=64, width=64, seed=5)
    got = psnr(np.asarray(fused.generate(req).images[0], dtype=np.float64), _image(rt, [("one-kohya", 1.0)]))
    assert got > 30, got  # bf16 rounding of W + BA vs the side path


@pytest.mark.slow
@pytest.mark.timeout(2400)  # inductor on a shared 2-core CPU: minutes
def test_alternating_loras_on_a_compiled_model_does_not_recompile(lora_dir, tiny_cache):
    from torch._dynamo.utils import counters

    from sd35.weights.lora_catalog import LoraChoice

    rt = _runtime(tiny_cache, lora_dir[0], compile="blocks")

    def image(name):  # one step, no CFG: the fewest compiled calls that still run every block
        req = rt.check(prompt="a lighthouse", steps=1, guidance=0.0, height=64, width=64, seed=5,
                       lora=[LoraChoice(name, 1.0)])
        return np.asarray(rt.generate(req).images[0], dtype=np.float64)

    image("one-kohya")  # compiles
    before = counters["stats"]["unique_graphs"]
    images = [image(name) for name in ("two", "one-kohya", "two", "one-kohya")]
    assert counters["stats"]["unique_graphs"] - before == 0
    assert (images[0] == images[2]).all() and not (images[0] == images[1]).all()
