"""A fake Hugging Face Hub on loopback and a fake Hub cache, for testing real-model code offline.

The server answers the two API calls `sd35.hub.download` makes before downloading (repo info and the
file tree) the way huggingface.co does, including the `X-Error-Code` headers huggingface_hub turns into
GatedRepoError and friends. Behaviour is chosen by the repo name:

  org/gated       401 GatedRepo without a token, 403 GatedRepo with a token that has no access
  org/badtoken    401 "Invalid credentials in Authorization header"
  org/forbidden   403 without an error code
  org/missing     404 RepoNotFound
  org/huge        200, but its transformer weights are 1 PB (the disk check must refuse)
  org/open        200 for every API call

and it serves real repos given as `FakeHub(repos={"org/name": folder})`: repo info, the recursive tree
and `/resolve/` downloads (HEAD and GET with the headers huggingface_hub reads), so a download runs
end to end on loopback.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: object, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _resolve(self, head: bool) -> bool:
        """Serve /{org}/{name}/resolve/{rev}/{path} from a real repo folder; False if not ours."""
        from urllib.parse import unquote

        parts = unquote(self.path.split("?", 1)[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return False
        folder = self.server.repos.get(f"{parts[0]}/{parts[1]}")
        if folder is None:
            return False
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        f = folder / "/".join(parts[4:])
        if not f.is_file():
            self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return True
        data = f.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"%s"' % _sha256(data))
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(data)
        return True

    def do_HEAD(self):  # noqa: N802
        if not self._resolve(head=True):
            self.send_response(404)
            self.end_headers()

    def _serve_repo(self, repo: str, parts: list[str]) -> None:
        folder = self.server.repos[repo]
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if len(parts) >= 5 and parts[4] == "tree":
            entries = []
            for f in files:
                data = f.read_bytes()
                e = {"type": "file", "path": str(f.relative_to(folder)), "size": len(data), "oid": _sha256(data)[:40]}
                if f.suffix == ".safetensors":
                    e["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._send(200, entries)
        return self._send(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False,
                                "siblings": [{"rfilename": str(f.relative_to(folder))} for f in files]})

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self._resolve(head=False):
            return
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "models"] or len(parts) < 4:
            return self._send(404, {"error": "not found"})
        repo = f"{parts[2]}/{parts[3]}"
        auth = self.headers.get("Authorization")
        self.server.requests.append((path, auth))
        if repo in self.server.repos:
            return self._serve_repo(repo, parts)
        if repo == "org/gated":
            if not auth:
                return self._send(401, {"error": "gated"}, {"X-Error-Code": "GatedRepo",
                                                            "X-Error-Message": "Access to model org/gated is restricted."})
            return self._send(403, {"error": "gated"}, {"X-Error-Code": "GatedRepo",
                                                        "X-Error-Message": "Access to model org/gated is restricted and you are not in the authorized list."})
        if repo == "org/open":
            return self._send(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False})
        if repo == "org/badtoken":
            return self._send(401, {"error": "bad token"},
                              {"X-Error-Message": "Invalid credentials in Authorization header"})
        if repo == "org/forbidden":
            return self._send(403, {"error": "forbidden"})
        if repo == "org/huge":
            if len(parts) >= 5 and parts[4] == "tree":
                return self._send(200, [
                    {"type": "file", "path": "model_index.json", "size": 600, "oid": "a" * 40},
                    {"type": "file", "path": "transformer/diffusion_pytorch_model.safetensors", "size": 10**15,
                     "oid": "b" * 40, "lfs": {"oid": "c" * 64, "size": 10**15, "pointerSize": 134}},
                    {"type": "file", "path": "sd3.5_huge.safetensors", "size": 10**16, "oid": "d" * 40},
                ])
            return self._send(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False,
                                    "siblings": [{"rfilename": "model_index.json"}]})
        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound",
                                                                   "X-Error-Message": "Repository not found"})


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, Path] | None = None):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.requests = []
        self.server.repos = dict(repos or {})
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> list:
        return self.server.requests

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def plant_cached_model(hub_cache: Path, repo_id: str, source: Path, commit: str = COMMIT,
                       ref: str = "main") -> Path:
    """Lay `source` (a diffusers folder) out as huggingface_hub's cache does:
    models--org--name/{blobs,refs/<ref>,snapshots/<commit>/...}, snapshot files linking to blobs."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    blobs = repo_dir / "blobs"
    blobs.mkdir(exist_ok=True)
    for f in sorted(source.rglob("*")):
        if f.is_file():
            import hashlib

            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            blob = blobs / digest
            if not blob.exists():
                shutil.copyfile(f, blob)
            link = snapshot / f.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("../" * (len(f.relative_to(source).parts) + 1)) / "blobs" / digest)
    return snapshot
