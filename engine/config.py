"""Engine and sampling configuration: frozen dataclasses validated once, reused by API and UI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import InvalidRequest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS_DIR = REPO_ROOT / "resources" / "models"
DEMO_TARGET = DEMO_MODELS_DIR / "demo-target"
DEMO_DRAFT = DEMO_MODELS_DIR / "demo-draft"
DEMO_EAGLE = DEMO_MODELS_DIR / "demo-eagle"  # the demo target's EAGLE-3 head (engine.eagle)

MAX_DRAFT_TOKENS = 8
MAX_NEW_TOKENS_CAP = 4096
DRAFT_METHODS = ("auto", "model", "ngram", "eagle")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 means greedy. ``num_draft_tokens`` None means adaptive K.
    ``speculative`` False runs the plain path even when a draft model is loaded. ``draft_method``:
    the draft model, n-gram prompt lookup (no model needed), the EAGLE-3 head (when one is loaded), or
    auto (adaptive picks by measured gain).
    """

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculative: bool = True
    num_draft_tokens: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    draft_method: str = "auto"  # model | ngram | eagle | auto (the best measured gain among what is loaded)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise InvalidRequest(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest(f"temperature must be in [0, 2] (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.num_draft_tokens is not None and not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidRequest(
                f"num_draft_tokens must be in 1..{MAX_DRAFT_TOKENS} or null for adaptive, got {self.num_draft_tokens!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop must be a list of non-empty strings")
        if len(self.stop) > 16:
            raise InvalidRequest("at most 16 stop strings")
        if self.draft_method not in DRAFT_METHODS:
            raise InvalidRequest(f"draft_method must be one of {', '.join(DRAFT_METHODS)}, got {self.draft_method!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest(f"logprobs must be in 0..20, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine. ``target``/``draft`` are local folders or hub ids."""

    target: str = str(DEMO_TARGET)
    draft: str | None = str(DEMO_DRAFT)
    eagle: str | None = None  # EAGLE-3 head folder; None: default_eagle(target); "": none
    device: str = "auto"
    dtype: str | None = None  # None: automatic (engine.dtypes): the checkpoint's bf16/fp16 on GPU, float32 on CPU
    block_size: int = 16
    kv_cache_tokens: int | None = None  # None: sized from device memory
    kv_cache_memory_fraction: float = 0.3
    max_running: int = 16
    max_waiting: int = 256
    default_num_draft_tokens: int = 4
    num_threads: int | None = None  # CPU threads for torch; None: all cores but one (at least 1)
    big_step_threads: int | None = None  # CPU threads for steps over many tokens when measured faster (engine.threads);
    # None: every core; 0: never more than num_threads
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InvalidRequest("block_size must be >= 1")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise InvalidRequest("kv_cache_tokens must hold at least one block")
        if not 0 < self.kv_cache_memory_fraction <= 0.95:
            raise InvalidRequest("kv_cache_memory_fraction must be in (0, 0.95]")
        if self.max_running < 1 or self.max_waiting < 0:
            raise InvalidRequest("max_running must be >= 1 and max_waiting >= 0")
        if not 1 <= self.default_num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidRequest(f"default_num_draft_tokens must be in 1..{MAX_DRAFT_TOKENS}")


def default_eagle(target: str) -> str | None:
    """The EAGLE-3 head that comes with ``target``: an ``eagle3`` folder inside a local target folder, or the
    demo head for the demo target; None when there is none."""
    from pathlib import Path

    path = Path(target).expanduser()
    inside = path / "eagle3"
    if (inside / "config.json").is_file():
        return str(inside)
    if path.exists() and path.resolve() == DEMO_TARGET.resolve() and (DEMO_EAGLE / "config.json").is_file():
        return str(DEMO_EAGLE)
    return None
