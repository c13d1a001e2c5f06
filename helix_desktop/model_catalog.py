"""Where models can come from: the bundled demo pair, the local Hugging Face cache and a curated list of
known-good pairs with their expected memory (no Qt)."""

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
    snapshot: str | None = None  # the newest snapshot folder: loadable offline as a local folder


@dataclass(frozen=True)
class CuratedPair:
    """A target and a draft known to share a tokenizer. Parameter counts in billions from the model cards."""

    target: str
    draft: str
    target_b: float
    draft_b: float
    note: str = ""

    def memory_gb(self, bytes_per_param: int) -> float:
        """Weights of both models plus ~15% for the KV cache and activations at a few thousand tokens."""
        return (self.target_b + self.draft_b) * bytes_per_param * 1.15

    @property
    def label(self) -> str:
        return (f"{self.target} + {self.draft.split('/')[-1]}\n≈{self.memory_gb(2):.1f} GB on a GPU (bf16/fp16), "
                f"≈{self.memory_gb(4):.1f} GB on the CPU (float32)" + (f"; {self.note}" if self.note else ""))


CURATED_PAIRS = (
    CuratedPair("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", 1.54, 0.49),
    CuratedPair("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", 3.09, 0.49),
    CuratedPair("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", 7.62, 0.49),
    CuratedPair("meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", 3.21, 1.24,
                "gated: accept the licence on the hub and log in first"),
    CuratedPair("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", 8.03, 1.24,
                "gated: accept the licence on the hub and log in first"),
    CuratedPair("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "JackFram/llama-68m", 1.10, 0.068,
                "the draft shares Llama 2's 32k tokenizer"),
)


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
    """Models in the local Hugging Face cache (``engine.hub.cache_dir()`` unless given), largest first, and a
    note if the cache could not be read. A missing or empty cache is normal (first run, offline PC): an empty list.
    """
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return [], "huggingface_hub is not installed"
    if cache_dir is None:
        from engine.hub import cache_dir as hub_cache_dir

        cache_dir = hub_cache_dir()
    try:
        info = scan_cache_dir(cache_dir)
    except Exception as exc:  # CacheNotFound on a fresh PC, or an unreadable folder
        if type(exc).__name__ == "CacheNotFound":
            return [], None
        logger.warning("could not scan the Hugging Face cache: %s", exc)
        return [], f"could not read the Hugging Face cache: {exc}"
    models = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified, default=None)
        models.append(CachedModel(repo.repo_id, repo.size_on_disk, str(repo.repo_path),
                                  str(newest.snapshot_path) if newest is not None else None))
    return sorted(models, key=lambda m: -m.size_on_disk), None
