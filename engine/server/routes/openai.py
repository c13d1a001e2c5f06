"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming or not).

Existing OpenAI clients work unchanged; Helix extras (speculative, num_draft_tokens, top_k,
ignore_eos) are extra body fields, and speculative stats come back under ``helix``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from engine.config import SamplingParams
from engine.errors import InvalidRequest
from engine.sequence import FinishEvent, TokenEvent
from engine.server.chat import PLAIN_TEMPLATE_STOPS, chat_prompt
from engine.server.deps import WorkerDep
from engine.server.errors import ServerError, error_body
from engine.server.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIFields,
)
from engine.server.requests import Outcome, complete, follow, sse, submit
from engine.server.schemas import (
    ERROR_RESPONSES,
    MAX_BATCH_PROMPTS,
    MAX_SEED,
    MAX_STOP_STRINGS,
    ErrorResponse,
    make_sampling_params,
    sse_schema,
)
from engine.stats import RequestStats
from engine.worker import EngineWorker

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


MODEL_NOT_FOUND = {404: {"model": ErrorResponse, "description": "`model` names a model this server does not serve "
                                                                "(the message names the one it does)."}}


def _stream_doc(kind: str) -> dict:
    return {**MODEL_NOT_FOUND, 200: {"description": f"A {kind} object, or with `stream: true` server-sent `data:` chunks ending in "
                  "`data: [DONE]`.", "content": {"text/event-stream": {"schema": sse_schema()}}}}


# ---------------------------------------------------------------- shared helpers
def sampling_params(body: OpenAIFields, max_new_tokens: int, logprobs: int | None, choice: int,
                    extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    seed = None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1)  # n choices must differ
    stop = tuple(dict.fromkeys(body.stop_tuple + extra_stop))
    stop = stop if len(stop) <= MAX_STOP_STRINGS else body.stop_tuple  # the client's own stops come first
    return make_sampling_params(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=seed, stop=stop, speculative=body.speculative,
                                num_draft_tokens=body.num_draft_tokens, draft_method=body.draft_method,
                                ignore_eos=body.ignore_eos, logprobs=logprobs)


def fan_out(prompts: Sequence, body: OpenAIFields, max_new_tokens: int, logprobs: int | None,
            extra_stop: tuple[str, ...] = ()):
    """Every prompt n times, choice index = prompt index * n + j (OpenAI's order)."""
    if len(prompts) * body.n > MAX_BATCH_PROMPTS:
        raise InvalidRequest(f"n must be at most {MAX_BATCH_PROMPTS // len(prompts)} for {len(prompts)} prompt(s): "
                             f"at most {MAX_BATCH_PROMPTS} completions per request")
    expanded = [p for p in prompts for _ in range(body.n)]
    params = [sampling_params(body, max_new_tokens, logprobs, j, extra_stop) for _ in prompts for j in range(body.n)]
    return expanded, params


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # eos, stop string and cancellation all read as stop


def merged_stats(stats: Sequence[RequestStats]) -> dict:
    total = RequestStats()
    for s in stats:
        total.merge(s)
        total.num_prompt_tokens += s.num_prompt_tokens
        total.num_generated_tokens += s.num_generated_tokens
        total.total_s = max(total.total_s, s.total_s)
        if s.ttft_s is not None:
            total.ttft_s = s.ttft_s if total.ttft_s is None else min(total.ttft_s, s.ttft_s)
    return total.to_dict()


def usage(finals: Sequence[FinishEvent], n: int) -> dict:
    prompt = sum(f.stats.num_prompt_tokens for f in finals[::n])  # each prompt counted once
    completion = sum(f.stats.num_generated_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def raise_if_failed(outcomes: Sequence[Outcome]) -> None:
    for o in outcomes:
        if o.final.finish_reason == "error":
            raise ServerError(500, o.final.error or "generation failed", "generation_failed")


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def completion_logprobs(tokenizer, events: Sequence[TokenEvent], offset: int = 0) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    if not events or events[0].logprob is None:
        return None
    offsets = []
    for ev in events:
        offsets.append(offset)
        offset += len(ev.text)
    return {"tokens": [token_text(tokenizer, ev.token_id) for ev in events],
            "token_logprobs": [ev.logprob for ev in events],
            "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in ev.top_logprobs or ()} for ev in events],
            "text_offset": offsets}


def chat_logprobs(tokenizer, events: Sequence[TokenEvent]) -> dict | None:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    if not events or events[0].logprob is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(ev.token_id, ev.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs or ()]} for ev in events]}


MODEL_ALIAS = "helix"  # "whatever Helix serves", for clients that must send some name


def model_name(worker: EngineWorker) -> str:
    return worker.engine.target_name


def check_model(worker: EngineWorker, requested: str | None) -> str:
    """The served model's id if ``requested`` names it (or nothing, or the alias); a clear 4xx otherwise."""
    served, draft = worker.engine.target_name, worker.engine.draft_name
    if requested is None or requested.strip() in ("", served, MODEL_ALIAS):
        return served
    if requested == draft:
        raise ServerError(400, f"model '{requested}' is the draft model, which only proposes tokens for '{served}'; "
                          f"ask for model '{served}'", "model_not_servable", "model")
    raise ServerError(404, f"model '{requested}' is not loaded; this server serves '{served}' (see GET /v1/models). "
                      "Ask for that model, or load another one in Helix (Models tab, or serve --target).",
                      "model_not_found", "model")


