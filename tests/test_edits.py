"""Edits (issue #26): img2img and inpainting through the one Runtime, `sd35 generate --image/--mask`, and
OpenAI's POST /v1/images/edits driven by the official Python SDK — plain, streamed, and with bad input
(bombs, non-images, truncated files, wrong content types, unusual pixel modes, masks without alpha or of
another size)."""

from __future__ import annotations

import base64
import io
import json
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from test_service import KEY, InProcessServer, call, free_port

from sd35.errors import InputError
from sd35.inference import edit as edits
from sd35.inference import inputs


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 128, h: int = 128) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8))


def hole_mask(w: int = 128, h: int = 128, box=(32, 32, 96, 96)) -> Image.Image:
    """OpenAI's mask: opaque everywhere but a transparent box (the region to repaint)."""
    m = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), box)
    return m


def psnr(a, b, where=None) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if where is not None:
        a, b = a[where], b[where]
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def bomb_png(side: int = 30000) -> bytes:
    """A small PNG whose header declares side x side pixels (the IDAT holds a little zlib of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4_000_000, 9)) \
        + chunk(b"IEND", b"")


# --- reading inputs ----------------------------------------------------------------------------------------

def test_a_declared_bomb_is_refused_from_its_header_fast_and_flat():
    data = bomb_png()
    assert len(data) < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(InputError) as exc:
        inputs.read_image(data, "image")
    assert time.perf_counter() - started < 1.0
    assert exc.value.param == "image" and "pixels" in exc.value.cause
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB: no 2.7 GB decode


@pytest.mark.parametrize("data,words", [
    (b"", "empty"), (b"GIF89a not really", "not a png"), (encoded(gradient())[:400], "truncated"),
    (encoded(gradient(), "BMP"), "not a png"),
])
def test_non_images_and_truncated_files_name_the_field(data, words):
    with pytest.raises(InputError) as exc:
        inputs.read_image(data, "image[1]")
    assert exc.value.param == "image[1]" and words in exc.value.cause


def test_unusual_pixel_modes_are_converted():
    rgb = inputs.read_image(encoded(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG")).image  # red in CMYK
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5))[0] > 200 and rgb.getpixel((5, 5))[1] < 60
    sixteen = Image.fromarray(np.full((10, 20), 50000, dtype=np.uint16))  # I;16: PIL's convert would clip to 255
    assert inputs.read_image(encoded(sixteen)).image.getpixel((0, 0)) == (195, 195, 195)
    palette = Image.new("P", (20, 10))
    palette.putpalette([0, 0, 255] * 256)
    assert inputs.read_image(encoded(palette)).image.getpixel((0, 0)) == (0, 0, 255)
    clear = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # alpha flattened onto white
    assert inputs.read_image(encoded(clear)).image.getpixel((0, 0)) == (255, 255, 255)
    assert inputs.read_image(encoded(Image.new("L", (20, 10), 77), "WEBP", lossless=True)).image.getpixel(
        (0, 0)) == (77, 77, 77)
    tall = Image.new("RGB", (20, 10))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotated 90°: the picture is 10 wide, 20 tall
    pic = inputs.read_image(encoded(tall, "JPEG", exif=exif.tobytes()))
    assert pic.size == (10, 20) and pic.image.size == (10, 20) and pic.format == "jpeg"


def test_masks_need_alpha_and_the_image_size():
    with pytest.raises(InputError) as exc:
        inputs.read_mask(encoded(Image.new("RGB", (20, 10))))
    assert exc.value.param == "mask" and "alpha" in exc.value.cause and "putalpha" in exc.value.fix
    with pytest.raises(InputError, match="opaque everywhere"):
        inputs.read_mask(encoded(Image.new("RGBA", (20, 10), (0, 0, 0, 255))))
    mask = inputs.read_mask(encoded(hole_mask(20, 10, (0, 0, 5, 5))))
    assert mask.image.getpixel((1, 1)) == 255 and mask.image.getpixel((10, 8)) == 0  # 255 = repaint
    with pytest.raises(InputError) as exc:
        inputs.check_pair(inputs.read_image(encoded(gradient(30, 10))), mask)
    assert "20x10" in exc.value.cause and "30x10" in exc.value.cause and exc.value.param == "mask"


def test_auto_size_rounds_to_the_model_and_keeps_the_aspect():
    assert edits.auto_size(150, 100, 16, 1024) == (144, 96)
    assert edits.auto_size(4000, 3000, 16, 1024) == (1024, 768)
    w, h = edits.auto_size(2048, 2048, 16, 4096, max_pixels=1536 * 1536)
    assert (w, h) == (1536, 1536)
    assert edits.auto_size(10, 10, 16, 1024) == (64, 64)


def test_feather_stays_inside_the_mask():
    weight = edits.feather(Image.fromarray(np.asarray(hole_mask())[..., 3] ^ 255), 4)
    assert weight[:32].max() == 0 and weight[:, :32].max() == 0  # outside: exactly the source
    assert weight[64, 64] == 1.0 and 0 < weight[33, 64] < 1  # inside: generated, blended at the edge


# --- the runtime -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt(tiny_cache):
    from sd35.runtime import Runtime
    from sd35.settings import Settings

    return Runtime.load(Settings(_env_file=None, device="cpu", precision="fp8-weight", cache_dir=tiny_cache),
                        breaks=[])


def test_edit_pipelines_share_the_loaded_weights(rt):
    before = {n: (p.data_ptr(), type(p)) for n, p in rt.pipe.transformer.named_parameters()}
    picture = inputs.read_image(encoded(gradient()))
    rt.generate(rt.check(prompt="x", seed=1, image=picture, steps=2))
    after = {n: (p.data_ptr(), type(p)) for n, p in rt.pipe.transformer.named_parameters()}
    assert before == after and any("Float8" in t.__name__ for _, t in after.values())  # FP8 kept, not cast
    edit_pipe = edits.pipeline(rt.pipe, "img2img")
    assert all(getattr(edit_pipe, k) is v for k, v in rt.pipe.components.items() if k in edit_pipe.components)


def test_inpainting_keeps_every_pixel_outside_the_mask(rt, tmp_path):
    source = gradient()
    request = rt.check(prompt="a red ball", seed=3, image=inputs.read_image(encoded(source)),
                       mask=inputs.read_mask(encoded(hole_mask())), steps=3)
    result = rt.generate(request, n=2)
    outside = np.asarray(hole_mask())[..., 3] == 255
    for image in result.images:
        assert psnr(image, source, outside) >= 40  # (exactly equal: the source is composited back)
        assert psnr(image, source, ~outside) < 30  # the hole was repainted
    png, js = rt.save(result, tmp_path)[0]
    record = json.loads(js.read_text())["parameters"]["edit"]
    assert record["mode"] == "inpaint" and record["strength"] == 1.0
    assert record["image_sha256"] == inputs.read_image(encoded(source)).sha256 and record["mask_sha256"]


def test_strength_sets_how_far_the_input_moves(rt, monkeypatch):
    """With the MMDiT predicting no change, the final latents are the input's, noised as far as strength
    says: PSNR against the input's latents falls as strength rises (the random tiny VAE and MMDiT make
    pixel PSNR meaningless here; real-weight numbers are measured with the command in the report)."""
    import torch

    pipe = rt.pipe
    picture = inputs.read_image(encoded(gradient()))
    with torch.inference_mode():
        x = pipe.image_processor.preprocess(picture.image).to(pipe.vae.dtype)
        drawn = pipe.vae.encode(x).latent_dist.sample(torch.Generator("cpu").manual_seed(1))  # as the pipeline does
        clean = (drawn - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    monkeypatch.setattr(pipe.transformer, "forward", lambda hidden_states, **_: (torch.zeros_like(hidden_states),))
    scores = {}
    for strength in (0.1, 0.5, 1.0):
        got = {}
        rt.generate(rt.check(prompt="x", seed=1, image=picture, strength=strength, steps=20, guidance=0.0),
                    on_latents=lambda i, lat: got.update(last=lat.float().clone()))
        span = (clean.max() - clean.min()).item()
        scores[strength] = 10 * np.log10(span ** 2 / ((got["last"] - clean.float()) ** 2).mean().item())
    print("latent PSNR by strength", {k: round(v, 1) for k, v in scores.items()})
    assert scores[0.1] > 20 > scores[1.0] and scores[0.1] > scores[0.5] > scores[1.0], scores


def test_strength_is_checked(rt):
    picture = inputs.read_image(encoded(gradient()))
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(InputError) as exc:
            rt.check(prompt="x", image=picture, strength=bad)
        assert exc.value.param == "strength"
    with pytest.raises(InputError, match="runs no denoising step"):
        rt.check(prompt="x", image=picture, strength=1e-18, steps=4)  # 4 - 4e-18 rounds to 4: nothing left
    assert rt.check(prompt="x", image=picture, strength=0.5, steps=10).denoising_steps == 5


@pytest.mark.slow  # three CLI processes, two of them load the model
def test_cli_edit_and_its_refusals(tmp_path):
    gradient(150, 100).save(tmp_path / "in.png")
    hole_mask(150, 100, (10, 10, 60, 60)).save(tmp_path / "mask.png")
    Image.new("RGB", (150, 100)).save(tmp_path / "flat.png")
    r = run_cli("generate", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                "--steps", "2", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["parameters"]["width"] == 144 and record["parameters"]["height"] == 96
    assert record["parameters"]["edit"]["source_size"] == [150, 100]
    r = run_cli("generate", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "flat.png"), cwd=tmp_path)
    assert r.returncode == 2 and "alpha" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "--strength", "0.5", cwd=tmp_path)
    assert r.returncode == 2 and "--strength needs --image" in r.stderr


# --- the API, through the official SDK ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tiny_cache):
    from sd35.settings import Settings

    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_key=KEY, max_pixels=256 * 256, max_body_bytes=256 * 1024, request_timeout=120)
    with InProcessServer(settings) as srv:
        yield srv


@pytest.fixture()
def client(api):
    from openai import OpenAI

    return OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0)


PNG = encoded(gradient(150, 100))
MASK = encoded(hole_mask(150, 100, (20, 20, 80, 80)))


def test_sdk_edit_inpaints_and_keeps_the_rest(client):
    r = client.images.edit(image=("in.png", PNG, "image/png"), mask=("mask.png", MASK, "image/png"),
                           prompt="a cat", size="auto", extra_body={"steps": 2, "seed": 5})
    assert r.size == "144x96" and len(r.data) == 1
    assert r.usage.input_tokens_details.image_tokens > 0
    out = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    source = gradient(150, 100).resize((144, 96), Image.Resampling.LANCZOS)
    keep = np.asarray(hole_mask(150, 100, (20, 20, 80, 80)).resize((144, 96), Image.Resampling.NEAREST))[..., 3] == 255
    assert psnr(out, source, keep) >= 40
    assert r.model_extra["sd35"]["edit"]["mode"] == "inpaint"
    two = client.images.edit(image=[("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")], prompt="a cat",
                             extra_body={"steps": 1})
    assert any("the first was edited" in note for note in two.model_extra["sd35"]["notes"])


def test_sdk_edit_streams_image_edit_events(client):
    events = list(client.images.edit(image=[("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")],
                                     prompt="a cat", stream=True, partial_images=2,
                                     extra_body={"steps": 4, "strength": 1.0}))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].usage.total_tokens > 0 and events[-1].size == "144x96"


@pytest.mark.parametrize("files,param,words", [
    ({"image": ("x.png", b"not an image", "image/png")}, "image", "not a png"),
    ({"image": ("x.png", PNG[:300], "image/png")}, "image", "truncated"),
    ({"image": ("x.txt", PNG, "text/plain")}, "image", "text/plain"),
    ({"image": ("x.png", bomb_png(), "image/png")}, "image", "pixels"),
    ({"image": ("x.png", PNG, "image/png"), "mask": ("m.png", PNG, "image/png")}, "mask", "alpha"),
    ({"image": ("x.png", PNG, "image/png"), "mask": ("m.png", encoded(hole_mask()), "image/png")}, "mask", "128x128"),
])
def test_bad_inputs_are_400s_naming_the_field(client, files, param, words):
    import openai

    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(prompt="x", **files)
    assert time.perf_counter() - started < 5
    body = exc.value.body
    assert body["param"] == param and words in body["message"], body


def test_body_limits_and_content_type(api):
    code, _, body = call(api.url + "/v1/images/edits", "POST", {"prompt": "x"})
    assert code == 415 and "multipart/form-data" in body["error"]["message"]
    import httpx

    big = httpx.post(api.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"},
                     files={"image": ("x.png", b"\0" * 300_000, "image/png")}, data={"prompt": "x"})
    assert big.status_code == 413
    form = httpx.post(api.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"},
                      files={"image": ("x.png", PNG, "image/png")}, data={"prompt": "x", "strength": "7"})
    assert form.status_code == 400 and form.json()["error"]["param"] == "strength"


def test_openapi_describes_the_multipart_edit(api):
    _, _, schema = call(api.url + "/openapi.json")
    op = schema["paths"]["/v1/images/edits"]["post"]
    assert list(op["requestBody"]["content"]) == ["multipart/form-data"]
    form = schema["components"]["schemas"]["ImageEditForm"]
    assert form["properties"]["image"]["format"] == "binary" and "mask" in form["properties"]
    assert form["properties"]["strength"]["anyOf"][0]["maximum"] == 1 and "image" in form["required"]
    assert {"200", "400", "413", "415", "429", "503"} <= set(op["responses"])
    assert "text/event-stream" in op["responses"]["200"]["content"]


# --- on a GPU: every precision, compiled -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp8-weight", "fp8"])
def test_edits_on_cuda_compiled_in_every_precision(precision, tmp_path):
    """img2img and inpainting through the compiled MMDiT, no second copy of the weights (GPU memory flat)."""
    import torch

    from helpers import has_cuda, has_fp8_gpu
    from sd35.inference.compilation import CompilePlan
    from sd35.runtime import Runtime
    from sd35.settings import Settings
    from sd35.weights.load import load

    if not has_cuda() or (precision == "fp8" and not has_fp8_gpu()):
        pytest.skip("needs a CUDA GPU (with FP8 tensor cores for fp8)")
    rt = Runtime(load(Settings(device="cuda", precision=precision)), [],
                 CompilePlan("blocks", "test", str(tmp_path / "cache")))
    rt.generate(rt.check(prompt="a cube", steps=2, seed=0))
    weights = torch.cuda.memory_allocated()
    picture = inputs.read_image(encoded(gradient()))
    mask = inputs.read_mask(encoded(hole_mask()))
    for m in (None, mask):
        result = rt.generate(rt.check(prompt="a cube", steps=4, seed=0, image=picture, mask=m), n=2)
        assert len(result.images) == 2 and result.images[0].size == (128, 128)
    assert torch.cuda.memory_allocated() - weights < 64 * 2**20  # the edit pipelines added no weights
    outside = np.asarray(hole_mask())[..., 3] == 255
    assert psnr(result.images[0], gradient(), outside) >= 40


@pytest.mark.slow
def test_node_sdk_edit_plain_and_streamed(api, tmp_path):
    import os
    import shutil
    import subprocess
    import textwrap

    from test_service_openai import NODE_DIR, NODE_OPENAI

    if not shutil.which("node"):
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR), NODE_OPENAI],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"npm could not install the openai SDK (offline?): {r.stderr[-300:]}")
    (tmp_path / "in.png").write_bytes(PNG)
    (tmp_path / "mask.png").write_bytes(MASK)
    script = textwrap.dedent(f"""
        const fs = require("fs");
        const {{ OpenAI, toFile }} = require("openai");
        const client = new OpenAI({{ baseURL: "{api.url}/v1", apiKey: "{KEY}", maxRetries: 0 }});
        const file = (name) => toFile(fs.readFileSync("{tmp_path}/" + name), name, {{ type: "image/png" }});
        (async () => {{
          const out = {{}};
          const r = await client.images.edit({{ image: await file("in.png"), mask: await file("mask.png"),
                                               prompt: "node", steps: 2 }});
          out.edit = [r.data.length, r.size, r.sd35.edit.mode];
          const stream = await client.images.edit({{ image: await file("in.png"), prompt: "node", stream: true,
                                                    partial_images: 1, steps: 4 }});
          out.stream = [];
          for await (const ev of stream) out.stream.push(ev.type);
          try {{ await client.images.edit({{ image: await file("mask.png"), mask: await file("in.png"), prompt: "x" }}); }}
          catch (e) {{ out.error = [e.status, e.error && e.error.param]; }}
          console.log(JSON.stringify(out));
        }})().catch((e) => {{ console.error(e); process.exit(1); }});
    """)
    r = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["edit"] == [1, "144x96", "inpaint"]
    assert out["stream"] == ["image_edit.partial_image", "image_edit.completed"]
    assert out["error"] == [400, "mask"]


def test_the_default_body_limit_fits_a_2048_png_and_its_mask():
    from sd35.settings import Settings

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2048, 2048, 4), dtype=np.uint8))  # worst case
    mask = hole_mask(2048, 2048, (0, 0, 1024, 2048))
    body = len(encoded(noise, compress_level=1)) + len(encoded(mask)) + 4096  # + the form's own bytes
    assert body <= Settings(_env_file=None).max_body_bytes
