"""The OpenAI chat-completions request body: decoding and limits, pure.

A buyer's body travels unchanged inside ``inference_request.body``.
:func:`decode_chat_request` decodes it once, at the edge, into
:class:`ChatCompletionRequest`, whose limits keep the engine to values it can
honour; a body that breaks them raises :class:`BadRequest` naming the field.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from provider.decoding import DECODE_ERRORS, describe

#: Largest chat completion body (bytes) inside an ``inference_request``.
MAX_BODY_BYTES: Final = 2 * 1024 * 1024
MAX_MESSAGES: Final = 2048
MAX_STOP: Final = 4
MAX_STOP_BYTES: Final = 256
MAX_TOKENS_LIMIT: Final = 1 << 20


class ContentPart(msgspec.Struct, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The OpenAI chat completion request body, limited to what we serve.

    Unknown fields are ignored (clients send many); known ones are checked
    here so the engine sees only values it can honour.
    """

    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: (
        Annotated[str, Meta(max_length=MAX_STOP_BYTES)]
        | Annotated[
            list[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_BYTES)]],
            Meta(max_length=MAX_STOP),
        ]
        | None
    ) = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1

    def __post_init__(self) -> None:
        for field in ("temperature", "top_p"):
            value = getattr(self, field)
            if value is not None and value != value:  # NaN slips past ge/le
                raise ValueError(f"`{field}` must be a number")

    def token_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens, else None (engine default)."""
        return self.max_completion_tokens or self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else []
        return list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)


class BadRequest(ValueError):
    """A chat completion body that cannot be served; ``str()`` is buyer-facing."""


def decode_chat_request(body: str | bytes) -> ChatCompletionRequest:
    """Decode and validate a chat completion body.

    Raises :class:`BadRequest` whose message names the offending field, e.g.
    ``Expected `float` <= 2.0 - at `$.temperature```.
    """
    size = len(body.encode()) if isinstance(body, str) else len(body)
    if size > MAX_BODY_BYTES:
        raise BadRequest(f"request body is {size} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return _request_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise BadRequest(describe(exc)) from None
