"""Tiny models and tokenizers built in code, for tests that must run in seconds."""

from __future__ import annotations

import functools

import torch

TEXT = (
    "Once upon a time there was a little girl named Lily. She loved to play in the park with her dog. "
    "One day the sun was bright and the birds sang. Tom found a red ball under the big tree. "
    "They were happy and laughed together. The cat sat on the mat and looked at the moon. "
    "Héllo wörld, naïve café — ünïcode ✓ 日本語 text too."
)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory; eos '<|endoftext|>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=256,
    )


def tiny_llama(vocab_size: int, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               dtype=torch.float32, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      eos_token_id=0, bos_token_id=0, pad_token_id=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    # random init is nearly uniform; sharpen so greedy choices are decisive and runs are non-trivial
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def tiny_engine(draft: bool = True, kv_tokens: int = 4096, dtype=torch.float32, draft_seed: int = 1, **cfg):
    from engine import EngineConfig, LLMEngine

    tok = tiny_tokenizer()
    target = tiny_llama(len(tok), layers=2, seed=0, dtype=dtype)
    d = tiny_llama(len(tok), layers=1, seed=draft_seed, dtype=dtype) if draft else None
    config = EngineConfig(target="tiny-target", draft="tiny-draft" if draft else None, kv_cache_tokens=kv_tokens, **cfg)
    return LLMEngine(target, tok, d, config, max_context=256, names=("tiny-target", "tiny-draft" if draft else None))


@functools.lru_cache(maxsize=None)
def word_tokenizer(vocab_size: int = 8):
    """A word-level tokenizer over ``vocab_size`` single-letter words (token 0 is eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>"] + [chr(ord("a") + i) for i in range(vocab_size - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>")


def truncated_draft(target, layers: int = 1):
    """A draft that is the target's first ``layers`` layers (+ its norm and head): a real,
    cheaper model that agrees with the target often but not always."""
    import copy

    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft


def random_eagle_head(target, draft_vocab_size: int | None = None, seed: int = 0, scale: float = 1.0):
    """An EAGLE-3 head of random weights shaped for ``target`` (a reduced draft vocabulary of random target ids
    when ``draft_vocab_size`` is given), sharing its embeddings: exactness never depends on the head."""
    from engine.eagle import EagleConfig, EagleHead

    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.for_target(target.config, draft_vocab_size=draft_vocab_size))
    if draft_vocab_size is not None:
        head.set_vocab_map(torch.randperm(target.config.vocab_size)[:draft_vocab_size].sort().values)
    with torch.no_grad():
        head.lm_head.weight.mul_(scale)
    head.to(next(target.parameters()).dtype)
    head.attach_embeddings(target.get_input_embeddings())
    return head.eval().requires_grad_(False)


def tiny_pair_engine(kv_tokens: int = 4096, layers: int = 3, dtype=torch.float32, eagle: bool = False, **cfg):
    """Target + truncated draft sharing the tiny BPE tokenizer: non-trivial acceptance; ``eagle`` adds a
    random EAGLE-3 head (a reduced draft vocabulary) as a third proposer."""
    from engine import EngineConfig, LLMEngine

    tok = tiny_tokenizer()
    target = tiny_llama(len(tok), layers=layers, seed=3, dtype=dtype)
    with torch.no_grad():  # damp the upper layers so the 1-layer draft often agrees with the target
        for layer in target.model.layers[1:]:
            layer.mlp.down_proj.weight.mul_(0.3)
            layer.self_attn.o_proj.weight.mul_(0.3)
    draft = truncated_draft(target)
    config = EngineConfig(target="tiny-target", draft="tiny-draft", kv_cache_tokens=kv_tokens, **cfg)
    head = random_eagle_head(target, draft_vocab_size=len(tok) // 2, scale=8.0) if eagle else None
    return LLMEngine(target, tok, draft, config, max_context=256, names=("tiny-target", "tiny-draft"),
                     eagle_head=head, eagle_name="tiny-eagle" if eagle else None)
