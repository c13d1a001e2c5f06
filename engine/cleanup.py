"""Recovering from device out-of-memory errors during a step."""

from __future__ import annotations

import gc
import logging

import torch

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or isinstance(exc, MemoryError))


def cleanup_memory(device: torch.device) -> None:
    """Drop what the failed step allocated so the next step starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
