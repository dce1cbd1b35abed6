"""Real-model resolution against a fake Hub cache (offline) and a fake Hub on loopback: every failure
ends in a cause and a fix, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fakehub import COMMIT, FakeHub, plant_cached_model
from helpers import free_port, run_cli

from sd35.weights import hub, tiny
from sd35.errors import ModelError
from sd35.settings import Settings

MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


@pytest.fixture
def hub_cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


@pytest.fixture
def cached_medium(hub_cache, tiny_cache) -> Path:
    """The tiny model planted in the Hub cache as if it were SD3.5 Medium at COMMIT."""
    return plant_cached_model(hub_cache, MEDIUM, tiny.tiny_dir(tiny_cache))


def test_aliases_and_defaults():
    from sd35 import models

    assert models.expand_alias("medium") == MEDIUM
    assert models.expand_alias("large-turbo") == "stabilityai/stable-diffusion-3.5-large-turbo"
    assert models.lookup("large-turbo").sampling.guidance == 0.0
    assert models.lookup(MEDIUM).alias == "medium"
    assert models.info_for("tiny", None).sampling.height == 128


def test_allow_patterns_skip_single_file_checkpoints_and_t5_when_off():
    from huggingface_hub.utils import filter_repo_objects

    files = ["model_index.json", "sd3.5_large.safetensors", "text_encoders/t5xxl_fp16.safetensors",
             "transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "text_encoder_3/model.safetensors",
             "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors"]
    got = set(filter_repo_objects(files, allow_patterns=hub.allow_patterns(True), ignore_patterns=hub.IGNORE_PATTERNS))
    assert got == {"model_index.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                   "text_encoder_3/model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    got = set(filter_repo_objects(files, allow_patterns=hub.allow_patterns(False), ignore_patterns=hub.IGNORE_PATTERNS))
    assert "text_encoder_3/model.safetensors" not in got


def test_offline_resolves_from_fake_hub_cache(cached_medium, hub_cache):
    s = Settings(model="medium", hf_hub_offline=True, hf_hub_cache=hub_cache)
    src = hub.resolve(s)
    assert src.kind == "hub" and src.repo_id == MEDIUM and src.commit == COMMIT
    assert src.path == cached_medium and src.revision == "main"
    # a pinned commit resolves too
    src = hub.resolve(Settings(model=MEDIUM, revision=COMMIT, hf_hub_offline=True, hf_hub_cache=hub_cache))
    assert src.commit == COMMIT


@pytest.mark.slow
def test_generate_offline_from_fake_hub_cache_records_repo_and_commit(cached_medium, hub_cache, tmp_path):
    r = run_cli("generate", "--model", MEDIUM, "--steps", "2", "--height", "128", "--width", "128",
                "--seed", "3", "--out", str(tmp_path / "o"),
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)})
    assert r.returncode == 0, r.stderr
    meta = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert meta["model"]["repo_id"] == MEDIUM and meta["model"]["commit"] == COMMIT
    assert meta["model"]["kind"] == "hub" and meta["parameters"]["guidance"] == 4.5  # Medium's default


def test_offline_and_not_cached(hub_cache):
    with pytest.raises(ModelError) as e:
        hub.resolve(Settings(model="large", hf_hub_offline=True, hf_hub_cache=hub_cache))
    assert "not in the Hugging Face cache" in e.value.cause and "HF_HUB_OFFLINE=1" in e.value.cause
    assert "sd35 cache prefetch stabilityai/stable-diffusion-3.5-large" in e.value.fix


def test_offline_revision_not_cached(cached_medium, hub_cache):
    with pytest.raises(ModelError, match="revision v2"):
        hub.resolve(Settings(model="medium", revision="v2", hf_hub_offline=True, hf_hub_cache=hub_cache))


def test_cli_offline_not_cached_exits_2_without_traceback(hub_cache, tmp_path):
    r = run_cli("generate", "--model", "large", "--out", str(tmp_path / "o"),
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)})
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_local_folder_loads_and_missing_folder_fails(tiny_cache, tmp_path):
    src = hub.resolve(Settings(model=str(tiny.tiny_dir(tiny_cache))))
    assert src.kind == "local"
    with pytest.raises(ModelError, match="does not exist"):
        hub.resolve(Settings(model=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        hub.resolve(Settings(model=str(tmp_path / "empty")))


def test_lfs_pointer_stubs_are_named_with_the_git_lfs_fix(tiny_cache, tmp_path):
    clone = tmp_path / "sd35-clone"
    shutil.copytree(tiny.tiny_dir(tiny_cache), clone)
    weights = clone / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4771000000\n")
    with pytest.raises(ModelError) as e:
        hub.resolve(Settings(model=str(clone)))
    assert "LFS pointer" in e.value.cause and "transformer/diffusion_pytorch_model.safetensors" in e.value.cause
    assert "git lfs install" in e.value.fix and "lfs pull" in e.value.fix
    r = run_cli("generate", "--model", str(clone), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "git lfs" in r.stderr and "Traceback" not in r.stderr


def test_missing_component_folder(tiny_cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny.tiny_dir(tiny_cache), broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="vae"):
        hub.resolve(Settings(model=str(broken)))
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ModelError, match="vae"):  # T5 off: its absence is fine, the VAE's is not
        hub.resolve(Settings(model=str(broken)), with_t5=False)


@pytest.mark.parametrize(
    "repo,token,cause,fix",
    [
        ("org/gated", None, "gated repo and no Hugging Face token was sent", "set HF_TOKEN"),
        ("org/gated", "hf_noaccess", "your token has no access", "accept the license"),
        ("org/badtoken", "hf_expired", "invalid or expired", "create a new read token"),
        ("org/forbidden", "hf_x", "not allowed to read", "accept the license"),
        ("org/missing", None, "not found on the Hub", "check the repo id"),
    ],
)
def test_hub_auth_errors(hub_cache, repo, token, cause, fix):
    with FakeHub() as fake:
        s = Settings(model=repo, hf_endpoint=fake.endpoint, hf_token=token, hf_hub_cache=hub_cache)
        with pytest.raises(ModelError) as e:
            hub.resolve(s)
        assert cause in e.value.cause and fix in e.value.fix, str(e.value)
        assert fake.requests[0][1] == (f"Bearer {token}" if token else None)  # the settings' token was sent
    assert not (hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots").exists()


def test_not_enough_disk_is_refused_before_downloading(hub_cache):
    with FakeHub() as fake:
        with pytest.raises(ModelError) as e:
            hub.resolve(Settings(model="org/huge", hf_endpoint=fake.endpoint, hf_hub_cache=hub_cache))
        # only the pipeline's files count: the 10 PB single-file checkpoint is not downloaded
        assert "1000000.0 GB to download" in e.value.cause and "HF_HUB_CACHE" in e.value.fix
        assert not any("/resolve/" in p for p, _ in fake.requests)


def test_cli_gated_repo_error(hub_cache, tmp_path):
    with FakeHub() as fake:
        r = run_cli("generate", "--model", "org/gated", "--out", str(tmp_path / "o"),
                    env={"HF_ENDPOINT": fake.endpoint, "HF_HUB_CACHE": str(hub_cache)})
    assert r.returncode == 2 and "gated" in r.stderr and "HF_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def _unreachable_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # a port nothing listens on: connection refused at once


def test_hub_unreachable_not_cached_names_the_way_out(hub_cache):
    with pytest.raises(ModelError) as e:
        hub.resolve(Settings(model="large", hf_endpoint=_unreachable_endpoint(), hf_hub_cache=hub_cache))
    assert "could not be reached" in e.value.cause and "HF_HUB_OFFLINE=1" in e.value.fix


def test_hub_unreachable_falls_back_to_the_cache(cached_medium, hub_cache):
    src = hub.resolve(Settings(model="medium", hf_endpoint=_unreachable_endpoint(), hf_hub_cache=hub_cache))
    assert src.path == cached_medium and src.commit == COMMIT
