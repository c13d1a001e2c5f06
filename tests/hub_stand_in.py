"""A stand-in Hugging Face hub on loopback: serves local model folders in the hub's URL layout.

Enough of the API for ``HfApi.list_models`` / ``model_info`` and ``hf_hub_download``: ``/api/models``,
``/api/models/{id}[/revision/{rev}]`` and ``/{id}/resolve/{rev}/{file}`` with HEAD, ETag / X-Linked-Etag,
X-Repo-Commit and byte ranges. ``*.safetensors`` files are served as LFS files (sha256 etag), the
rest as plain git files. ``slow_bytes_per_s`` throttles file bodies so a test can cancel mid-file;
``drop_once_at`` breaks the connection off mid-file once.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

CHUNK = 64 * 1024


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _num_parameters(path: Path) -> int:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


class Repo:
    def __init__(self, repo_id: str, folder: Path, licence: str = "apache-2.0", pipeline: str = "text-generation"):
        self.repo_id, self.folder, self.licence, self.pipeline = repo_id, Path(folder), licence, pipeline
        self.sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.files = {p.name: p.read_bytes() for p in sorted(self.folder.iterdir()) if p.is_file()}
        self.config = json.loads(self.files["config.json"])
        self.params = sum(_num_parameters(self.folder / n) for n in self.files if n.endswith(".safetensors"))

    def is_lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else _git_blob_id(data)

    def summary(self) -> dict:
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.sha, "downloads": 1234, "likes": 5,
                "gated": False, "private": False, "pipeline_tag": self.pipeline, "library_name": "transformers",
                "tags": ["transformers", "safetensors", "llama", "text-generation", f"license:{self.licence}"],
                "config": {"architectures": self.config.get("architectures"), "model_type": self.config["model_type"]},
                "cardData": {"license": self.licence}, "safetensors": {"parameters": {"F16": self.params},
                                                                       "total": self.params}}

    def info(self, blobs: bool) -> dict:
        siblings = []
        for name, data in self.files.items():
            entry = {"rfilename": name}
            if blobs:
                entry.update(size=len(data), blobId=_git_blob_id(data))
                if self.is_lfs(name):
                    entry["lfs"] = {"sha256": self.etag(name), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        return {**self.summary(), "siblings": siblings, "lastModified": "2026-11-30T00:00:00.000Z"}


class StandInHub:
    """``with StandInHub({"helix/demo-target": folder}) as hub:`` then ``HF_ENDPOINT=hub.url``."""

    def __init__(self, repos: dict[str, Path], slow_bytes_per_s: float | None = None, drop_once_at: int | None = None):
        self.repos = {rid: folder if isinstance(folder, Repo) else Repo(rid, folder) for rid, folder in repos.items()}
        self.slow_bytes_per_s = slow_bytes_per_s
        self.drop_once_at = drop_once_at  # the first full GET of an LFS file breaks off after this many bytes
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="stand-in-hub",
                                        daemon=True)

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- routing
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.requests.append((h.command, path, h.headers.get("Range")))
        if path == "/api/models":
            term = (query.get("search") or [""])[0].lower()
            tag = (query.get("pipeline_tag") or [None])[0]
            found = [r.summary() for r in self.repos.values()
                     if term in r.repo_id.lower() and tag in (None, r.pipeline)]
            return self._json(h, found[: int((query.get("limit") or ["1000"])[0])])
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._not_found(h, "RepoNotFound", f"Repository {m.group(1)} not found")
            return self._json(h, repo.info(blobs=(query.get("blobs") or ["false"])[0].lower() == "true"))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and m.group(1) in self.repos and m.group(3) in self.repos[m.group(1)].files:
            return self._file(h, self.repos[m.group(1)], m.group(3), head)
        if m and m.group(1) not in self.repos:
            return self._not_found(h, "RepoNotFound", "Repository not found")
        return self._not_found(h, "EntryNotFound", "Entry not found")

    def _json(self, h: BaseHTTPRequestHandler, body) -> None:
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _not_found(self, h: BaseHTTPRequestHandler, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(404)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _file(self, h: BaseHTTPRequestHandler, repo: Repo, name: str, head: bool) -> None:
        data = repo.files[name]
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if rng:
            start = int(rng.group(1))
        body = data[start:]
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("ETag", f'"{repo.etag(name)}"')
        if repo.is_lfs(name):
            h.send_header("X-Linked-Etag", f'"{repo.etag(name)}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        if self.drop_once_at is not None and repo.is_lfs(name) and not rng:
            cut, self.drop_once_at = self.drop_once_at, None
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True  # the network goes away mid-file
            h.connection.shutdown(2)
            return
        try:
            for i in range(0, len(body), CHUNK):
                h.wfile.write(body[i:i + CHUNK])
                if self.slow_bytes_per_s and repo.is_lfs(name):
                    time.sleep(CHUNK / self.slow_bytes_per_s)
        except (BrokenPipeError, ConnectionResetError):  # the client cancelled mid-file
            pass


def point_hub_at(server: StandInHub, cache: Path, monkeypatch) -> None:
    """Send engine.hub (and huggingface_hub) to ``server`` with an empty cache at ``cache``, online."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # tests run offline by default (conftest); this hub is local
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
