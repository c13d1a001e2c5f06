"""Request and response bodies of the Helix routes, built from reusable field types.

Bounds come from ``engine.config`` so the docs, the validation and the engine agree; the
engine's ``SamplingParams`` still has the last word. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from engine.config import MAX_DRAFT_TOKENS, MAX_NEW_TOKENS_CAP, SamplingParams

MAX_BATCH_PROMPTS = 64
MAX_STOP_STRINGS = 16
# 2**53 - 1: exact as a JSON/JavaScript number, so validators that compare in floats agree with the server
MAX_SEED = 2**53 - 1
GREEDY_BELOW = 1e-5  # as vLLM: smaller temperatures are greedy (dividing logits by them overflows to inf)
MIN_TOP_P = 1e-6  # smaller top_p rounds to 0 in float32 and drops every token; 1e-6 keeps just the top one



def _not_a_bool(value):
    """JSON Schema's integer and number exclude true/false; pydantic's lax mode would read them as 1/0."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


NotBool = BeforeValidator(_not_a_bool)

# ---------------------------------------------------------------- reusable fields
Prompt = Annotated[str, Field(min_length=1, description="The text to continue. Must not be empty.")]
MaxNewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_CAP,
                                    description=f"Most tokens to generate (1..{MAX_NEW_TOKENS_CAP}). Generation also "
                                    "stops at the model's context length.")]
Temperature = Annotated[float, Field(ge=0, le=2, description=f"Sampling temperature in [0, 2]; 0 (or below "
                                     f"{GREEDY_BELOW:g}) = greedy.")]
TopP = Annotated[float, Field(gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose "
                              "probability adds up to top_p; 1 = off.")]
TopK = Annotated[int, Field(ge=0, description="Keep only the k most likely tokens; 0 = off.")]
Seed = Annotated[Annotated[int, Field(ge=0, le=MAX_SEED), NotBool] | None,
                 Field(description="Random seed for reproducible sampling; null = random.")]
# NotBool after the bounds, or pydantic writes them as `ge`/`le` instead of JSON Schema's minimum/maximum
MaxNewTokens, Temperature, TopP, TopK = (Annotated[t, NotBool] for t in (MaxNewTokens, Temperature, TopP, TopK))
StopString = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS,
                                             description="Strings that end generation; the stop string itself is "
                                             f"not returned. At most {MAX_STOP_STRINGS}.")]
Speculative = Annotated[StrictBool, Field(description="Use the draft model (speculative decoding) when one is loaded. "
                                    "Greedy output is identical either way; only the speed differs.")]
NumDraftTokens = Annotated[Annotated[int, Field(ge=1, le=MAX_DRAFT_TOKENS), NotBool] | None,
                           Field(description=f"Draft tokens proposed per step (1..{MAX_DRAFT_TOKENS}); null = adaptive.")]
DraftMethod = Annotated[Literal["auto", "model", "ngram", "eagle"],
                        Field(description="What proposes draft tokens: the draft model, n-gram prompt lookup (repeats "
                              "text already in the prompt or output; needs no draft model), the EAGLE-3 head (a "
                              "one-layer head over the target's own hidden states, when one is loaded), or auto "
                              "(adaptive picks by measured speed).")]
IgnoreEos = Annotated[StrictBool, Field(description="Keep generating past the end-of-sequence token (benchmarks).")]
FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]
Source = Literal["draft", "target", "bonus"]


def make_sampling_params(**fields) -> SamplingParams:
    """The engine's ``SamplingParams`` from API fields, with two numeric guards (GREEDY_BELOW, MIN_TOP_P).
    Raises ``InvalidRequest`` (422) for anything the schema let through but the engine refuses."""
    if fields["temperature"] < GREEDY_BELOW:
        fields["temperature"] = 0.0
    fields["top_p"] = max(fields["top_p"], MIN_TOP_P)
    return SamplingParams(**fields)


class SamplingFields(BaseModel):
    """The decoding settings every generate route accepts."""

    model_config = ConfigDict(extra="ignore")

    max_new_tokens: MaxNewTokens = 128
    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed = None
    stop: StopList = []
    speculative: Speculative = True
    num_draft_tokens: NumDraftTokens = None
    draft_method: DraftMethod = "auto"
    ignore_eos: IgnoreEos = False

    def sampling_params(self) -> SamplingParams:
        return make_sampling_params(**self.model_dump(include=set(SamplingFields.model_fields)))


class GenerateRequest(SamplingFields):
    prompt: Prompt


class BatchGenerateRequest(SamplingFields):
    prompts: Annotated[list[Prompt], Field(min_length=1, max_length=MAX_BATCH_PROMPTS,
                                           description=f"1..{MAX_BATCH_PROMPTS} prompts, run as one batch.")]


class MethodDrafts(BaseModel):
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_rate: float


