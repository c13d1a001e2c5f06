"""A remote engine over HTTP: Helix or any OpenAI-compatible server (vLLM), streamed over SSE with httpx.

``RemoteClient(Endpoint(url, api_key)).stream(prompt_or_messages, params)`` yields the engine's own
``TokenEvent``s and one ``FinishEvent``, so the app, the CLI and the Chat tab treat local and remote alike.
Provenance (draft/target/bonus) and speculative stats come only from servers that send them (Helix's
``helix`` extras); elsewhere a token's source is "" and the request's spec stats are "not reported".
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from engine.config import SamplingParams
from engine.errors import HelixError
from engine.remote_metrics import RemoteMetrics, parse_prometheus
from engine.sequence import FinishEvent, TokenEvent
from engine.stats import RequestStats

Messages = Sequence[tuple[str, str]] | Sequence[dict]
SPEC_FIELDS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "acceptance_rate", "mean_acceptance_length",
               "accepted_per_position")


class RemoteError(HelixError):
    """The remote server refused, failed or could not be reached; the message says what to change."""

    status_code = 502


@dataclass(frozen=True)
class Endpoint:
    """Where a remote engine listens. ``url`` is the server's root (a trailing ``/v1`` is dropped)."""

    url: str
    api_key: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0  # a stream silent this long fails instead of hanging

    def __post_init__(self) -> None:
        url = (self.url or "").strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(f"endpoint URL must look like http://host:port or https://host, got {self.url!r}")
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "api_key", (self.api_key or "").strip() or None)


@dataclass
class RemoteStats(RequestStats):
    """Per-request stats of a remote request; ``spec_reported`` False means the server sent no spec stats."""

    spec_reported: bool = False
    reported_per_position: list[int] | None = None  # as the server sent it (it sends no drafts per position)

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not self.spec_reported:
            d.update({k: None for k in SPEC_FIELDS})
        elif self.reported_per_position is not None:
            d["accepted_per_position"] = list(self.reported_per_position)
        d["spec_reported"] = self.spec_reported
        return d


@dataclass(frozen=True)
class ServerInfo:
    kind: str  # "helix" when /v1/models carries Helix's extras, else "openai"
    model: str


def _stats_from(d: dict, ttft_s: float | None, total_s: float, generated: int) -> RemoteStats:
    """Helix's stats dict (or just what the client measured) as RemoteStats."""
    s = RemoteStats(ttft_s=ttft_s, total_s=total_s, num_generated_tokens=generated)
    if "num_drafts" in d:
        s.spec_reported = True
        s.num_drafts, s.num_draft_tokens = int(d["num_drafts"]), int(d["num_draft_tokens"])
        s.num_accepted_tokens = int(d["num_accepted_tokens"])
        s.reported_per_position = [int(a) for a in d.get("accepted_per_position") or []]
        for i, a in enumerate(s.reported_per_position[:len(s.accepted_per_position)]):
            s.accepted_per_position[i] = a
    s.num_prompt_tokens = int(d.get("num_prompt_tokens", 0))
    s.num_generated_tokens = int(d.get("num_generated_tokens", generated))
    return s


