"""Helix routes: /generate, /generate/batch and /generate/stream (server-sent events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from engine.sequence import FinishEvent
from engine.server.deps import WorkerDep
from engine.server.requests import Outcome, complete, follow, sse, submit
from engine.server.schemas import (
    ERROR_RESPONSES,
    BatchGenerateRequest,
    BatchGenerateResponse,
    DoneEventData,
    GenerateRequest,
    GenerateResponse,
    TokenEventData,
    sse_schema,
)

router = APIRouter(prefix="/generate", tags=["generate"], responses=ERROR_RESPONSES)

STREAM_DESCRIPTION = f"""Server-sent events, one per line pair (`event:` then `data:` with JSON):

* `token` — one per generated token: `{list(TokenEventData.model_fields)}`; `source` says where it came from.
* `done` — last event: `{list(DoneEventData.model_fields)}`. Append `tail` to the token texts to get the full text.
* `error` — `{{"message": ...}}` when the request fails; a `done` event with finish_reason `error` follows.

If the client disconnects, the request is cancelled at the engine's next step and its KV blocks are freed.
"""


def to_response(outcome: Outcome) -> GenerateResponse:
    final = outcome.final
    return GenerateResponse(request_id=final.request_id, text=final.text, token_ids=final.token_ids,
                            sources=[t.source for t in outcome.tokens], finish_reason=final.finish_reason,
                            error=final.error, stats=final.stats.to_dict())


@router.post("", response_model=GenerateResponse, summary="Generate a completion")
async def generate(body: GenerateRequest, request: Request, worker: WorkerDep) -> GenerateResponse:
    """Continue `prompt` and return the text with per-request speculative-decoding stats."""
    handles = await submit(request, worker, [body.prompt], [body.sampling_params()], stream=False)
    (outcome,) = await complete(request, handles)
    return to_response(outcome)


@router.post("/batch", response_model=BatchGenerateResponse, summary="Generate completions for several prompts")
async def generate_batch(body: BatchGenerateRequest, request: Request, worker: WorkerDep) -> BatchGenerateResponse:
    """Run all `prompts` as one batch (the scheduler steps them together); results come back in order."""
    params = body.sampling_params()
    handles = await submit(request, worker, body.prompts, [params] * len(body.prompts), stream=False)
    return BatchGenerateResponse(results=[to_response(o) for o in await complete(request, handles)])


@router.post("/stream", summary="Stream a completion token by token",
             response_class=StreamingResponse,
             responses={200: {"description": STREAM_DESCRIPTION,
                              "content": {"text/event-stream": {"schema": sse_schema("token", "done", "error")}}}})
async def generate_stream(body: GenerateRequest, request: Request, worker: WorkerDep) -> StreamingResponse:
    """Same body as /generate; answers `text/event-stream` (see the 200 response for the events)."""
    handles = await submit(request, worker, [body.prompt], [body.sampling_params()])

    async def events() -> AsyncIterator[str]:
        async for _, ev in follow(handles, request):
            if isinstance(ev, FinishEvent):
                if ev.finish_reason == "error":
                    yield sse({"message": ev.error or "generation failed"}, "error")
                done = DoneEventData(finish_reason=ev.finish_reason, tail=ev.tail, stats=ev.stats.to_dict())
                yield sse(done.model_dump(), "done")
            else:
                yield sse({"text": ev.text, "id": ev.token_id, "index": ev.index, "source": ev.source,
                           "t_s": round(ev.t_s, 6)}, "token")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
