"""The team's web page (GET / on `sd35 serve`) in a real headless Chromium, on the tiny model.

Playwright drives Debian's `chromium` (never `playwright install`: no browser download). Skipped with the
reason where either is missing; `make setup` / `.ci/run` install both. The page talks to a real service
over loopback: the same streaming API, auth and errors that clients get.

    UPDATE_PAGE_SCREENSHOT=1 pytest tests/test_page.py   # also rewrites docs/page.png
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import free_port
from test_service import KEY, InProcessServer, call

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UPDATE_SCREENSHOT = os.environ.get("UPDATE_PAGE_SCREENSHOT") == "1"  # read before conftest clears the env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tiny_cache):
    from sd35.settings import Settings

    settings = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(),
                        api_key=KEY, queue_size=4, max_pixels=256 * 256, max_images=4, max_steps=50,
                        request_timeout=120)
    with InProcessServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: make setup (it is in the dev extra, pinned in "
                    "constraints.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make setup and .ci/run do it as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser context (its own sessionStorage) on the page, recording console errors."""

    def __init__(self, browser, url: str, width: int = 1100, height: int = 900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.console: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console.append(m.text))
        self.page.on("pageerror", lambda exc: self.console.append(f"uncaught: {exc}"))
        self.page.goto(url + "/")

    def use_key(self, key: str) -> None:
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Use key").click()

    def js_errors(self) -> list[str]:
        """Console errors other than the browser's own note about an HTTP error status (a 401 we caused)."""
        return [m for m in self.console if "Failed to load resource" not in m]

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def page(browser, api):
    p = Page(browser, api.url)
    yield p
    p.close()


def shrink(png: bytes, path: Path) -> None:
    """A screenshot for the docs, small: 128 colours, optimised (tens of KB)."""
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128).save(path, optimize=True)


# --- the page over plain HTTP: open paths, no CDN ----------------------------------------------------------

def test_page_and_its_assets_are_open_and_everything_else_still_needs_the_key(api):
    code, headers, html = call(api.url + "/", key=None)
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]  # a CDN link could not load
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        code, headers, body = call(f"{api.url}/page/{asset}", key=None)
        assert code == 200 and headers["content-type"].startswith(kind) and body
        assert "https://" not in body
    assert call(api.url + "/page/config.json", key=None)[2] == {"auth_required": True}
    # The allow-list is exactly the page: the API, other names and other methods still need the key.
    for path in ("/v1/models", "/readyz", "/page/other.js", "/page/../readyz", "/metrics"):
        assert call(api.url + path, key=None)[0] == 401, path
    assert call(api.url + "/", method="POST", body={"prompt": "x"}, key=None)[0] == 401


def test_model_card_lists_the_size_presets_within_the_limits(api):
    code, _, model = call(api.url + "/v1/models/tiny")
    card = model["sd35"]
    assert code == 200 and card["ready"] and card["sizes"][0] == card["defaults"]["size"] == "128x128"
    assert card["max_steps"] == 50 and card["defaults"]["steps"] == 4 and card["size_multiple"] == 16
    for size in card["sizes"]:
        w, h = map(int, size.split("x"))
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 256 * 256 and max(w, h) <= card["max_side"]
    assert len(card["sizes"]) >= 5 and any(int(s.split("x")[0]) > int(s.split("x")[1]) for s in card["sizes"])


# --- in the browser -------------------------------------------------------------------------------------------

def test_a_wrong_key_shows_the_api_error(page):
    p = page.page
    assert p.get_by_label("API key").is_visible()  # this service needs a key
    page.use_key("not-the-key")
    error = p.locator("#error")
    error.wait_for(state="visible")
    _, _, expected = call(page.page.url.rstrip("/") + "/v1/models", key="not-the-key")
    assert "401" in error.inner_text() and expected["error"]["message"] in error.inner_text()
    assert p.get_by_role("button", name="Generate").is_disabled()
    assert page.js_errors() == []


