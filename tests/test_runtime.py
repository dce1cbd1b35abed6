"""The runtime and the model registry: defaults read from a folder's own configs, limits from the model,
one image reproducible on its own seed, and the CLI going through it all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from sd35 import models
from sd35.errors import InputError


def _fake_folder(root: Path, name: str, transformer: dict) -> Path:
    """A diffusers-layout folder with configs only (enough for the registry; no weights)."""
    folder = root / name
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel",
                                                                     **transformer}))
    (folder / "vae" / "config.json").write_text(json.dumps(models.VAE))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder


def test_local_folders_get_their_family_defaults(tmp_path):
    turbo = models.describe_folder(_fake_folder(tmp_path, "sd3.5-large-turbo-clone", models.TRANSFORMER_LARGE))
    assert turbo.family == "sd3.5-large-turbo" and (turbo.sampling.steps, turbo.sampling.guidance) == (4, 0.0)
    assert "turbo" in turbo.family_reason.lower()
    large = models.describe_folder(_fake_folder(tmp_path, "my-large", models.TRANSFORMER_LARGE))
    assert large.family == "sd3.5-large" and (large.sampling.steps, large.sampling.guidance) == (28, 3.5)
    medium = models.describe_folder(_fake_folder(tmp_path, "m", models.TRANSFORMER_MEDIUM))
    assert medium.family == "sd3.5-medium" and medium.sampling.steps == 40
    # The position table bounds the size: Large 192 patches x 2 x 8 = 3072 px, Medium 384 x 16 = 6144 px.
    assert large.max_side == 3072 and medium.max_side == 6144
    odd = models.describe_folder(_fake_folder(tmp_path, "odd", {**models.TRANSFORMER_MEDIUM, "num_layers": 7,
                                                                  "sample_size": 64}))
    assert odd.family == "sd3" and odd.sampling.height == 512 and "no published" in odd.family_reason


def test_hub_cache_turbo_snapshot_is_recognised_by_its_repo_folder(tmp_path):
    snap = tmp_path / "models--stabilityai--stable-diffusion-3.5-large-turbo" / "snapshots"
    folder = _fake_folder(snap, "0123abcd", models.TRANSFORMER_LARGE)
    assert models.describe_folder(folder).family == "sd3.5-large-turbo"


def test_tiny_folder_by_path_gets_the_tiny_size(tiny_cache):
    from sd35.weights import tiny

    info = models.describe_folder(tiny.tiny_dir(tiny_cache), str(tiny.tiny_dir(tiny_cache)))
    assert info.family == "tiny" and (info.sampling.height, info.sampling.width) == (128, 128)
    assert info.max_side == 96 * 2 * 8


@pytest.fixture(scope="module")
def rt(tiny_cache_module):
    from sd35.runtime import Runtime
    from sd35.settings import Settings

    return Runtime.load(Settings(device="cpu", precision="fp8-weight", cache_dir=tiny_cache_module), breaks=[])


@pytest.fixture(scope="module")
def tiny_cache_module(tiny_cache):
    return tiny_cache


def test_check_uses_model_defaults_and_limits(rt):
    req = rt.check(prompt="a cube", seed=1)
    assert (req.steps, req.height, req.width) == (4, 128, 128)
    with pytest.raises(InputError) as e:
        rt.check(prompt="a cube", height=1792, width=1024)  # beyond the tiny model's 1536 px table
    assert e.value.param == "height" and "1536" in e.value.cause and "--height 1536" in e.value.fix
    with pytest.raises(InputError):
        rt.check(prompt="  ")


def test_each_image_of_a_batch_is_reproducible_alone(rt, tmp_path):
    req = rt.check(prompt="a red cube", steps=2, seed=41)
    batch = rt.generate(req, n=3)
    assert batch.seeds == [41, 42, 43] and len(batch.images) == 3
    alone = rt.generate(rt.check(prompt="a red cube", steps=2, seed=42))
    a = np.asarray(batch.images[1], dtype=np.float64)
    b = np.asarray(alone.images[0], dtype=np.float64)
    # Same latents; batched and single bf16 matmuls round differently, so equal to within rounding (PSNR),
    # while a neighbouring seed gives a different image.
    from sd35.bench.fidelity import psnr

    assert psnr(a.astype(np.uint8), b.astype(np.uint8)) >= 40
    assert psnr(np.asarray(batch.images[0]), alone.images[0]) < 30
    written = rt.save(batch, tmp_path)
    seeds = [json.loads(js.read_text())["parameters"]["seed"] for _, js in written]
    assert seeds == [41, 42, 43] and all(png.name.split("-")[-1] == f"{s}.png" for (png, _), s in zip(written, seeds))
    record = json.loads(written[2][1].read_text())
    assert record["batch"] == {"n": 3, "index": 2, "seeds": [41, 42, 43], "request_seed": 41}
    assert record["model_info"]["family"] == "tiny"


def test_cancel_stops_at_a_step(rt):
    import threading

    from sd35.runtime import Cancelled

    cancel = threading.Event()
    seen = []

    def on_step(i, total):
        seen.append(i)
        cancel.set()

    with pytest.raises(Cancelled):
        rt.generate(rt.check(prompt="x", steps=4, seed=0), on_step=on_step, cancel=cancel)
    assert seen == [1]


@pytest.mark.slow
def test_cli_generate_local_tiny_folder_defaults_to_its_own_size(tiny_cache, tmp_path):
    from sd35.weights import tiny

    local = tmp_path / "my-sd35-folder"
    shutil.copytree(tiny.tiny_dir(tiny_cache), local)
    r = run_cli("generate", "--model", str(local), "--steps", "1", "-n", "2", "--seed", "9", "--out",
                str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    sidecars = sorted((tmp_path / "out").glob("*.json"))
    assert len(sidecars) == 2
    first = json.loads(sidecars[0].read_text())
    assert (first["parameters"]["height"], first["parameters"]["width"]) == (128, 128)
    assert {json.loads(s.read_text())["parameters"]["seed"] for s in sidecars} == {9, 10}
    assert "seeds 9, 10" in r.stderr


def test_cli_refuses_too_large_size_before_loading(tmp_path):
    r = run_cli("generate", "--height", "2048", "--steps", "1")
    assert r.returncode == 2 and "1536" in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr
    assert "load " not in r.stderr  # refused before the model loaded
    assert not (tmp_path / "outputs").exists()
