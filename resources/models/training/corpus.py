"""Reading the corpus (TinyStories pieces + public-domain children's books; see its SOURCES.md) and
cutting stories into sentences and openings."""

from __future__ import annotations

import re
from pathlib import Path

from .common import log
from .config import BOOKS_FILE, EOS, TRAIN_FILES, VALID_FILE, Config


def read_docs(path: Path, max_docs: int = 0, max_chars: int = 0) -> list[str]:
    """Documents are non-empty lines (paragraphs) followed by a line holding only <|endoftext|>."""
    docs, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line == EOS:
                if cur:
                    d = "\n".join(cur)
                    docs.append(d[:max_chars] if max_chars else d)
                    cur = []
                    if max_docs and len(docs) >= max_docs:
                        break
            elif line:
                cur.append(line)
    if cur and not (max_docs and len(docs) >= max_docs):
        docs.append("\n".join(cur))
    return docs


def load_corpus(corpus: Path, cfg: Config) -> dict[str, list[str]]:
    corpus = Path(corpus)
    if not (corpus / VALID_FILE).exists():
        raise FileNotFoundError(f"corpus not found: {corpus} (expected {VALID_FILE} there)")
    ts = []
    for fn in TRAIN_FILES if cfg.use_extra else TRAIN_FILES[:1]:
        ts += read_docs(corpus / fn, cfg.max_docs, cfg.max_doc_chars)
    books = read_docs(corpus / BOOKS_FILE, cfg.max_docs, cfg.max_doc_chars) if cfg.books_weight > 0 else []
    valid = read_docs(corpus / VALID_FILE, cfg.max_docs, cfg.max_doc_chars)
    log(f"corpus {corpus}: {len(ts)} train stories, {len(books)} books, {len(valid)} held-out stories")
    return {"ts": ts, "books": books, "valid": valid}


# a sentence ends after . ! ? (or one followed by a closing quote) where the next one starts with a capital
# or a quote: '"Hi!" said Tom.' stays one sentence
_SENT_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’]))\s+(?=[\"'“‘A-Z])")


def sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph, split after . ! ? (and a closing quote), text unchanged."""
    return [s for s in _SENT_END.split(paragraph.strip()) if s]


def opening(doc: str, n_sent: int = 2, min_words: int = 8) -> str:
    """First sentence(s) of a story: n_sent sentences, or fewer once it has >= min_words words
    (n_sent=2, min_words=8 is how the held-out evaluation openings are made)."""
    out = []
    for s in sentences(doc.split("\n")[0])[:n_sent]:
        out.append(s)
        if len(" ".join(out).split()) >= min_words:
            break
    return " ".join(out)


def eval_story_indices(n_valid: int, n: int) -> list[int]:
    """n held-out stories spread evenly over tinystories_valid.txt."""
    n = min(n, n_valid)
    return [int((i + 0.5) * n_valid / n) for i in range(n)]