def test_generation_streams_previews_then_the_final_image_and_the_snippets_reproduce_it(page, api, tmp_path):
    p = page.page
    page.use_key(KEY)
    size = p.get_by_label("Size")
    p.locator("#size option").nth(1).wait_for(state="attached")  # the presets arrived
    assert size.locator("option").first.get_attribute("value") == "128x128"
    assert "queue:" in p.locator("#queue").inner_text()
    p.get_by_label("Prompt", exact=True).fill("a lighthouse on a cliff, 'oil' painting")
    p.get_by_label("Negative prompt").fill("blurry")
    size.select_option("144x112")
    p.get_by_label("Steps").fill("4")
    p.get_by_label("Guidance").fill("3.5")
    p.get_by_label("Seed").fill("1234")
    # Record what the page shows while it works: previews must appear before the final image.
    p.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const s = document.querySelector('#live-status').textContent;
          if (window.seen[window.seen.length - 1] !== s) window.seen.push(s); })
        .observe(document.querySelector('#live'), {subtree: true, childList: true, characterData: true}); }""")
    p.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard shortcut, not the button
    entry = p.locator("#gallery .entry").first
    entry.wait_for()
    seen = p.evaluate("window.seen")
    assert any("preview" in s for s in seen) and p.locator("#partials figure").count() >= 1, seen
    first_preview = next(i for i, s in enumerate(seen) if "preview" in s)
    assert all("image" not in s for s in seen[:first_preview]), seen

    img = entry.locator("img").first
    assert p.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", img.element_handle()) == [144, 112]
    params = entry.locator(".params").inner_text()
    for text in ("a lighthouse on a cliff", "blurry", "144x112", "1234", "3.5"):
        assert text in params
    link = entry.get_by_role("link", name="Download")
    assert link.get_attribute("download") == "sd35-1234.png"
    page_png = base64.b64decode(link.get_attribute("href").split(",", 1)[1])

    # Copy as curl / Python: the clipboard holds code that, run as is, makes the same image.
    entry.get_by_role("button", name="Copy as curl").click()
    curl = p.evaluate("navigator.clipboard.readText()")
    entry.get_by_role("button", name="Copy as Python (openai)").click()
    python = p.evaluate("navigator.clipboard.readText()")
    assert KEY not in curl and KEY not in python  # the key is read from the environment, never pasted
    assert '"seed": 1234' in curl and "$SD35_API_KEY" in curl and '"seed": 1234' in python
    env = {**os.environ, "SD35_API_KEY": KEY}
    same = Image.open(io.BytesIO(page_png)).convert("RGB")
    runs = [("python", [sys.executable, "-c", python])]
    if shutil.which("curl") and shutil.which("bash"):
        runs.append(("curl", ["bash", "-c", curl]))
    for name, cmd in runs:
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        made = Image.open(out / "image-0.png")
        assert made.size == (144, 112) and list(made.convert("RGB").getdata()) == list(same.getdata()), name

    # Reuse last seed puts it back in the field; the gallery lists this result.
    p.get_by_label("Seed").fill("")
    p.get_by_role("button", name="Reuse last").click()
    assert p.get_by_label("Seed").input_value() == "1234"
    assert page.console == []

    # At phone width nothing scrolls sideways (long words wrap).
    p.set_viewport_size({"width": 390, "height": 844})
    p.get_by_label("Prompt", exact=True).fill("x" * 300)
    assert p.evaluate("document.documentElement.scrollWidth") <= 390
    assert p.evaluate("document.body.scrollWidth") <= 390
    entry.locator("summary").click()  # the code snippets wrap too
    assert p.evaluate("document.documentElement.scrollWidth") <= 390
    if UPDATE_SCREENSHOT:
        p.get_by_label("Prompt", exact=True).fill("a lighthouse on a cliff, 'oil' painting")
        shrink(p.screenshot(full_page=True), ROOT / "docs" / "page-phone.png")
    entry.locator("summary").click()
    p.set_viewport_size({"width": 1100, "height": 900})
    p.get_by_label("Prompt", exact=True).fill("a lighthouse on a cliff, 'oil' painting")
    shot = p.screenshot(full_page=True)
    assert Image.open(io.BytesIO(shot)).width == 1100
    if UPDATE_SCREENSHOT:
        shrink(shot, ROOT / "docs" / "page.png")


def test_bad_input_shows_the_api_message(page):
    p = page.page
    page.use_key(KEY)
    p.locator("#size option").nth(1).wait_for(state="attached")  # the presets arrived
    p.get_by_label("Prompt", exact=True).fill("a red cube")
    p.get_by_label("Steps").fill("60")  # the service allows 50 (SD35_MAX_STEPS)
    p.get_by_role("button", name="Generate").click()
    error = p.locator("#error")
    error.wait_for(state="visible")
    _, _, expected = call(p.url.rstrip("/") + "/v1/images/generations", "POST",
                          {"prompt": "a red cube", "steps": 60}, key=KEY)
    assert expected["error"]["message"] == "steps must be from 1 to 50 (got 60)"
    assert "400 (steps): steps must be from 1 to 50 (got 60)" in error.inner_text()
    assert p.locator("#gallery .entry").count() == 0
    assert page.js_errors() == []


def test_busy_shows_the_queue_and_retry_after(page, api, monkeypatch):
    """A full GPU queue: the service's own 429 (its message, Retry-After) counting down, and the queue state."""
    from sd35.service.worker import Busy

    p = page.page
    page.use_key(KEY)
    p.locator("#size option").nth(1).wait_for(state="attached")  # the presets arrived

    def full(*args, **kwargs):
        raise Busy(7)  # what submit raises when SD35_QUEUE_SIZE jobs already wait

    monkeypatch.setattr(api.app.state.worker, "submit", full)
    p.get_by_label("Prompt", exact=True).fill("a red cube")
    p.get_by_role("button", name="Generate").click()
    error = p.locator("#error")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert "429: the GPU queue is full (4 waiting); retry after 7 s" in text and "Retry-After: 7 s" in text
    assert "try again in" in text
    assert "queue:" in p.locator("#queue").inner_text()
    assert p.get_by_role("button", name="Generate").is_enabled()
    assert page.js_errors() == []