class Stats(BaseModel):
    """Per-request statistics; names follow vLLM / llama.cpp."""

    num_prompt_tokens: int = Field(description="Tokens in the prompt.")
    num_generated_tokens: int = Field(description="Tokens generated.")
    num_drafts: int = Field(description="Speculative steps (draft proposals verified by the target).")
    num_draft_tokens: int = Field(description="Draft tokens proposed.")
    num_accepted_tokens: int = Field(description="Draft tokens the target accepted.")
    acceptance_rate: float = Field(description="num_accepted_tokens / num_draft_tokens.")
    mean_acceptance_length: float = Field(description="1 + num_accepted_tokens / num_drafts: tokens per target pass.")
    accepted_per_position: list[int] = Field(description="Accepted draft tokens at each draft position (1st, 2nd...).")
    ttft_s: float | None = Field(description="Seconds to the first token.")
    total_s: float = Field(description="Seconds from arrival to finish.")
    tokens_per_second: float = Field(description="num_generated_tokens / total_s.")
    draft_time_s: float = Field(description="Seconds spent in draft forward passes (shared steps split evenly).")
    target_time_s: float = Field(description="Seconds spent in target forward passes (shared steps split evenly).")
    by_method: dict[str, MethodDrafts] = Field(default_factory=dict, description="The drafts of each method that "
                                               "drafted (draft_method auto may use several: model, ngram, eagle).")


class GenerateResponse(BaseModel):
    request_id: str = Field(description="The engine's id for this request (also in logs).")
    text: str = Field(description="The generated text (stop string excluded).")
    token_ids: list[int] = Field(description="The generated token ids.")
    sources: list[Source] = Field(description="Where each token came from: draft (accepted draft token), target "
                                  "(plain step or correction) or bonus (extra token after a fully accepted draft).")
    finish_reason: FinishReason = Field(description="length | stop | eos | cancelled | error")
    error: str | None = Field(default=None, description="What went wrong when finish_reason is error.")
    stats: Stats


class BatchGenerateResponse(BaseModel):
    results: list[GenerateResponse] = Field(description="One result per prompt, in order.")


# ---------------------------------------------------------------- stream events (documented, sent as SSE)
class TokenEventData(BaseModel):
    """Data of a `token` event."""

    text: str = Field(description="Text this token adds (may be empty while a stop string is held back).")
    id: int = Field(description="Token id.")
    index: int = Field(description="Position in the output, from 0.")
    source: Source
    t_s: float = Field(description="Seconds since the request arrived.")


class DoneEventData(BaseModel):
    """Data of the final `done` event."""

    finish_reason: FinishReason
    tail: str = Field(description="Text held back at the end (a partial stop string that never completed). "
                      "Append it: the token texts plus tail equal the full text.")
    stats: Stats


# ---------------------------------------------------------------- system
class KVStats(BaseModel):
    total: int = Field(description="KV blocks in the target's pool.")
    used: int = Field(description="Blocks holding tokens.")
    free: int = Field(description="Blocks free.")
    shared: int = Field(description="Blocks shared by several sequences (common prompt prefix).")
    usage: float = Field(description="used / total, 0..1.")
    block_size: int = Field(description="Tokens per block.")


class HealthResponse(BaseModel):
    status: Literal["ok", "empty", "loading", "failed"] = Field(
        description="ok when models are loaded and serving; otherwise the host's state (answered with 503).")
    reason: str | None = Field(default=None, description="Why models are not (or not newly) loaded.")
    target: str | None = None
    draft: str | None = None
    has_draft: bool | None = None
    eagle: str | None = Field(default=None, description="The loaded EAGLE-3 head (hub id or folder name), if any.")
    draft_methods: list[str] | None = Field(default=None, description="Values of draft_method this engine drafts "
                                            "with: auto, then what is loaded (model, ngram, eagle).")
    device: str | None = Field(default=None, description="cpu, cuda, directml or mps.")
    device_name: str | None = Field(default=None, description="The device's own name (GPU model, CPU).")
    dtype: str | None = None
    max_context: int | None = None
    kv: KVStats | None = None


class SpecMetrics(BaseModel):
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_rate: float
    mean_acceptance_length: float
    accepted_per_position: list[int]


class MetricsResponse(BaseModel):
    requests_served: int
    requests_running: int
    requests_waiting: int
    tokens_generated: int
    tokens_per_second_1m: float = Field(description="Generated tokens per second over the last minute.")
    spec: SpecMetrics
    kv: KVStats


class PingResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, on every route, in OpenAI's shape."""

    error: ErrorDetail


def sse_schema(*events: str) -> dict:
    """OpenAPI schema of one server-sent event (as FastAPI and OpenAPI 3.2 describe them); data is JSON text."""
    return {"type": "object", "properties": {
        "event": {"type": "string", "enum": list(events)} if events else {"type": "string"},
        "data": {"type": "string", "description": "JSON"}, "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0}}}


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES = {
    400: _error("Malformed body, or the prompt is longer than the model's context."),
    401: _error("Missing or wrong API key (only when the server has one)."),
    413: _error("Request body too large."),
    422: _error("A field is out of range; the message names it."),
    503: _error("Models are not loaded, or the queue is full (see Retry-After)."),
}
