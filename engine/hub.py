"""The Hugging Face hub without Qt: search, model details, drafts that share a tokenizer, and downloads into
the local cache with progress, cancel, resume (``blobs/<etag>.partial`` and an HTTP Range request) and a
disk-space check. ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` are read at call time, so tests can point them anywhere.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HelixError

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# the files a causal LM needs: config, tokenizer, weights; never ONNX/GGUF/TF/Flax copies or sub-folders
WANTED = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
SPACE_MARGIN = 1.05  # plus 5%: the filesystem's own overhead, and a partial file may be rewritten

Progress = Callable[[int, int, str], None]  # bytes done, bytes total, file name


class HubError(HelixError):
    """The hub could not be reached or refused; the message says what to do."""


class DownloadCancelled(HubError):
    pass


class NotEnoughSpace(HubError):
    pass


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    blob_id: str | None = None  # git object id
    etag: str | None = None  # the cache's blob name: the LFS sha256 for large files, else the git id


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    architecture: str = ""
    licence: str = ""
    num_parameters: int | None = None
    downloads: int = 0
    gated: bool = False
    files: tuple[HubFile, ...] = field(default=(), compare=False)  # only from details()
    revision: str | None = None

    @property
    def size_bytes(self) -> int | None:
        """What a download fetches: exact once files are known, else estimated from the parameter count (bf16)."""
        if self.files:
            return sum(f.size for f in self.files)
        return self.num_parameters * 2 if self.num_parameters else None

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """The git blob id of the tokenizer file: two models with the same id have byte-identical tokenizers."""
        by_name = {f.name: f for f in self.files}
        for name in TOKENIZER_FILES:
            if name in by_name and by_name[name].blob_id:
                return f"{name}:{by_name[name].blob_id}"
        return None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def cache_dir() -> Path:
    """The hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def is_offline() -> bool:
    """The user (or the environment) asked for no network: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE."""
    return any(os.environ.get(k, "0").strip().lower() not in ("0", "", "false", "no")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable(timeout: float = 4.0) -> str | None:
    """Why the hub cannot be used right now (offline mode, no connection), or None when it answers."""
    if is_offline():
        return "offline mode is on (HF_HUB_OFFLINE)"
    from huggingface_hub.utils import get_session

    try:
        r = get_session().get(f"{endpoint()}/api/models", params={"limit": 1}, timeout=timeout)
    except Exception as exc:  # no network, DNS failure, proxy refusing
        return f"could not reach {endpoint()} ({type(exc).__name__})"
    return None if r.status_code < 500 else f"{endpoint()} answered HTTP {r.status_code}"


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def _model(info, files: Iterable | None = None) -> HubModel:
    config = info.config or {}
    archs = config.get("architectures") or []
    card = info.card_data
    licence = (card.get("license") if card is not None else None) or next(
        (t.removeprefix("license:") for t in info.tags or () if t.startswith("license:")), "")
    safetensors = getattr(info, "safetensors", None)
    params = getattr(safetensors, "total", None) if safetensors is not None else None
    return HubModel(
        repo_id=info.id, architecture=archs[0] if archs else config.get("model_type", ""),
        licence=licence if isinstance(licence, str) else ", ".join(licence), num_parameters=params,
        downloads=info.downloads or 0, gated=bool(info.gated),
        files=tuple(HubFile(s.rfilename, s.size or 0, s.blob_id, s.lfs.sha256 if s.lfs else s.blob_id)
                    for s in files or ()), revision=info.sha)


def _hub_call(what: str, fn):
    if is_offline():
        raise HubError(f"offline mode is on (HF_HUB_OFFLINE), so {what} is not possible; "
                       "use a model from your local cache or a local folder")
    try:
        return fn()
    except HubError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        if "NotFound" in name:
            raise HubError(f"{what}: no such model on {endpoint()}; check the id (e.g. Qwen/Qwen2.5-0.5B-Instruct)") from exc
        if "Gated" in name or "401" in str(exc) or "403" in str(exc):
            raise HubError(f"{what}: the model is gated; accept its licence on its hub page and log in with "
                           "`hf auth login`") from exc
        raise HubError(f"{what}: could not reach {endpoint()} ({name}: {exc}); check your connection") from exc


def search(query: str, limit: int = 20) -> list[HubModel]:
    """Text-generation models matching ``query``, most downloaded first (size estimated from parameters), and the
    text-and-image models whose text side Helix runs (Gemma 3 from 4B on, tagged image-text-to-text on the hub:
    ``causal_text_and_image``)."""
    expand = ["config", "cardData", "downloads", "gated", "safetensors", "tags"]

    def run():
        found: dict[str, tuple[int, HubModel]] = {}
        for tag in ("text-generation", "image-text-to-text"):
            for m in _api().list_models(search=query.strip() or None, pipeline_tag=tag, sort="downloads",
                                        limit=limit, expand=expand):
                if tag == "text-generation" or causal_text_and_image(m.config or {}):
                    found.setdefault(m.id, (len(found), _model(m)))
        ranked = sorted(found.values(), key=lambda pair: (-pair[1].downloads, pair[0]))
        return [model for _, model in ranked[:limit]]

    return _hub_call(f"searching the hub for '{query}'", run)


def causal_text_and_image(config: dict) -> bool:
    """Whether a text-and-image model's config is one transformers' AutoModelForCausalLM loads (its text side:
    Gemma 3's Gemma3ForConditionalGeneration), as the loader then takes it (``engine.loader``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    return cls is not None and cls in (config.get("architectures") or [cls])


def details(repo_id: str, revision: str | None = None) -> HubModel:
    """One model with the files a download would fetch (exact sizes and blob ids)."""
    def run():
        info = _api().model_info(repo_id, revision=revision, files_metadata=True)
        return _model(info, select_files(info.siblings or ()))

    return _hub_call(f"reading '{repo_id}'", run)


def select_files(siblings: Iterable) -> list:
    """Top-level config, tokenizer and weight files; ``*.bin`` weights only when there are no safetensors."""
    files = [s for s in siblings if "/" not in s.rfilename]
    chosen = [s for s in files if any(fnmatch.fnmatch(s.rfilename, p) for p in WANTED)]
    if not any(s.rfilename.endswith(".safetensors") for s in chosen):
        chosen += [s for s in files if fnmatch.fnmatch(s.rfilename, "pytorch_model*.bin")]
    return chosen


def matching_drafts(target: HubModel, candidates: Iterable[HubModel]) -> list[HubModel]:
    """Candidates smaller than ``target`` whose tokenizer file is byte-identical to its own (details() needed)."""
    mark = target.tokenizer_fingerprint
    if mark is None:
        return []
    return [c for c in candidates if c.repo_id != target.repo_id and c.tokenizer_fingerprint == mark
            and (c.size_bytes or 0) < (target.size_bytes or 0)]


# ---------------------------------------------------------------- downloading
def bytes_present(model: HubModel, root: Path | None = None) -> int:
    """Bytes of ``model``'s files already in the cache, whole or partial (a resume will not fetch them again)."""
    root = root or cache_dir()
    blobs = root / f"models--{model.repo_id.replace('/', '--')}" / "blobs"
    if not blobs.is_dir():
        return 0
    have = {p.name.removesuffix(".partial"): p.stat().st_size for p in blobs.iterdir() if p.is_file()}
    return sum(min(f.size, have.get(f.etag or "", 0)) for f in model.files)


def check_space(model: HubModel, root: Path | None = None) -> None:
    """Raise :class:`NotEnoughSpace` (with the numbers) if the cache's disk cannot hold what is left to fetch."""
    root = root or cache_dir()
    needed = max(0, (model.size_bytes or 0) - bytes_present(model, root))
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * SPACE_MARGIN > free:
        raise NotEnoughSpace(f"'{model.repo_id}' needs {needed / 1e9:.2f} GB more and {probe} has "
                             f"{free / 1e9:.2f} GB free; free some space or choose a smaller model")


def download(model: HubModel, progress: Progress | None = None, cancel: threading.Event | None = None,
             root: Path | None = None) -> Path:
    """Fetch ``model.files`` (from :func:`details`) into the cache; return the snapshot folder to load.

    Runs on a worker thread. ``cancel`` is checked on every received chunk and raises
    :class:`DownloadCancelled`; the partial file stays in the cache and the next call resumes it
    with an HTTP Range request.
    """
    if not model.files:
        raise HubError(f"'{model.repo_id}' has no model files to download (config.json, tokenizer, *.safetensors)")
    root = root or cache_dir()
    check_space(model, root)
    cancel = cancel or threading.Event()
    report = progress or (lambda done, total, name: None)
    total = model.size_bytes or 0
    done_before = 0
    snapshot: Path | None = None
    for f in model.files:
        def on_bytes(n: int, name: str = f.name, base: int = done_before) -> None:
            report(min(total, base + n), total, name)

        path = _hub_call(f"downloading {model.repo_id}/{f.name}",
                         lambda f=f, on_bytes=on_bytes: _fetch(model, f.name, root, on_bytes, cancel))
        snapshot = path.parent
        done_before += f.size
        report(min(total, done_before), total, f.name)
    refs = root / f"models--{model.repo_id.replace('/', '--')}" / "refs" / "main"
    if model.revision and not refs.exists():  # so the hub id alone loads it offline, as after `hf download`
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(model.revision)
    logger.info("downloaded %s (%d files, %d bytes) to %s", model.repo_id, len(model.files), total, snapshot)
    return snapshot


def _fetch(model: HubModel, name: str, root: Path, on_bytes: Callable[[int], None], cancel: threading.Event) -> Path:
    """One file into the cache's ``blobs/<etag>`` (resuming ``<etag>.partial``), then huggingface_hub links it
    into ``snapshots/<commit>/`` exactly as its own download would.

    huggingface_hub deletes a partial file when a transfer stops, so the resumable part is ours.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    meta = get_hf_file_metadata(hf_hub_url(model.repo_id, name, revision=model.revision, endpoint=endpoint()))
    blob = root / f"models--{model.repo_id.replace('/', '--')}" / "blobs" / meta.etag
    if not blob.exists():
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = blob.with_name(blob.name + ".partial")
        have = partial.stat().st_size if partial.exists() else 0
        headers = build_hf_headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        with get_session().stream("GET", meta.location, headers=headers, follow_redirects=True, timeout=30) as r:
            if r.status_code >= 400:
                raise HubError(f"{name}: the hub answered HTTP {r.status_code}")
            if r.status_code == 200:  # a server that ignores Range sends everything again
                have = 0
            with partial.open("ab" if have else "wb") as out:
                on_bytes(have)
                try:
                    for chunk in r.iter_bytes(64 * 1024):
                        if cancel.is_set():
                            raise DownloadCancelled(f"download of '{model.repo_id}' cancelled; start it again to "
                                                    "resume")
                        out.write(chunk)
                        have += len(chunk)
                        on_bytes(have)
                except DownloadCancelled:
                    raise
                except Exception as exc:  # the connection dropped: what arrived is kept for the next try
                    raise HubError(f"{name}: the connection dropped after {have} of {meta.size} bytes "
                                   f"({type(exc).__name__}); download again to resume") from exc
        if meta.size is not None and have != meta.size:
            raise HubError(f"{name}: got {have} of {meta.size} bytes; start the download again to resume")
        if len(meta.etag) == 64 and _sha256(partial) != meta.etag:  # LFS files are named by their sha256
            partial.unlink()
            raise HubError(f"{name}: the downloaded file is corrupt (sha256 mismatch) and was removed; download again")
        os.replace(partial, blob)
    on_bytes(meta.size or blob.stat().st_size)
    return Path(hf_hub_download(model.repo_id, name, revision=model.revision, cache_dir=root, endpoint=endpoint()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
