"""Plain-text formatting of stats for labels (no Qt)."""

from __future__ import annotations

FINISH_WORDS = {"length": "hit max tokens", "stop": "stop string", "eos": "end of text", "cancelled": "stopped",
                "error": "error"}


def format_stats(stats: dict, finish_reason: str | None = None, speculative: bool = True) -> str:
    parts = [f"{stats.get('num_generated_tokens', 0)} tokens"]
    ttft = stats.get("ttft_s")
    parts.append(f"first token {ttft * 1000:.0f} ms" if ttft is not None else "first token –")
    parts.append(f"{stats.get('tokens_per_second', 0.0):.1f} tok/s")
    if speculative and "num_drafts" in stats and stats["num_drafts"] is None:  # a remote that sends no spec stats
        parts.append("acceptance not reported by this server")
    elif speculative and stats.get("num_drafts", 0):
        parts.append(f"acceptance {stats.get('acceptance_rate', 0.0) * 100:.0f}%")
        parts.append(f"mean acceptance length {stats.get('mean_acceptance_length', 0.0):.2f}")
    elif speculative:
        parts.append("acceptance – (no drafts)")
    if finish_reason:
        parts.append(FINISH_WORDS.get(finish_reason, finish_reason))
    return "  ·  ".join(parts)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def short_model_name(name: str | None) -> str:
    if not name:
        return "none"
    name = name.replace("\\", "/").rstrip("/")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # hub id
    return name.rsplit("/", 1)[-1]
