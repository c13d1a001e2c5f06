"""Copy data: passages the model cannot know from memory, told twice, so that copying from the context is
the only way to lower the loss on the second telling (issue 16: n-gram prompt lookup pays only when the
target repeats text of its prompt).

A passage is 2-8 sentences drawn from *different* stories and books (recombined, so no train document holds
it), sometimes with a span of shuffled or random words, sometimes all random words. It is then told again,
from its start or from a random sentence onward, in one of these forms:

- plain text: passage, a separator (newlines, a space, a few unrelated sentences), the repeat;
- chat: "Repeat this text: ..." (the request before or after the passage) -> the passage, or from a
  sentence onward; or a two-turn "tell me a story" -> passage -> "Tell that story again." -> passage.

Only the repeat is a training target (in chat, the last reply): the first telling is recombined text that
no model predicts, and learning it would teach incoherent stories. In plain text the separator and the
repeat's first two words are not targets either: nothing in a story says a repeat will come, and a model
trained to predict one starts repeating its own stories ("* * *", then the opening again: seen in the first
fine-tune); it learns to carry on a repeat once its first words are there, which is what prompt lookup needs.
"""

from __future__ import annotations

import random

from .chat_format import encode_conversations
from .config import EOS_ID
from .corpus import sentences
from .instruct import AGAIN
from .tokenizer import encode_texts

TELL = ["Tell me a story.", "Write a short story.", "Write something for me.", "Tell me anything you like."]
REPEAT_TEXT = ["Repeat this text:", "Say this back to me:", "Copy this exactly:", "Please repeat the passage.",
               "Repeat the following text word for word.", "Write this text again."]
REPEAT_FROM = ["Repeat the text from this sentence on: {s}", "Copy the passage, starting at: {s}",
               "Say the rest again, beginning with: {s}"]
REPEAT_CUE_WORDS = 2  # plain text: the repeat's first words are not targets, only its continuation
SEPARATORS = ["\n\n", "\n\n", "\n", " ", "\n\n\n", "\n\n* * *\n\n"]


class SentencePool:
    """Sentences of 3-60 words, each with the document it came from, and the words they use."""

    def __init__(self, docs: list[str]):
        self.items: list[tuple[int, str]] = []
        for d, doc in enumerate(docs):
            for para in doc.split("\n"):
                for s in sentences(para):
                    if 3 <= len(s.split()) <= 60:
                        self.items.append((d, s))
        self.n_docs = len({d for d, _ in self.items})
        self.words = sorted({w for _, s in self.items[:200000] for w in s.split()})
        if len(self.items) < 8:
            raise ValueError("too few sentences for copy data")

    def passage(self, rng: random.Random) -> tuple[list[str], bool]:
        """2-8 sentences of different documents; returns (sentences, whether some words are random)."""
        picked, seen, k = [], set(), rng.randint(2, 8)
        while len(picked) < k:
            d, s = self.items[rng.randrange(len(self.items))]
            if d not in seen or len(seen) >= self.n_docs:  # a document again only once all were used
                seen.add(d)
                picked.append(s)
        noisy = rng.random() < 0.3
        if noisy:
            r = rng.random()
            if r < 0.3:  # all random words: nothing but the context predicts them
                picked = [self.random_words(rng, rng.randint(4, 14)) for _ in picked]
            else:  # one span shuffled, or random words
                i = rng.randrange(len(picked))
                w = picked[i].split()
                rng.shuffle(w)
                picked[i] = " ".join(w) if r < 0.65 else self.random_words(rng, len(w))
        return picked, noisy

    def random_words(self, rng: random.Random, n: int) -> str:
        return " ".join(rng.choice(self.words) for _ in range(n)) + "."


