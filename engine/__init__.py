"""Helix inference engine: paged KV cache, speculative decoding, scheduler. Never imports Qt."""

from engine.config import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.sequence import FinishEvent, TokenEvent
from engine.worker import EngineWorker, RequestHandle

__all__ = ["EngineConfig", "SamplingParams", "LLMEngine", "EngineWorker", "RequestHandle", "TokenEvent", "FinishEvent"]
