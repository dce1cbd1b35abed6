"""`sd35 cache init | prefetch | verify | ls` on temporary folders, a fake Hub cache and a fake Hub."""

from __future__ import annotations

import grp
import json
import os
import stat
from pathlib import Path

import pytest
from fakehub import COMMIT, FakeHub, plant_cached_model
from helpers import run_cli

from sd35.ops import cache
from sd35.weights import tiny

MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


def test_init_creates_a_group_owned_setgid_folder(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    target = tmp_path / "srv" / "hf"
    r = run_cli("cache", "init", str(target), "--group", group)
    assert r.returncode == 0, r.stderr
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2775 and st.st_gid == os.getgid()
    assert f"HF_HUB_CACHE={target}" in r.stdout and "umask 0002" in r.stdout
    assert "HF_HOME" in r.stderr  # says the token stays per user
    assert cache.is_shared(target)
    assert run_cli("cache", "init", str(target), "--group", group).returncode == 0  # idempotent


def test_init_unknown_group(tmp_path):
    r = run_cli("cache", "init", str(tmp_path / "c"), "--group", "no-such-group-sd35")
    assert r.returncode == 2 and "does not exist" in r.stderr and "groupadd" in r.stderr


@pytest.fixture
def planted(tmp_path, tiny_cache) -> Path:
    hub_cache = tmp_path / "hub"
    plant_cached_model(hub_cache, MEDIUM, tiny.tiny_dir(tiny_cache))
    return hub_cache


def test_verify_clean_cache_passes(planted):
    assert cache.verify(planted) == []
    r = run_cli("cache", "verify", env={"HF_HUB_CACHE": str(planted)})
    assert r.returncode == 0 and "no problems" in r.stderr


def test_verify_finds_lfs_stub_truncation_missing_blob_and_group_permissions(planted):
    snap = planted / f"models--{MEDIUM.replace('/', '--')}" / "snapshots" / COMMIT
    # an LFS pointer where the VAE weights should be
    vae = snap / "vae" / "diffusion_pytorch_model.safetensors"
    blob = vae.resolve()
    vae.unlink()
    vae.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "2" * 64 + "\nsize 167666902\n")
    # the transformer's blob cut short
    tr = (snap / "transformer" / "diffusion_pytorch_model.safetensors").resolve()
    data = tr.read_bytes()
    tr.write_bytes(data[: len(data) // 2])
    # T5's blob deleted under its link
    (snap / "text_encoder_3" / "model.safetensors").resolve().unlink()
    # make it a shared cache where one blob is not group-writable
    for d in [planted, *[p for p in planted.rglob("*") if p.is_dir() and not p.is_symlink()]]:
        os.chmod(d, 0o2775)
    for f in planted.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o664)
    os.chmod(blob, 0o644)
    kinds = {(p.kind, p.path.name) for p in cache.verify(planted)}
    assert ("lfs-stub", "diffusion_pytorch_model.safetensors") in kinds
    assert ("truncated", "diffusion_pytorch_model.safetensors") in kinds
    assert ("missing-blob", "model.safetensors") in kinds
    assert ("permissions", blob.name) in kinds
    # an unreadable file is reported once, as unreadable; a hard-linked private file gets a fix that
    # copies it instead of chmod-ing the inode it shares
    private = planted.parent / "private.safetensors"
    private.write_bytes(b"x" * 10)
    os.chmod(private, 0o600)
    linked = planted / "linked.safetensors"
    os.link(private, linked)
    problems = [p for p in cache.verify(planted) if p.path == linked]
    assert len(problems) == 1 and problems[0].kind == "unreadable", problems
    assert "permission denied" in problems[0].detail and "cannot write" not in problems[0].detail
    assert "hard-linked" in problems[0].fix and "chmod -R" not in problems[0].fix and "cp " in problems[0].fix
    paths = [p.path for p in cache.verify(planted)]
    assert len(paths) == len(set(paths))  # each file once
    linked.unlink()
    r = run_cli("cache", "verify", MEDIUM, env={"HF_HUB_CACHE": str(planted)})
    assert r.returncode == 1
    assert "lfs-stub" in r.stderr and "truncated" in r.stderr and "missing-blob" in r.stderr
    assert "sd35 cache prefetch" in r.stderr and "chmod g+rwX" in r.stderr
    assert "-type f -links 1" in r.stderr  # the general fix leaves hard-linked files (and their sources) alone


def test_ls_lists_models_revisions_and_sizes(planted):
    r = run_cli("cache", "ls", "--json", env={"HF_HUB_CACHE": str(planted)})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["repo_id"] == MEDIUM and rows[0]["commit"] == COMMIT
    assert rows[0]["refs"] == ["main"] and rows[0]["size_on_disk"] > 1_000_000
    table = run_cli("cache", "ls", env={"HF_HUB_CACHE": str(planted), "COLUMNS": "160"})
    assert MEDIUM in table.stdout


def test_prefetch_offline_finds_the_cached_snapshot(planted):
    r = run_cli("cache", "prefetch", "medium", env={"HF_HUB_CACHE": str(planted), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"snapshots/{COMMIT}") and COMMIT in r.stderr


def test_prefetch_offline_not_cached(tmp_path):
    r = run_cli("cache", "prefetch", "large", env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_prefetch_online_from_a_fake_hub_then_generate_offline(tmp_path, tiny_cache):
    """The real download path end to end: repo info, tree, disk check, /resolve/ downloads into the
    cache — then the offline load of what was downloaded."""
    hub_cache = tmp_path / "hub"
    repo = "org/tiny-sd35"
    with FakeHub({repo: tiny.tiny_dir(tiny_cache)}) as fake:
        r = run_cli("cache", "prefetch", repo, env={"HF_HUB_CACHE": str(hub_cache), "HF_ENDPOINT": fake.endpoint,
                                                      "HF_TOKEN": "hf_test"})
        assert r.returncode == 0, r.stderr
        downloads = [p for p, _ in fake.requests if "/resolve/" in p]
        assert all(auth == "Bearer hf_test" for _, auth in fake.requests)
    assert downloads and not any(p.endswith("README.md") for p in downloads)  # only pipeline files
    snapshot = Path(r.stdout.strip())
    assert (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert cache.verify(hub_cache) == []
    g = run_cli("generate", "--model", repo, "--steps", "1", "--seed", "0", "--out", str(tmp_path / "o"),
                env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert g.returncode == 0, g.stderr
    meta = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert meta["model"]["commit"] == COMMIT and meta["model"]["kind"] == "hub"
