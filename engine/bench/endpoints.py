"""Driving OpenAI-compatible servers over HTTP for the bench: one ``/v1/completions`` request
(greedy, ``ignore_eos``), a batch-1 pass and an n-concurrent pass, timed on the client's clock so
every server pays the same HTTP, JSON and tokenizer overheads."""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class EndpointError(RuntimeError):
    """A server refused, failed or could not be reached; the message names the server and why."""


@dataclass(frozen=True)
class Endpoint:
    """A server and the body fields that pick a mode on it (e.g. Helix's ``speculative: false``)."""

    name: str
    url: str
    model: str | None = None
    api_key: str | None = None
    fields: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Completion:
    text: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _request(ep: Endpoint, path: str, body: dict | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if ep.api_key:
        headers["Authorization"] = f"Bearer {ep.api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(ep.url.rstrip("/") + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        hint = " (check --api-key)" if exc.code == 401 else ""
        raise EndpointError(f"{ep.name} at {ep.url}{path} answered HTTP {exc.code}{hint}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise EndpointError(f"{ep.name} at {ep.url}{path}: {exc}") from None


def get_json(ep: Endpoint, path: str, timeout: float = 10.0) -> dict:
    """``GET path`` as JSON (e.g. Helix's /health for the device and dtype it runs on)."""
    return _request(ep, path, None, timeout)


def served_model(ep: Endpoint, timeout: float = 10.0) -> str:
    """The first model id from ``GET /v1/models``."""
    data = _request(ep, "/v1/models", None, timeout).get("data") or []
    if not data:
        raise EndpointError(f"{ep.name} at {ep.url} lists no models on /v1/models")
    return data[0]["id"]


def complete(ep: Endpoint, prompt: str, max_tokens: int, timeout: float = 600.0) -> Completion:
    """One greedy completion of exactly ``max_tokens`` tokens (EOS ignored)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **ep.fields}
    if ep.model:
        body["model"] = ep.model
    t0 = time.perf_counter()
    out = _request(ep, "/v1/completions", body, timeout)
    dt = time.perf_counter() - t0
    try:
        text = out["choices"][0]["text"]
        tokens = int(out["usage"]["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise EndpointError(f"{ep.name}: unexpected /v1/completions answer {str(out)[:300]}") from None
    return Completion(text, tokens, dt)


def batch1(ep: Endpoint, prompts: list[str], max_tokens: int) -> list[Completion]:
    """The prompts one after another."""
    return [complete(ep, p, max_tokens) for p in prompts]


def concurrent(ep: Endpoint, prompts: list[str], n: int, max_tokens: int, requests: int | None = None
               ) -> tuple[float, list[Completion]]:
    """``n`` clients sending ``requests`` (default ``n``) requests in all, prompts cycled, each client its next as
    soon as its last is answered; returns (total tokens/s over the wall time, completions)."""
    chosen = [prompts[i % len(prompts)] for i in range(n if requests is None else max(n, requests))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        outs = list(pool.map(lambda p: complete(ep, p, max_tokens), chosen))
    wall = time.perf_counter() - t0
    return sum(c.tokens for c in outs) / wall, outs


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None
