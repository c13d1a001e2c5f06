"""The bench's held-out prompts: openings of TinyStories validation stories, shipped in prompts.txt."""

from __future__ import annotations

from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")


def load_prompts(path: str | Path | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    text = Path(path or PROMPTS_FILE).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path or PROMPTS_FILE}")
    return prompts
