"""`sd35 bench report`: the benchmarks as a static page, on the tiny model on the CPU.

LPIPS is wired through weights generated here (random AlexNet trunk and heads, in the two file layouts the
lookup accepts), so the column is filled by the real code path without downloading anything; without
weights it must say why. The page is opened in Debian's chromium through Playwright, as tests/test_page.py
does: every image loads and a 390 px phone never scrolls sideways. Every number printed on the page is
checked against report.json.
"""

from __future__ import annotations

import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

CHROMIUM = "/usr/bin/chromium"


def _trunk_and_heads(seed: int = 0) -> tuple[dict, dict]:
    """A random AlexNet trunk in torchvision's layout (`features.I.*`) and random LPIPS heads (`linK.*`)."""
    import torch

    from sd35.bench import perceptual

    torch.manual_seed(seed)
    net = perceptual._network()
    for p in net.parameters():
        p.data.normal_(0, 0.05).abs_()
    state = net.state_dict()
    trunk = {"features." + k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("net.")}
    trunk["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision's checkpoint has the classifier too
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    return trunk, heads


def _settings(tmp_path, weights=None):
    from sd35.settings import Settings

    return Settings(_env_file=None, lpips_weights=weights, hf_hub_cache=tmp_path / "hub")


def _images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_lpips_from_generated_weights_in_both_layouts(tmp_path, monkeypatch):
    import torch

    from sd35.bench import perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    trunk, heads = _trunk_and_heads()
    torch.save(trunk, tmp_path / perceptual.ALEXNET_FILE)
    torch.save(heads, tmp_path / perceptual.HEADS_FILE)  # heads beside a torchvision checkpoint
    a, b = _images()
    score, source = perceptual.scorer(_settings(tmp_path, tmp_path / perceptual.ALEXNET_FILE))
    assert score is not None, source
    assert perceptual.ALEXNET_FILE in source and perceptual.HEADS_FILE in source
    assert score(a, a) == 0.0 and score(a, b) > 0
    # The loaded trunk is the file's, not a fresh random one.
    assert torch.equal(score.model.net.slice1[0].weight, trunk["features.0.weight"])

    # A full LPIPS state dict (what lpips.LPIPS(net="alex").state_dict() saves: scaling layer and `lins.K`
    # aliases included) in the shared cache gives the same number.
    full = {f"net.slice{perceptual._SLICES[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
            for k, v in trunk.items() if k.startswith("features.")}
    full |= heads | {k.replace("lin", "lins.", 1): v for k, v in heads.items()}
    full |= {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    shared = tmp_path / "hub" / perceptual.SHARED_DIR
    shared.mkdir(parents=True)
    torch.save(full, shared / "lpips-alex.pth")
    score2, source2 = perceptual.scorer(_settings(tmp_path))
    assert source2 == str(shared / "lpips-alex.pth")
    assert score2(a, b) == pytest.approx(score(a, b), rel=1e-6)


def test_lpips_missing_says_why_and_never_guesses(tmp_path, monkeypatch):
    import torch

    from sd35.bench import perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(perceptual, "_package_heads", lambda: None)
    score, why = perceptual.scorer(_settings(tmp_path))
    assert score is None and "no AlexNet-LPIPS weights" in why and str(tmp_path / "torch") in why
    score, why = perceptual.scorer(_settings(tmp_path, tmp_path / "nope.pth"))
    assert score is None and "is not a file" in why
    trunk, _ = _trunk_and_heads()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(trunk, hub / perceptual.ALEXNET_FILE)  # the torch hub cache, but no heads anywhere
    score, why = perceptual.scorer(_settings(tmp_path))
    assert score is None and "no LPIPS heads" in why and "lpips extra" in why
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    score, why = perceptual.scorer(_settings(tmp_path, tmp_path / "other.pth"))
    assert score is None and "not an AlexNet-LPIPS state dict" in why


class _Cells(HTMLParser):
    """Every `data-path` cell of the page: [(path, text)]; every <img src>."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self._path = [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._path = a.get("data-path") or self._path
        if tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        if self._path:
            self.cells.append((self._path, data))
            self._path = None


def _at(sections: dict, path: str):
    value = sections
    for part in path.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@pytest.fixture(scope="module")
def report(tiny_cache, tmp_path_factory):
    """One `sd35 bench report` on tiny, on the CPU, LPIPS from generated weights: (folder, report.json)."""
    import torch

    from sd35.bench import perceptual

    work = tmp_path_factory.mktemp("report")
    trunk, heads = _trunk_and_heads()
    torch.save(trunk, work / perceptual.ALEXNET_FILE)
    torch.save(heads, work / perceptual.HEADS_FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SD35_", "HF_"))}
    env |= {"SD35_CACHE_DIR": str(tiny_cache), "HF_HUB_CACHE": str(work / "hub"), "HF_HOME": str(work / "hf-home"),
            "TORCH_HOME": str(work / "torch"), "SD35_DEVICE": "cpu",
            "SD35_LPIPS_WEIGHTS": str(work / perceptual.ALEXNET_FILE)}
    out = work / "out"
    r = run_cli("bench", "report", "--out", str(out), env=env, cwd=work, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~2 min of CPU; on a shared 2-core box the wall time can be 4x that
def test_report_on_tiny_has_every_section_and_says_what_is_missing(report):
    out, doc = report
    s = doc["sections"]
    assert set(s) == {"speed", "memory", "load", "serve", "quality"}
    assert doc["header"]["gpu"] == "none" and "random weights" in doc["header"]["model"]
    assert s["speed"]["compiled_note"] and s["speed"]["modes"]["bf16"]["eager"]["step_ms_max"] > 0
    assert [r["concurrent"] for r in s["serve"]["sweep"]] == [1, 2]
    q = s["quality"]
    assert q["tiny"] and q["lpips"]["available"]
    fp8w = q["columns"]["fp8-weight"]
    assert fp8w["lpips"] > 0 and 0 < fp8w["ssim"] <= 1 and fp8w["blocks"]
    fp8 = q["columns"]["fp8"]
    assert "lpips" in fp8 or "FP8 tensor cores" in fp8["missing"]  # emulated where this build can, else why not
    for name in ("step-time", "memory", "load", "service", "per-block"):
        assert (out / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_report_numbers_on_the_page_are_the_json_numbers(report):
    out, doc = report
    page = _Cells()
    page.feed((out / "index.html").read_text())
    assert len(page.cells) > 30
    for path, text in page.cells:
        assert float(text.replace(",", "")) == _at(doc["sections"], path), path
    paths = {p for p, _ in page.cells}
    assert {"quality/columns/fp8-weight/lpips", "quality/columns/fp8-weight/psnr_db", "serve/sweep/1/served_p95_s",
            "speed/modes/bf16/eager/step_ms_min", "load/modes/prequantized/rss_peak_bytes"} <= paths
    assert all(not src.startswith(("http:", "https:", "//")) for src in page.images)
    assert "<script" not in (out / "index.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_report_page_in_chromium_loads_every_image_and_fits_a_phone(report):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: make setup (dev extra, pinned in constraints.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make setup and .ci/run do it as root)")
    from test_page import CHROMIUM_ARGS

    out, _ = report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, java_script_enabled=False)
            page.goto((out / "index.html").as_uri())
            page.wait_for_load_state("load")
            images = page.locator("img")
            assert images.count() >= 8
            for i in range(images.count()):
                assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0"), \
                    images.nth(i).get_attribute("src")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()


def test_report_from_saved_json_and_refusing_other_json(tmp_path):
    speed = {"arch": "large", "size": 1024, "device": "cuda:0", "device_name": "NVIDIA H100", "note": None,
             "repeats": 3, "compile_cache_dir": "/x", "goal": {}, "versions": {"torch": "2.13.0"},
             "modes": {"bf16": {"eager": {"step_ms_median": 100.5, "step_ms_min": 99.0, "step_ms_max": 103.25,
                                          "peak_gpu_bytes": 20_000_000_000}},
                       "fp8": {"note": "not run here: x"}}}
    fidelity = {"model": "large", "device": "cuda:0", "reference": "bf16", "candidate": "fp8", "step": 14,
                "steps": 28, "seed": 0, "image": {"rel_err": 0.02, "ssim": 0.97, "psnr_db": 33.5},
                "blocks": [{"block": i, "image_rel_err": 0.01 * i, "image_cosine": 0.99, "text_rel_err": None,
                            "text_cosine": None} for i in range(3)]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    (tmp_path / "fidelity.json").write_text(json.dumps(fidelity))
    r = run_cli("bench", "report", "--out", str(tmp_path / "out"), "--from", str(tmp_path / "speed.json"),
                "--from", str(tmp_path / "fidelity.json"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "out" / "index.html").read_text()
    assert 'data-path="speed/modes/bf16/eager/step_ms_max">103.25<' in text and "NVIDIA H100" in text
    assert 'data-path="quality/columns/fp8/psnr_db">33.5<' in text and "not measured by sd35 fidelity" in text
    assert (tmp_path / "out" / "per-block.png").is_file() and "rendered from speed.json, fidelity.json" in text
    assert "not in this report: run `sd35 bench load --json" in text
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    r = run_cli("bench", "report", "--out", str(tmp_path / "o2"), "--from", str(tmp_path / "other.json"))
    assert r.returncode == 2 and "not the --json of a benchmark" in r.stderr
