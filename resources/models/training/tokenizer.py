"""The shared tokenizer: byte-level BPE with the special tokens, the chat template, saving and encoding."""

from __future__ import annotations

import json
from pathlib import Path

from .config import EOS, EOS_ID, PAD, SPECIAL_TOKENS, UNK, Config

# Jinja for transformers' apply_chat_template (and vLLM, llama.cpp, ...). The rendered text is tokenized
# without added special tokens, so the template writes the BOS itself. chat_format.encode_conversation
# is the same format in Python, with the loss mask; a test checks that the two agree token for token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{ raise_exception('only the first message may be a system message') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] | trim) + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def train_tokenizer(docs: list[str], cfg: Config):
    """Byte-level BPE of ``cfg.vocab_size`` tokens on ``docs``; ids 0.. are SPECIAL_TOKENS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    # Like the training stream, every plain text starts after <|endoftext|>: prepend it as BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, EOS_ID)]
    )
    return wrap_tokenizer(tok, cfg.ctx)


def wrap_tokenizer(tok, ctx: int):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=ctx,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tokenizer(hf_tok, out_dir: Path) -> None:
    """save_pretrained, with the chat template kept inside tokenizer_config.json (transformers 5 writes it
    to chat_template.jinja; tokenizer_config.json is where every version and other tools look)."""
    out_dir = Path(out_dir)
    hf_tok.save_pretrained(out_dir)
    jinja = out_dir / "chat_template.jinja"
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = jinja.read_text() if jinja.exists() else hf_tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja.unlink(missing_ok=True)


def encode_texts(hf_tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (fast: one batch in the Rust tokenizer)."""
    return [e.ids for e in hf_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
