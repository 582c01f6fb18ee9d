"""OpenAI chat-completions response shapes, SSE framing and error bodies: pure.

:class:`ChatCompletion` is a non-streaming answer, :class:`ChatCompletionChunk`
one streamed event (see :mod:`provider.openai.completions` for how a
request's output becomes them), :class:`ErrorResponse` the OpenAI error JSON.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

NonNegInt = Annotated[int, Meta(ge=0)]

_encoder = msgspec.json.Encoder()


def encode(obj: msgspec.Struct) -> bytes:
    """Encode ``obj`` as compact JSON (stable: same object, same bytes)."""
    return _encoder.encode(obj)


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    total_tokens: NonNegInt = 0


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    #: Prompt tokens served from the provider's prefix cache, not prefilled.
    cached_tokens: NonNegInt = 0


class CompletionUsage(Usage, kw_only=True):
    """Usage as an OpenAI response body gives it: with ``prompt_tokens_details``.

    (The coordinator's ``inference_response_end`` carries the plain :class:`Usage`.)
    """

    prompt_tokens_details: PromptTokensDetails = msgspec.field(
        default_factory=PromptTokensDetails
    )


FinishReason = Literal["stop", "length", "cancelled"]


class ChoiceMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChoiceMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


SSE_DONE: Final = "data: [DONE]\n\n"


def sse_event(obj: msgspec.Struct) -> str:
    """One SSE ``data:`` event holding ``obj`` as JSON."""
    return "data: " + _encoder.encode(obj).decode() + "\n\n"


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """OpenAI-style error JSON: ``{"error": {"message", "type", ...}}``."""

    error: ErrorBody
