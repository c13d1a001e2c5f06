"""Where models can come from: the bundled demo pair and the local Hugging Face cache (no Qt)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.config import DEMO_DRAFT, DEMO_TARGET

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_on_disk: int
    path: str


def demo_pair_present() -> bool:
    return (Path(DEMO_TARGET) / "config.json").is_file() and (Path(DEMO_DRAFT) / "config.json").is_file()


def is_demo(name: str | None) -> bool:
    if not name:
        return False
    try:
        return Path(name).expanduser().resolve() in (Path(DEMO_TARGET).resolve(), Path(DEMO_DRAFT).resolve())
    except OSError:
        return False


def cached_models(cache_dir: str | Path | None = None) -> tuple[list[CachedModel], str | None]:
    """Models in the local Hugging Face cache, largest first, and a note if the cache could not be read.

    A missing or empty cache is normal (first run, offline PC) and gives an empty list.
    """
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return [], "huggingface_hub is not installed"
    try:
        info = scan_cache_dir(cache_dir)
    except Exception as exc:  # CacheNotFound on a fresh PC, or an unreadable folder
        if type(exc).__name__ == "CacheNotFound":
            return [], None
        logger.warning("could not scan the Hugging Face cache: %s", exc)
        return [], f"could not read the Hugging Face cache: {exc}"
    models = [CachedModel(repo.repo_id, repo.size_on_disk, str(repo.repo_path))
              for repo in info.repos if repo.repo_type == "model"]
    return sorted(models, key=lambda m: -m.size_on_disk), None
