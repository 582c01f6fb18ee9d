"""OpenAI chat-completions response shapes, SSE framing and error bodies: pure.

:class:`ChatCompletion` is a non-streaming answer, :class:`ChatCompletionChunk`
one streamed event (see :mod:`provider.openai.completions` for how a
request's output becomes them), :class:`ErrorResponse` the OpenAI error JSON.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

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



FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, kw_only=True):
    """One generated token: its text, bytes, log-probability and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class FunctionCallOut(msgspec.Struct, kw_only=True):
    name: str
    #: The arguments as a JSON object in a string, as OpenAI sends them.
    arguments: str


class ToolCallOut(msgspec.Struct, kw_only=True):
    """A tool call the model made (``message.tool_calls[i]``)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChoiceMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    #: None only when the model made tool calls and wrote nothing else (as OpenAI does).
    content: str | None = ""
    refusal: None = None
    #: Thinking models' reasoning, apart from the answer (absent otherwise).
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChoiceMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class FunctionCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A piece of a streamed tool call: the first has id, type and name; then arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    #: Random padding (``stream_options.include_obfuscation``), as OpenAI sends it.
    obfuscation: str | UnsetType = UNSET


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