async def openai_stream(request: Request, worker: EngineWorker, handles, body: OpenAIFields, chat: bool,
                        cid: str) -> AsyncIterator[str]:
    """OpenAI chunks: one per token (``helix.source`` gives its provenance), a last one per choice with
    its finish_reason, the held-back tail and stats, optionally usage, then ``data: [DONE]``."""
    tok, created, model = worker.engine.tokenizer, int(time.time()), model_name(worker)
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(handles)
    finals: list[FinishEvent | None] = [None] * len(handles)

    def chunk(choice: dict, extra: dict | None = None) -> str:
        return sse({"id": cid, "object": obj, "created": created, "model": model, "choices": [choice],
                    **(extra or {})})

    def choice(i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
        body_key = {"delta": {"content": text}} if chat else {"text": text}
        return {"index": i, **body_key, "finish_reason": reason, "logprobs": logprobs}

    if chat:
        for i in range(len(handles)):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None})
    async for i, ev in follow(handles, request):
        if isinstance(ev, TokenEvent):
            lp = chat_logprobs(tok, [ev]) if chat else completion_logprobs(tok, [ev], offsets[i])
            offsets[i] += len(ev.text)
            yield chunk(choice(i, ev.text, None, lp), {"helix": {"source": ev.source, "token_id": ev.token_id}})
        elif ev.finish_reason == "error":
            yield sse(error_body(500, ev.error or "generation failed", "generation_failed"))
        else:
            finals[i] = ev
            yield chunk(choice(i, ev.tail, finish_reason(ev.finish_reason), None), {"helix": ev.stats.to_dict()})
    if body.stream_options is not None and body.stream_options.include_usage and all(finals):
        yield sse({"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                   "usage": usage(finals, body.n)})
    yield sse("[DONE]")


def _streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- routes
@router.get("/models", response_model=ModelList, summary="The loaded model (OpenAI format)")
async def list_models(worker: WorkerDep) -> ModelList:
    """The target model; the draft, EAGLE head, draft methods, device, dtype and context length are under `helix`."""
    info = worker.engine.info()
    extras = {k: info[k] for k in ("draft", "has_draft", "eagle", "draft_methods", "device", "dtype", "max_context")}
    return ModelList(data=[ModelCard(id=info["target"], created=int(time.time()), helix=extras)])


@router.post("/completions", response_model=Completion, summary="Text completion (OpenAI format)",
             responses=_stream_doc("text_completion"))
async def completions(body: CompletionRequest, request: Request, worker: WorkerDep):
    """OpenAI's legacy completions. `prompt` may be a list; `n` completions per prompt."""
    check_model(worker, body.model)
    single = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    prompts = [body.prompt] if single else body.prompt
    expanded, params = fan_out(prompts, body, body.max_tokens, body.logprobs)
    handles = await submit(request, worker, expanded, params, stream=body.stream)
    cid = f"cmpl-{request.state.request_id}"
    if body.stream:
        return _streaming(openai_stream(request, worker, handles, body, False, cid))
    outcomes = await complete(request, handles)
    raise_if_failed(outcomes)
    tok, finals = worker.engine.tokenizer, [o.final for o in outcomes]
    choices = [{"index": i, "text": o.final.text, "finish_reason": finish_reason(o.final.finish_reason),
                "logprobs": completion_logprobs(tok, o.tokens), "helix": o.final.stats.to_dict()}
               for i, o in enumerate(outcomes)]
    return Completion(id=cid, created=int(time.time()), model=model_name(worker), choices=choices,
                      usage=usage(finals, body.n), helix=merged_stats([f.stats for f in finals]))


@router.post("/chat/completions", response_model=ChatCompletion, summary="Chat completion (OpenAI format)",
             responses=_stream_doc("chat.completion"))
async def chat_completions(body: ChatCompletionRequest, request: Request, worker: WorkerDep):
    """Messages are rendered with the tokenizer's chat template, or Helix's plain template when it has
    none (`Role: text` paragraphs, then `Assistant:`)."""
    check_model(worker, body.model)
    messages = [(m.role, m.text) for m in body.messages]
    prompt = await asyncio.to_thread(chat_prompt, worker.engine.tokenizer, messages)  # templating tokenizes
    top = (body.top_logprobs or 0) if body.logprobs else None
    plain = isinstance(prompt, str)  # Helix's plain template: stop where the model starts the next turn
    expanded, params = fan_out([prompt], body, body.max_new_tokens, top, PLAIN_TEMPLATE_STOPS if plain else ())
    handles = await submit(request, worker, expanded, params, stream=body.stream)
    cid = f"chatcmpl-{request.state.request_id}"
    if body.stream:
        return _streaming(openai_stream(request, worker, handles, body, True, cid))
    outcomes = await complete(request, handles)
    raise_if_failed(outcomes)
    tok, finals = worker.engine.tokenizer, [o.final for o in outcomes]
    choices = [{"index": i, "message": {"role": "assistant", "content": o.final.text},
                "finish_reason": finish_reason(o.final.finish_reason), "logprobs": chat_logprobs(tok, o.tokens),
                "helix": o.final.stats.to_dict()} for i, o in enumerate(outcomes)]
    return ChatCompletion(id=cid, created=int(time.time()), model=model_name(worker), choices=choices,
                          usage=usage(finals, body.n), helix=merged_stats([f.stats for f in finals]))
