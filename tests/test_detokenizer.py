"""Incremental detokenization: the fast tokenizer's stream and the window fallback give the same text, token by
token, across multi-byte characters and stop strings."""

import random

import pytest

import engine.detokenizer as dt
from tests.tiny import tiny_tokenizer

TEXTS = ["Once upon a time, Lily found a shiny 🌟 star. 你好，世界! Ça va? naïve café — “quotes” …",
         "The cat sat on the mat.\n\nTom said: \"Hi!\"  Two  spaces, tabs\tand\nnewlines.", "ÀÉÎÕÜ 😀😃😄 ok"]


def _sentencepiece_style():
    """A Llama-style tokenizer built here: "▁" for spaces, and a decoder that strips the first token's leading space
    (so a piece needs the prompt's last tokens as context to decode right)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained("resources/models/demo-target")


def _run(tok, prompt, gen, stop=(), stream=True, monkeypatch=None):
    if not stream:
        monkeypatch.setattr(dt, "_stream_for", lambda *a: None)
    d = dt.IncrementalDetokenizer(tok, prompt, stop)
    if not stream:
        monkeypatch.undo()
    assert (d._stream is not None) == stream
    pieces = [d.add(i) for i in gen]
    return pieces, "".join(pieces) + d.flush(), d.stopped


@pytest.mark.parametrize("which", ["demo", "tiny", "sentencepiece"])
def test_the_stream_and_the_window_path_give_the_same_text(which, demo_tokenizer, monkeypatch):
    tok = demo_tokenizer if which == "demo" else tiny_tokenizer() if which == "tiny" else _sentencepiece_style()
    rng = random.Random(0)
    for trial in range(120):
        text = TEXTS[trial % len(TEXTS)]
        cut = rng.randrange(len(text))
        while cut < len(text) and text[cut] != " ":  # a prompt ends where a character does
            cut += 1
        prompt = tok.encode(text[:cut], add_special_tokens=False)
        gen = tok.encode(text[cut:], add_special_tokens=False)
        stop = ("ok",) if trial % 3 == 0 else ()
        fast, fast_text, fast_stopped = _run(tok, prompt, gen, stop)
        slow, slow_text, slow_stopped = _run(tok, prompt, gen, stop, stream=False, monkeypatch=monkeypatch)
        assert fast_text == slow_text and fast_stopped == slow_stopped, (text[cut:], fast_text, slow_text)
        if not stop:
            want = tok.decode(prompt[-4:] + gen, skip_special_tokens=True)[len(tok.decode(prompt[-4:])):]
            assert fast_text == want
        assert fast == slow  # token by token: text comes out as soon as its characters are complete


def test_a_character_split_over_tokens_is_held_until_complete(demo_tokenizer):
    tok = demo_tokenizer
    ids = tok.encode(" 😀!", add_special_tokens=False)
    d = dt.IncrementalDetokenizer(tok, tok.encode("Hi", add_special_tokens=False))
    pieces = [d.add(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + d.flush() == " 😀!"
