"""Conversations to token ids in the chat template's format, with the loss mask (assistant replies only).

Format (tokenizer.CHAT_TEMPLATE)::

    <|endoftext|><|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{reply}<|end|>\\n

A reply ends with <|end|>, which generation_config lists as an eos id, so generation stops there.
"""

from __future__ import annotations

from .config import END_ID, EOS_ID, ROLE_IDS
from .tokenizer import encode_texts


def check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m["role"] not in ROLE_IDS:
            raise ValueError(f"roles must be system, user or assistant, got {m['role']!r}")
        if m["role"] == "system" and i:
            raise ValueError("only the first message may be a system message")


def encode_conversations(hf_tok, conversations: list[list[dict]], add_generation_prompt: bool = False):
    """[(ids, mask)] per conversation; mask[i] = 1 where token i is part of an assistant reply (its text and
    its closing <|end|>), the tokens a chat model is trained to write. With ``add_generation_prompt`` the
    ids end with the <|assistant|> header, ready for the model to reply."""
    for conv in conversations:
        check_messages(conv)
    bodies = encode_texts(hf_tok, [m["content"].strip() for conv in conversations for m in conv])
    (newline,) = encode_texts(hf_tok, ["\n"])
    out, k = [], 0
    for conv in conversations:
        ids, mask = [EOS_ID], [0]
        for m in conv:
            body = bodies[k]
            k += 1
            ids += [ROLE_IDS[m["role"]], *newline]
            mask += [0] * (1 + len(newline))
            ids += body + [END_ID]
            mask += [int(m["role"] == "assistant")] * (len(body) + 1)
            ids += newline
            mask += [0] * len(newline)
        if add_generation_prompt:
            ids += [ROLE_IDS["assistant"], *newline]
            mask += [0] * (1 + len(newline))
        out.append((ids, mask))
    return out