def test_stop_cancels_the_job_on_the_gpu(page, api):
    """Stop aborts the fetch; the service sees the client go and stops the job at its next step."""
    import time

    from playwright.sync_api import expect

    p = page.page
    page.use_key(KEY)
    p.locator("#size option").nth(1).wait_for(state="attached")
    p.get_by_label("Prompt", exact=True).fill("a long one")
    p.get_by_label("Steps").fill("50")
    p.get_by_label("Images (n)").fill("10")  # 3 batches of 50 steps: long enough to stop it midway
    p.get_by_label("Size").select_option("160x112")
    p.get_by_role("button", name="Generate").click()
    p.locator("#partials figure").first.wait_for()  # it is denoising
    p.get_by_role("button", name="Stop").click()
    expect(p.locator("#live-status")).to_contain_text("stopped")
    assert p.locator("#error").is_hidden() and p.locator("#gallery .entry").count() == 0
    deadline = time.monotonic() + 30
    while "sd35_worker_busy 1.0" in call(api.url + "/metrics")[2] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "sd35_worker_busy 0.0" in call(api.url + "/metrics")[2]
    assert page.js_errors() == []


def test_without_a_key_the_page_does_not_ask_for_one(tiny_cache):
    from fastapi.testclient import TestClient

    from sd35.service.app import create_app
    from sd35.settings import Settings

    app = create_app(Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", api_key=None))
    client = TestClient(app)  # no lifespan: the page needs no model
    assert client.get("/page/config.json").json() == {"auth_required": False}
    assert client.get("/").status_code == 200 and client.get("/page/nothing.js").status_code == 404


def test_the_page_ships_in_the_wheel():
    """pyproject's package data carries every asset the page serves (an installed service has its page)."""
    import tomllib

    from sd35.service import page

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sd35.service"]
    for name in page.ASSETS:
        assert (ROOT / "src/sd35/service/static" / name).is_file()
        assert any(Path("static", name).match(g) for g in globs), name


# --- edits and the key (issue #26) ------------------------------------------------------------------------------

def test_a_pasted_key_works_at_once(page):
    from playwright.sync_api import expect

    p = page.page
    p.get_by_label("API key").fill(KEY)  # pasted: no Enter, no "Use key"
    expect(p.get_by_role("button", name="Generate")).to_be_enabled(timeout=10_000)
    assert page.js_errors() == []


def test_edit_mode_paints_a_mask_streams_the_edit_and_keeps_the_rest(page, tmp_path):
    import numpy as np
    from playwright.sync_api import expect

    p = page.page
    p.get_by_label("API key").fill(KEY)
    expect(p.get_by_role("button", name="Generate")).to_be_enabled(timeout=10_000)
    yy, xx = np.mgrid[0:96, 0:128]
    source = Image.fromarray(np.stack([xx * 2, yy * 2, xx + yy], -1).astype(np.uint8))
    source.save(tmp_path / "in.png")
    p.get_by_label("Edit an image").check()
    p.locator("#edit-file").set_input_files(str(tmp_path / "in.png"))
    p.locator("#edit-canvas").wait_for()
    box = p.locator("#edit-mask").bounding_box()  # paint a stroke across the middle
    p.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    p.mouse.down()
    p.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=5)
    p.mouse.up()
    p.get_by_label("Strength").fill("0.8")
    p.get_by_label("Prompt", exact=True).fill("a red ball")
    p.get_by_label("Steps").fill("4")
    with p.expect_request("**/v1/images/edits") as sent:  # (multipart with blobs: playwright shows no body)
        p.get_by_role("button", name="Generate").click()
    assert sent.value.method == "POST"
    entry = p.locator("#gallery .entry").first
    entry.wait_for()
    assert p.locator("#partials figure").count() >= 1  # image_edit.partial_image previews were shown
    assert "inpaint, strength 0.8" in entry.locator(".params").inner_text()
    href = entry.get_by_role("link", name="Download").get_attribute("href")
    made = np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB"), dtype=float)
    assert made.shape == (96, 128, 3)
    for block in (np.s_[:16, :16], np.s_[-16:, -16:]):  # far from the stroke: the source, unchanged
        mse = ((made[block] - np.asarray(source, dtype=float)[block]) ** 2).mean()
        assert mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 40
    assert np.abs(made[44:52, 60:68] - np.asarray(source, dtype=float)[44:52, 60:68]).mean() > 5  # repainted
    # "Edit this" on a result loads it into the editor; at phone width nothing scrolls sideways.
    entry.get_by_role("button", name="Edit this").first.click()
    assert p.evaluate("document.getElementById('edit-image').width") == 128
    p.set_viewport_size({"width": 390, "height": 844})
    assert p.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.js_errors() == []


def test_edit_mask_paints_by_touch_and_the_eraser_takes_it_back(browser, api, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        p = context.new_page()
        p.goto(api.url + "/")
        p.get_by_label("API key").fill(KEY)
        expect(p.get_by_role("button", name="Generate")).to_be_enabled(timeout=10_000)
        Image.new("RGB", (128, 96), (40, 90, 200)).save(tmp_path / "in.png")
        p.get_by_label("Edit an image").check()
        p.locator("#edit-file").set_input_files(str(tmp_path / "in.png"))
        p.locator("#edit-canvas").wait_for()
        box = p.locator("#edit-mask").bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        p.touchscreen.tap(x, y)  # a finger paints
        assert p.evaluate("window.sd35Edit.masked()")
        p.get_by_label("Eraser").check()
        p.locator("#edit-size").fill("128")
        p.touchscreen.tap(x, y)  # and the eraser takes it back: no mask = img2img
        assert not p.evaluate("window.sd35Edit.masked()")
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
