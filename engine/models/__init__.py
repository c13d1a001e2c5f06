"""The engine's own forward passes, by model family; everything else runs transformers' code."""

from __future__ import annotations

from engine.models.llama import LeanCausalLM, unsupported_reason


def lean_model_for(model) -> tuple[LeanCausalLM | None, str | None]:
    """(lean forward, None) for a supported model, else (None, why not)."""
    reason = unsupported_reason(model)
    if reason is not None:
        return None, reason
    return LeanCausalLM(model), None
