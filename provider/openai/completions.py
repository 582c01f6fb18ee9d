"""OpenAI response bodies built from generated text: pure, no I/O.

A streaming request gets ``chat.completion.chunk`` SSE events: the first
frame opens with the role chunk, then content deltas, then a finish chunk, a
usage chunk when ``stream_options.include_usage`` asked for one, and
``data: [DONE]``. A non-streaming request gets one ``chat.completion``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from provider.openai.response import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceMessage,
    ChunkChoice,
    CompletionUsage,
    Delta,
    FinishReason,
    PromptTokensDetails,
    Usage,
    encode,
    sse_event,
)


def make_usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """The usage of an ``inference_response_end``."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def completion_usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> CompletionUsage:
    """The usage of an OpenAI response body: ``cached_tokens`` of the prompt came from
    the prefix cache (``usage.prompt_tokens_details.cached_tokens``)."""
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


@dataclass
class CompletionFormatter:
    """Formats one request's output; holds only that request's ids."""

    request_id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def _chunk(self, delta: Delta, finish: FinishReason | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(
                id=self.completion_id,
                created=self.created,
                model=self.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            )
        )

    def stream_delta(self, text: str, *, first: bool) -> str:
        """SSE text for new content; the first one carries the role chunk."""
        out = self._chunk(Delta(role="assistant", content="")) if first else ""
        if text:
            out += self._chunk(Delta(content=text))
        return out

    def stream_end(
        self, text: str, finish: FinishReason, usage: Usage | CompletionUsage, *, first: bool
    ) -> str:
        """SSE text closing the stream: last content, finish, usage, [DONE]."""
        out = self.stream_delta(text, first=first)
        out += self._chunk(Delta(), finish)
        if self.include_usage:
            out += sse_event(
                ChatCompletionChunk(
                    id=self.completion_id,
                    created=self.created,
                    model=self.model,
                    choices=[],
                    usage=_completion_usage(usage),
                )
            )
        return out + SSE_DONE

    def completion(self, text: str, finish: FinishReason, usage: Usage | CompletionUsage) -> str:
        """The whole ``chat.completion`` JSON of a non-streaming request."""
        body = ChatCompletion(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=[Choice(message=ChoiceMessage(content=text), finish_reason=finish)],
            usage=_completion_usage(usage),
        )
        return encode(body).decode()


def _completion_usage(usage: Usage | CompletionUsage) -> CompletionUsage:
    if isinstance(usage, CompletionUsage):
        return usage
    return completion_usage(usage.prompt_tokens, usage.completion_tokens)