class RemoteClient:
    """One connection to a remote engine; thread-safe (httpx.Client is), one stream per call."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        timeout = httpx.Timeout(connect=endpoint.connect_timeout_s, read=endpoint.read_timeout_s, write=30.0,
                                pool=endpoint.connect_timeout_s)
        self._http = httpx.Client(base_url=endpoint.url, headers=headers, timeout=timeout)
        self._info: ServerInfo | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- plain requests
    def _get(self, path: str, params: dict | None = None) -> httpx.Response:
        try:
            resp = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise RemoteError(self._transport_message(exc)) from None
        if resp.status_code != 200:
            raise RemoteError(self._status_message(resp.status_code, resp.text, path))
        return resp

    def info(self, refresh: bool = False) -> ServerInfo:
        """The served model (first of ``GET /v1/models``) and whether the server is Helix."""
        with self._lock:
            if self._info is None or refresh:
                try:
                    cards = self._get("/v1/models").json().get("data") or []
                except ValueError:
                    raise RemoteError(f"{self.endpoint.url}/v1/models did not answer JSON; is this an "
                                      "OpenAI-compatible server?") from None
                if not cards:
                    raise RemoteError(f"{self.endpoint.url} serves no model (GET /v1/models is empty)")
                card = cards[0]
                self._info = ServerInfo("helix" if "helix" in card else "openai", str(card["id"]))
            return self._info

    @property
    def known_model(self) -> str | None:
        """The served model if :meth:`info` has answered already (never touches the network)."""
        return self._info.model if self._info is not None else None

    def metrics(self) -> RemoteMetrics:
        """One scrape of the Prometheus metrics (Helix serves them at ``/metrics?format=prometheus``)."""
        helix = self.info().kind == "helix"
        resp = self._get("/metrics", {"format": "prometheus"} if helix else None)
        try:
            return parse_prometheus(resp.text)
        except ValueError as exc:
            raise RemoteError(f"{self.endpoint.url}/metrics is not Prometheus text ({exc})") from None

    # ---------------------------------------------------------------- streaming
    def body(self, prompt: str | Messages, params: SamplingParams) -> tuple[str, dict]:
        """The route and JSON body for a streamed completion (chat when ``prompt`` is a list of messages)."""
        info = self.info()
        body: dict = {"model": info.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                      "top_p": params.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.ignore_eos:
            body["ignore_eos"] = True
        if info.kind == "helix":  # Helix extras; other servers are not sent fields they may refuse
            body["speculative"] = params.speculative
            body["num_draft_tokens"] = params.num_draft_tokens
            body["draft_method"] = params.draft_method
        if isinstance(prompt, str):
            return "/v1/completions", {**body, "prompt": prompt}
        messages = [m if isinstance(m, dict) else {"role": str(m[0]).lower(), "content": str(m[1])} for m in prompt]
        return "/v1/chat/completions", {**body, "messages": messages}

    def stream(self, prompt: str | Messages, params: SamplingParams, *, request_id: str | None = None,
               cancel: threading.Event | None = None) -> Iterator[TokenEvent | FinishEvent]:
        """Token events, then exactly one FinishEvent.

        Raises RemoteError before the first event when the server cannot be reached or refuses the request
        (wrong key, bad field, unknown model). A failure after that (the server dies mid-stream, goes silent
        past ``read_timeout_s``) ends the stream with a FinishEvent whose reason is ``error``. Setting
        ``cancel`` closes the connection (the server cancels the request) and finishes with ``cancelled``."""
        request_id = request_id or uuid.uuid4().hex[:12]
        path, body = self.body(prompt, params)
        chat = path.endswith("chat/completions")
        t0 = time.perf_counter()
        try:
            ctx = self._http.stream("POST", path, json=body, headers={"X-Request-ID": request_id})
            resp = ctx.__enter__()
        except httpx.HTTPError as exc:
            raise RemoteError(self._transport_message(exc)) from None
        finished = threading.Event()
        if cancel is not None:  # Stop must work while the server is silent too: closing the socket ends the read
            threading.Thread(target=self._close_on_cancel, args=(resp, cancel, finished), daemon=True,
                             name="helix-remote-cancel").start()
        try:
            if resp.status_code != 200:
                resp.read()
                raise RemoteError(self._status_message(resp.status_code, resp.text, path))
            yield from self._events(resp, request_id, chat, t0, cancel)
        finally:
            finished.set()
            ctx.__exit__(None, None, None)

    @staticmethod
    def _close_on_cancel(resp: httpx.Response, cancel: threading.Event, finished: threading.Event) -> None:
        while not finished.is_set():
            if cancel.wait(0.1):
                if not finished.is_set():
                    # closing the response does not wake a thread blocked in recv(); shutting the socket down does
                    stream = resp.extensions.get("network_stream")
                    sock = stream.get_extra_info("socket") if stream is not None else None
                    try:
                        if sock is not None:
                            sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    def _events(self, resp: httpx.Response, request_id: str, chat: bool, t0: float,
                cancel: threading.Event | None) -> Iterator[TokenEvent | FinishEvent]:
        texts: list[str] = []
        token_ids: list[int] = []
        ttft: float | None = None
        finish, stats, usage, tail = None, {}, None, ""

        def final(reason: str, error: str | None = None) -> FinishEvent:
            generated = int(usage["completion_tokens"]) if usage else len(texts)
            s = _stats_from(stats, ttft, time.perf_counter() - t0, generated)
            ids = token_ids if len(token_ids) == len(texts) else []
            # as the engine's: text is everything, tail the part no token event carried
            return FinishEvent(request_id, reason, "".join(texts) + tail, ids, s, error=error, tail=tail)

        try:
            for line in resp.iter_lines():
                if cancel is not None and cancel.is_set():
                    yield final("cancelled")
                    return
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if "error" in chunk:
                    err = chunk["error"]
                    yield final("error", err.get("message", str(err)) if isinstance(err, dict) else str(err))
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    extra = chunk.get("helix") or {}
                    if choice.get("finish_reason"):
                        finish, stats, tail = choice["finish_reason"], extra, text or ""
                    elif text or "source" in extra:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        if "token_id" in extra:
                            token_ids.append(int(extra["token_id"]))
                        texts.append(text or "")
                        yield TokenEvent(request_id, int(extra.get("token_id", -1)), text or "", len(texts) - 1,
                                         str(extra.get("source", "")), time.perf_counter() - t0)
        except (httpx.HTTPError, httpx.StreamError, OSError) as exc:
            if cancel is not None and cancel.is_set():  # we closed it: Stop
                yield final("cancelled")
                return
            yield final("error", f"the connection to {self.endpoint.url} broke mid-stream after {len(texts)} "
                        f"tokens ({self._transport_message(exc)})")
            return
        if finish is None:
            yield final("error", f"{self.endpoint.url} ended the stream after {len(texts)} tokens without a "
                        "finish reason (the server stopped or crashed); check its log")
            return
        yield final(finish)

    def generate(self, prompt: str | Messages, params: SamplingParams) -> FinishEvent:
        """The whole completion (the last event of :meth:`stream`)."""
        events = list(self.stream(prompt, params))
        return events[-1]

    # ---------------------------------------------------------------- error messages
    def _transport_message(self, exc: httpx.HTTPError) -> str:
        url = self.endpoint.url
        if isinstance(exc, httpx.ConnectError):
            return (f"cannot connect to {url} ({exc}); check the URL and port, and that the server is running "
                    "and reachable from this PC")
        if isinstance(exc, httpx.TimeoutException):
            return (f"{url} did not answer in time ({type(exc).__name__}); the server may be overloaded, or "
                    "a firewall drops the connection")
        return f"{url}: {type(exc).__name__}: {exc}"

    def _status_message(self, status: int, text: str, path: str) -> str:
        try:
            detail = json.loads(text)
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = text
        detail = str(detail).strip()[:400]
        url = self.endpoint.url + path
        if status == 401:
            return (f"{url} answered 401 Unauthorized: the API key is missing or wrong; set the server's key "
                    f"({'a key was sent' if self.endpoint.api_key else 'no key was sent'}). {detail}").strip()
        if status == 404 and path.startswith("/v1"):
            return f"{url} answered 404: not an OpenAI-compatible server, or the model is not served ({detail})"
        return f"{url} answered HTTP {status}: {detail}"
