"""Build an engine from an :class:`EngineConfig`: device, models, tokenizer check, warm-up."""

from __future__ import annotations

import logging

from engine.config import EngineConfig, default_eagle
from engine.devices import dtype_name, resolve_device, resolve_dtype
from engine.llm_engine import LLMEngine
from engine.loader import Progress, check_tokenizers_compatible, load_model

logger = logging.getLogger(__name__)


def configure_cpu_threads(num_threads: int | None) -> int:
    """Leave one core to the UI and the server: OpenMP threads that share a core with
    another busy thread wait on each other, and small models gain little from a second thread."""
    import os

    import torch

    n = num_threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    logger.info("CPU: %d torch threads", n)
    return n


def build_engine(config: EngineConfig, progress: Progress | None = None, warmup: bool = True) -> LLMEngine:
    """Load target (and draft) and return a ready engine. Raises HelixError subclasses."""
    report = progress or (lambda stage, frac: None)
    device = resolve_device(config.device)
    # automatic (None): each checkpoint's own dtype where the device runs it (engine.dtypes); the draft follows the target
    dtype = None if config.dtype in (None, "auto") else resolve_dtype(config.dtype, device)
    if device.kind == "cpu":
        configure_cpu_threads(config.num_threads)
    share = 0.45 if config.draft else 0.9

    def scaled(offset: float):
        return lambda stage, frac: report(stage, offset + share * frac)

    target = load_model(config.target, device, dtype, "target", scaled(0.0), config.attn_implementation,
                        config.trust_remote_code)
    draft = None
    if config.draft:
        draft = load_model(config.draft, device, target.dtype, "draft", scaled(0.45), config.attn_implementation,
                           config.trust_remote_code)
        check_tokenizers_compatible(target.tokenizer, draft.tokenizer)
    max_ctx = target.max_context if draft is None else min(target.max_context, draft.max_context)
    eagle_path = default_eagle(config.target) if config.eagle is None else config.eagle or None
    head = None
    if eagle_path:
        from engine.eagle import load_head
        from engine.loader import model_id

        report("loading EAGLE head", 0.91)
        head = load_head(eagle_path, target.model)
    report("allocating KV cache", 0.92)
    engine = LLMEngine(target.model, target.tokenizer, draft.model if draft else None, config, max_ctx,
                       device.kind, (target.name, draft.name if draft else None), eagle_head=head,
                       eagle_name=model_id(eagle_path) if head is not None else None)
    engine.device_name = device.name
    engine.dtype_name = dtype_name(target.dtype)
    if warmup:
        report("warming up", 0.95)
        engine.warmup()
    report("ready", 1.0)
    return engine
