"""Errors the engine raises. Each message says what to change.

`HelixError` subclasses carry an HTTP status so the server maps them in one place.
"""

from __future__ import annotations


class HelixError(Exception):
    """Base class: a problem the user can fix (bad input, bad model, no room)."""

    status_code = 400


class InvalidRequest(HelixError, ValueError):
    status_code = 422


class PromptTooLong(HelixError, ValueError):
    status_code = 400


class ModelLoadError(HelixError):
    """Missing, corrupt or unsupported model folder or hub id."""


class TokenizerMismatch(HelixError):
    """Draft and target tokenizers differ; speculative decoding would be wrong."""


class DeviceUnavailable(HelixError):
    """The requested device (cuda, directml, mps) is not usable here."""


class KVCacheExhausted(HelixError):
    """No free KV blocks. Recoverable: the request waits, is preempted or fails alone."""

    status_code = 503


class QueueFull(HelixError):
    status_code = 503


class EngineStopped(HelixError):
    status_code = 503
