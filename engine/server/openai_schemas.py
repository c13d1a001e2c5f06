"""Bodies of the OpenAI-compatible routes (/v1). Fields OpenAI defines and Helix does not use
(``user``, ``presence_penalty``, ``logit_bias``, ...) are accepted and ignored, as are unknown fields."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from engine.server.schemas import (
    MAX_BATCH_PROMPTS,
    MAX_STOP_STRINGS,
    DraftMethod,
    IgnoreEos,
    MaxNewTokens,
    NotBool,
    NumDraftTokens,
    Prompt,
    Seed,
    Speculative,
    StopString,
    Temperature,
    TopK,
    TopP,
)

MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20

N = Annotated[int, Field(ge=1, le=MAX_CHOICES, description=f"Completions per prompt (1..{MAX_CHOICES}).")]
Stop = Annotated[StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None,
                 Field(description=f"A stop string or a list of up to {MAX_STOP_STRINGS}.")]
TOKEN_ID = "TokenId"  # the title that marks token ids in the OpenAPI document (see openapi_with_vocab_bound)
TokenId = Annotated[int, Field(ge=0, title=TOKEN_ID, description="A token id of the served model: "
                                        "0..vocab_size-1 (the document's maximum); any other is a 422.")]
N, TokenId = Annotated[N, NotBool], Annotated[TokenId, NotBool]  # after the bounds: see schemas.py
TokenIds = Annotated[list[TokenId], Field(min_length=1, description="A prompt as token ids.")]
ModelName = Annotated[str | None, Field(description="The loaded model's id from GET /v1/models (e.g. `demo-target`), or "
                                                    "`helix` or nothing for whatever is loaded; any other name is a 404.")]


class StreamOptions(BaseModel):
    include_usage: StrictBool = Field(default=False, description="Send a last chunk with usage before [DONE].")


class OpenAIFields(BaseModel):
    """Settings shared by /v1/completions and /v1/chat/completions, plus Helix extras."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: N = 1
    stop: Stop = None
    seed: Seed = None
    stream: StrictBool = Field(default=False, description="Answer with server-sent chunks ending in `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(default=None, description="With stream: include_usage.")
    # Helix extras
    top_k: TopK = 0
    speculative: Speculative = True
    num_draft_tokens: NumDraftTokens = None
    draft_method: DraftMethod = "auto"
    ignore_eos: IgnoreEos = False

    @property
    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(OpenAIFields):
    prompt: Annotated[Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)]
                      | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)],
                      Field(description=f"A prompt, a list of up to {MAX_BATCH_PROMPTS} prompts, or the same as "
                      "token ids.")]
    max_tokens: MaxNewTokens = 16
    logprobs: Annotated[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), NotBool] | None,
                        Field(description="Return log probabilities of each token and of this many most likely "
                              "tokens (target model).")] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(default="text", description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who wrote the message.")
    content: Annotated[str | list[TextPart] | None, Field(description="Text, or a list of text parts.")] = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256, description="The conversation "
                                                 "so far (1..256 messages).")]
    max_tokens: Annotated[MaxNewTokens | None, Field(description="Most tokens to generate (default 128).")] = None
    max_completion_tokens: Annotated[MaxNewTokens | None, Field(description="Same as max_tokens; wins if both "
                                                                "are set.")] = None
    logprobs: StrictBool = Field(default=False, description="Return the log probability of each output token.")
    top_logprobs: Annotated[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), NotBool] | None,
                            Field(description="With logprobs: also this many most likely tokens at each "
                                  "position.")] = None

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 128


def openapi_with_vocab_bound(base: Callable[[], dict], vocab_size: Callable[[], int | None]) -> Callable[[], dict]:
    """An ``app.openapi`` whose token ids say the served model's bound (``maximum: vocab_size - 1``), so the
    document tells the truth the server enforces; the bound follows the model when the desktop app swaps it."""

    def openapi() -> dict:
        document = base()  # FastAPI builds it once and caches it
        size = vocab_size()
        if not size:
            return document
        document = copy.deepcopy(document)
        stack: list = [document]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if node.get("title") == TOKEN_ID and node.get("type") == "integer":
                    node["maximum"] = size - 1
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        return document

    return openapi


# ---------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "helix"
    helix: dict[str, Any] = Field(default_factory=dict, description="The draft model and EAGLE-3 head loaded "
                                  "with it (names), the draft methods, device, dtype, context length.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict[str, Any] | None = None
    helix: dict[str, Any] | None = Field(default=None, description="This choice's speculative-decoding stats.")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    helix: dict[str, Any] = Field(description="Speculative-decoding stats over all choices (Helix extra).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict[str, Any] | None = None
    helix: dict[str, Any] | None = Field(default=None, description="This choice's speculative-decoding stats.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    helix: dict[str, Any] = Field(description="Speculative-decoding stats over all choices (Helix extra).")
