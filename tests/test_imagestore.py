"""`response_format: url` on several replicas: the shared-directory store (SD35_IMAGE_STORE_DIR) — its files,
expiry, size cap and ids — and two service replicas sharing one directory, each answering the other's links."""

from __future__ import annotations

import base64
import io
import os
import stat
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from test_service import KEY, InProcessServer, call, free_port

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


def store(tmp_path, ttl=600.0, max_bytes=1 << 20, name="images"):
    from sd35.service.imagestore import DirImageStore

    return DirImageStore(tmp_path / name, ttl, max_bytes)


def test_dir_store_files_are_private_atomic_and_shared(tmp_path):
    a, b = store(tmp_path), store(tmp_path)  # two replicas, one directory
    ids = [(a if i % 2 else b).put(PNG + bytes([i]), "image/png") for i in range(6)]
    assert stat.S_IMODE((tmp_path / "images").stat().st_mode) == 0o700
    names = sorted(os.listdir(tmp_path / "images"))
    assert names == sorted(i + ".png" for i in ids)  # no temporary file left behind
    for name in names:
        assert stat.S_IMODE((tmp_path / "images" / name).stat().st_mode) == 0o600
    for i, image_id in enumerate(ids):
        for s in (a, b):
            got = s.get(image_id)
            assert got.data == PNG + bytes([i]) and got.media_type == "image/png"
    jpeg = a.put(b"\xff\xd8jpeg", "image/jpeg")
    assert b.get(jpeg).media_type == "image/jpeg"


def test_dir_store_refuses_tampered_and_foreign_ids(tmp_path):
    s = store(tmp_path)
    image_id = s.put(PNG, "image/png")
    prefix, expiry, rand = image_id.split("_", 2)
    later = f"{prefix}_{int(expiry, 16) + 3600:x}_{rand}"  # a longer life written into the id
    flipped = image_id[:-1] + ("A" if image_id[-1] != "A" else "B")
    (tmp_path / "secret.png").write_bytes(b"not an image of the store")
    for bad in (later, flipped, "img_" + rand, "../secret", f"img_{expiry}_../../secret", "", image_id + ".png"):
        assert s.get(bad) is None, bad
    assert s.get(image_id).data == PNG


def test_dir_store_expires_and_cleans_up(tmp_path, monkeypatch):
    s = store(tmp_path, ttl=60)
    old = s.put(PNG, "image/png")
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    assert s.get(old) is None and not (tmp_path / "images" / (old + ".png")).exists()  # removed on read
    kept = s.put(PNG, "image/png")
    gone = s.put(PNG, "image/png")
    monkeypatch.setattr(time, "time", lambda: now + 200)
    (tmp_path / "images" / ".tmp-crashed").write_bytes(b"half")
    os.utime(tmp_path / "images" / ".tmp-crashed", (now - 3600, now - 3600))
    fresh = s.put(PNG, "image/png")  # every put removes what expired (and what a crashed writer left)
    assert sorted(os.listdir(tmp_path / "images")) == [fresh + ".png"]
    assert s.get(kept) is None and s.get(gone) is None and s.get(fresh).data == PNG


def test_dir_store_keeps_at_most_max_bytes_oldest_first(tmp_path):
    s = store(tmp_path, max_bytes=1000)
    ids = []
    for i in range(5):
        ids.append(s.put(bytes([i]) * 400, "image/png"))
        time.sleep(0.01)  # distinct mtimes
    assert [s.get(i) is not None for i in ids] == [False, False, False, True, True]
    from sd35.service.imagestore import DoesNotFit

    with pytest.raises(DoesNotFit):  # larger than the whole store: refused, and nothing else is evicted for it
        s.put(b"z" * 5000, "image/png")
    assert [s.get(i) is not None for i in ids] == [False, False, False, True, True]


def test_dir_store_refuses_a_directory_it_cannot_write(tmp_path):
    from sd35.errors import Sd35Error

    (tmp_path / "file").write_text("x")
    with pytest.raises(Sd35Error, match="SD35_IMAGE_STORE_DIR=.* cannot be written"):
        store(tmp_path / "file", name="sub")


def test_make_store_follows_the_setting(tmp_path):
    from sd35.service.imagestore import DirImageStore, ImageStore, make_store
    from sd35.settings import Settings

    assert isinstance(make_store(Settings(_env_file=None)), ImageStore)
    s = make_store(Settings(_env_file=None, image_store_dir=tmp_path / "i", image_url_ttl=5, image_store_bytes=4096))
    assert isinstance(s, DirImageStore) and (s.ttl, s.max_bytes) == (5, 4096)


