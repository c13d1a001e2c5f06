"""The one place that knows how transformers versions differ.

- transformers >= 5.2x names the cache argument ``cache=``; older 4.x/5.x name it
  ``past_key_values=`` (the DirectML stack pins transformers < 5.14, see pyproject.toml).
- ``logits_to_keep`` exists on most causal LMs, not all.
- ``DynamicCache.crop`` took the kept length (positive) in old releases and takes the
  number of tokens to remove (negative) in new ones; only the benchmark's HF baseline
  touches DynamicCache.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _forward_params(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def cache_kwarg(model) -> str:
    params = _forward_params(type(model))
    return "cache" if "cache" in params else "past_key_values"


def supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_params(type(model))


def forward_with_cache(model, input_ids, position_ids, attention_mask, cache, logits_to_keep: int,
                       hidden_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, tuple]:
    """Run a causal LM on our paged cache and return logits of the last ``logits_to_keep`` positions
    (and, with ``hidden_states``, the model's hidden-state tuple: entry i is the input of layer i)."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True}
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = logits_to_keep
    if hidden_states:
        kwargs["output_hidden_states"] = True
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **kwargs)
    logits = out.logits[:, -logits_to_keep:, :]
    return (logits, out.hidden_states) if hidden_states else logits


def crop_dynamic_cache(cache, keep_tokens: int) -> None:
    """Crop a transformers DynamicCache to ``keep_tokens`` tokens on any version.

    A negative argument means "remove this many" on every version; a positive one means
    "keep this many" on old releases and is rejected on new ones, and 0 empties the
    cache on old ones, so only ever pass a negative count.
    """
    remove = cache.get_seq_length() - keep_tokens
    if remove > 0:
        cache.crop(-remove)