def _plain(pool: SentencePool, rng: random.Random) -> list[tuple[str, bool]]:
    """Text pieces (text, is a training target) of one plain-text copy document."""
    sents, _ = pool.passage(rng)
    joiner = "\n" if rng.random() < 0.15 else " "
    start = 0 if rng.random() < 0.6 else rng.randrange(len(sents))
    sep = rng.choice(SEPARATORS)
    if rng.random() < 0.15:  # unrelated text between the tellings
        sep += " ".join(s for _, s in (pool.items[rng.randrange(len(pool.items))] for _ in range(rng.randint(1, 3))))
        sep += rng.choice(SEPARATORS)
    words = joiner.join(sents[start:]).split(" ")
    head = " ".join(words[:REPEAT_CUE_WORDS])
    rest = words[REPEAT_CUE_WORDS:]
    return [(joiner.join(sents), False), (sep + head, False)] + ([(" " + " ".join(rest), True)] if rest else [])


def copy_conversation(pool: SentencePool, rng: random.Random) -> list[dict]:
    """A chat whose last reply repeats a passage of the conversation (all of it, or from a sentence on)."""
    sents, _ = pool.passage(rng)
    text = " ".join(sents)
    r = rng.random()
    if r < 0.3:  # two turns: the model's own (unpredictable) story, then "again"
        return [{"role": "user", "content": rng.choice(TELL)}, {"role": "assistant", "content": text},
                {"role": "user", "content": rng.choice(AGAIN)}, {"role": "assistant", "content": text}]
    if r < 0.5 and len(sents) > 1:
        i = rng.randrange(1, len(sents))
        ask = rng.choice(REPEAT_FROM).format(s=sents[i])
        reply = " ".join(sents[i:])
    else:
        ask, reply = rng.choice(REPEAT_TEXT), text
    user = f"{ask}\n\n{text}" if rng.random() < 0.5 else f"{text}\n\n{ask}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _last_reply_only(mask: list[int]) -> list[int]:
    """Clear the mask before the last reply (earlier replies are recombined text nothing predicts)."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:  # the newline after the last <|end|>
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [0] * start + mask[start:]


def copy_sequences(hf_tok, docs: list[str], n: int, seed: int, chat_frac: float = 0.4):
    """n copy documents as (ids, mask) sequences, each starting with <|endoftext|> (for ``masked_stream``)."""
    rng = random.Random(seed)
    pool = SentencePool(docs)
    n_chat = int(n * chat_frac)
    out = [(ids, _last_reply_only(m)) for ids, m in
           encode_conversations(hf_tok, [copy_conversation(pool, rng) for _ in range(n_chat)])]
    plain = [_plain(pool, rng) for _ in range(n - n_chat)]
    enc = iter(encode_texts(hf_tok, [t for pieces in plain for t, _ in pieces]))
    for pieces in plain:
        ids, mask = [EOS_ID], [0]
        for _, target in pieces:
            p = next(enc)
            ids += p
            mask += [int(target)] * len(p)
        out.append((ids + [EOS_ID], mask + [0]))  # what follows a repeat is anyone's guess
    rng.shuffle(out)
    return out


def told_twice(hf_tok, docs: list[str], n: int, seed: int, max_tokens: int):
    """Held-out measurement set: n passages of natural sentences recombined across ``docs``, then "\\n\\n" and
    the same passage. Returns (ids, mask of the first telling, mask of the second) per passage."""
    rng = random.Random(seed)
    pool = SentencePool(docs)
    out = []
    for _ in range(20 * n):
        if len(out) >= n:
            break
        sents, noisy = pool.passage(rng)
        if noisy:
            continue
        while True:  # drop sentences until both tellings fit in max_tokens (at least two sentences)
            a, b = encode_texts(hf_tok, [" ".join(sents), "\n\n" + " ".join(sents)])
            if 1 + len(a) + len(b) <= max_tokens + 1 or len(sents) <= 2:
                break
            sents = sents[:-1]
        if 1 + len(a) + len(b) > max_tokens + 1:
            continue
        # the separator's own tokens (before the passage starts again) count in neither telling
        n_sep = len(b) - len(a) if b[len(b) - len(a):] == a else 0
        ids = [EOS_ID] + a + b
        m1 = [0] + [1] * len(a) + [0] * len(b)
        m2 = [0] * (1 + len(a) + n_sep) + [1] * (len(b) - n_sep)
        out.append((ids, m1, m2))
    return out
