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


def repeat_prompts(prompts: list[str], passage_len: int = 3) -> list[str]:
    """Issue 16's repeat set: a passage (``passage_len`` story openings), then its first sentence
    again, so the continuation repeats text from the prompt (where n-gram drafting should shine)."""
    out = []
    for i in range(0, len(prompts) - passage_len + 1, passage_len):
        passage = " ".join(prompts[i: i + passage_len])
        first = passage.split(". ")[0].rstrip(".") + "."
        out.append(f"{passage}\n\n{first}")
    return out