# --- two replicas, one directory ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replicas(tiny_cache, tmp_path_factory):
    from sd35.settings import Settings

    shared = tmp_path_factory.mktemp("shared") / "images"
    servers = []
    for _ in range(2):
        s = Settings(_env_file=None, model="tiny", cache_dir=tiny_cache, device="cpu", port=free_port(), api_key=KEY,
                     queue_size=8, max_pixels=128 * 128, request_timeout=120, image_store_dir=shared)
        servers.append(InProcessServer(s).__enter__())
    yield servers, shared
    for srv in servers:
        srv.__exit__(None, None, None)


def _get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_url_links_answer_on_every_replica(replicas):
    """20 url responses from two replicas; every link answers 200 with the same image on both replicas, and
    that image is the one the request makes (the same seed as b64_json); tampered ids get 404."""
    (a, b), shared = replicas

    def make(seed):
        srv = (a, b)[seed % 2]
        code, _, payload = call(srv.url + "/v1/images/generations", "POST",
                                {"prompt": "a red cube", "size": "64x64", "steps": 1, "seed": seed,
                                 "response_format": "url"}, timeout=120)
        assert code == 200, payload
        return payload["data"][0]["url"]

    with ThreadPoolExecutor(4) as pool:
        urls = list(pool.map(make, range(20)))
    assert len(set(urls)) == 20 and len(os.listdir(shared)) == 20
    for seed, url in enumerate(urls):
        path = url[url.index("/v1/images/"):]
        bodies = []
        for srv in (a, b):
            code, body = _get(srv.url + path)
            assert code == 200, (seed, srv.url, body[:200])
            bodies.append(body)
        assert bodies[0] == bodies[1]
        assert Image.open(io.BytesIO(bodies[0])).size == (64, 64)
    for seed in (0, 1):  # right bytes: the same pixels as the same request answered inline, by the other replica
        code, _, payload = call((b, a)[seed % 2].url + "/v1/images/generations", "POST",
                                {"prompt": "a red cube", "size": "64x64", "steps": 1, "seed": seed}, timeout=120)
        inline = Image.open(io.BytesIO(base64.b64decode(payload["data"][0]["b64_json"])))
        linked = Image.open(io.BytesIO(_get(a.url + urls[seed][urls[seed].index("/v1/images/"):])[1]))
        assert list(inline.getdata()) == list(linked.getdata())
    image_id = urls[0].rsplit("/", 1)[1]
    _, expiry, rand = image_id.split("_", 2)
    for bad in (f"img_{int(expiry, 16) + 3600:x}_{rand}", image_id[:-2] + "zz", "img_..%2F..%2Fetc"):
        for srv in (a, b):
            code, body = _get(f"{srv.url}/v1/images/{bad}")
            assert code == 404, (bad, code, body[:200])


def test_expired_links_get_404_on_every_replica(replicas, monkeypatch):
    (a, b), shared = replicas
    code, _, payload = call(a.url + "/v1/images/generations", "POST",
                            {"prompt": "x", "size": "64x64", "steps": 1, "response_format": "url"}, timeout=120)
    path = payload["data"][0]["url"]
    path = path[path.index("/v1/images/"):]
    assert _get(b.url + path)[0] == 200
    later = time.time() + a.app.state.settings.image_url_ttl + 1
    monkeypatch.setattr(time, "time", lambda: later)  # both replicas live in this process: one clock
    for srv in (b, a):
        code, body = _get(srv.url + path)
        assert code == 404 and b"expired" in body
    assert not any(path.rsplit("/", 1)[1] in name for name in os.listdir(shared))


def test_serve_ray_default_store_is_a_private_folder(tmp_path, monkeypatch):
    """`make serve-ray` without SD35_IMAGE_STORE_DIR: /tmp/sd35-images-<uid>, 0700, refused when another
    account could have made or opened it."""
    import tempfile

    from sd35.errors import Sd35Error

    ray_app = pytest.importorskip("sd35.service.ray_app", reason="ray is not installed")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    path = ray_app.local_image_dir()
    assert path == tmp_path / f"sd35-images-{os.getuid()}" and stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o777)
    with pytest.raises(Sd35Error, match="others can open it"):
        ray_app.local_image_dir()
    path.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Sd35Error, match="not a directory of yours"):
        ray_app.local_image_dir()
