"""OpenAI response bodies built from generated output: pure, no I/O.

A streaming request gets ``chat.completion.chunk`` SSE events: the first
frame opens with the role chunk, then deltas (``content``,
``reasoning_content``, tool calls, each with its tokens' ``logprobs`` when
asked), then a finish chunk, a usage chunk when
``stream_options.include_usage`` asked for one, and ``data: [DONE]``. A
non-streaming request gets one ``chat.completion``.

A tool call streams as OpenAI streams one: a delta with its ``index``,
``id``, ``type`` and ``function.name`` (and empty ``arguments``), then its
arguments. Calls are parsed once complete, so a call's arguments come in
one piece.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from provider.openai.response import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChoiceMessage,
    ChunkChoice,
    CompletionUsage,
    Delta,
    FinishReason,
    FunctionCallDelta,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
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


@dataclass(slots=True)
class Output:
    """Output not yet sent: answer text, reasoning, complete tool calls, logprobs entries."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls or self.logprobs)

    def add(
        self,
        text: str = "",
        *,
        reasoning: str = "",
        tool_calls: list[ToolCallOut] | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        self.text += text
        self.reasoning += reasoning
        if tool_calls:
            self.tool_calls.extend(tool_calls)
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs

    def take(self) -> Output:
        out = Output(self.text, self.reasoning, self.tool_calls, self.logprobs)
        self.text, self.reasoning, self.tool_calls = "", "", []
        self.logprobs = [] if self.logprobs is not None else None
        return out


@dataclass
class CompletionFormatter:
    """Formats one request's output; holds only that request's ids and counters.

    ``logprobs``: the request asked for them (the choices then carry a
    ``logprobs`` object, as OpenAI's do). ``obfuscation``: every streamed
    chunk gets random padding in ``obfuscation`` (OpenAI's
    ``stream_options.include_obfuscation``).
    """

    request_id: str
    model: str
    include_usage: bool = False
    logprobs: bool = False
    obfuscation: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    calls_sent: int = 0

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def _event(self, choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
        )
        if self.obfuscation:
            chunk.obfuscation = secrets.token_urlsafe(secrets.randbelow(24) + 1)
        return sse_event(chunk)

    def _chunk(
        self,
        delta: Delta,
        finish: FinishReason | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> str:
        lp = ChoiceLogprobs(content=logprobs) if logprobs else None
        return self._event([ChunkChoice(delta=delta, finish_reason=finish, logprobs=lp)])

    def stream_delta(self, out: Output | str, *, first: bool) -> str:
        """SSE text for new output; the first one carries the role chunk."""
        if isinstance(out, str):
            out = Output(out)
        data = self._chunk(Delta(role="assistant", content="")) if first else ""
        if out.reasoning:
            data += self._chunk(Delta(reasoning_content=out.reasoning))
        if out.text or out.logprobs:
            data += self._chunk(Delta(content=out.text), logprobs=out.logprobs)
        for call in out.tool_calls:
            index = self.calls_sent
            self.calls_sent += 1
            head = ToolCallDelta(
                index=index,
                id=call.id,
                type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=""),
            )
            args = ToolCallDelta(
                index=index, function=FunctionCallDelta(arguments=call.function.arguments)
            )
            data += self._chunk(Delta(tool_calls=[head]))
            data += self._chunk(Delta(tool_calls=[args]))
        return data

    def stream_end(
        self,
        out: Output | str,
        finish: FinishReason,
        usage: Usage | CompletionUsage,
        *,
        first: bool,
        done: bool = True,
    ) -> str:
        """SSE text closing the stream: last output, finish, usage, [DONE]."""
        data = self.stream_delta(out, first=first)
        data += self._chunk(Delta(), finish)
        if self.include_usage:
            data += self._event([], _completion_usage(usage))
        return data + SSE_DONE if done else data

    def completion(
        self, out: Output | str, finish: FinishReason, usage: Usage | CompletionUsage
    ) -> str:
        """The whole ``chat.completion`` JSON of a non-streaming request."""
        if isinstance(out, str):
            out = Output(out)
        message = ChoiceMessage(content=out.text)
        if out.tool_calls:
            message.tool_calls = out.tool_calls
            if not out.text.strip():  # the newlines around calls are not an answer
                message.content = None
        if out.reasoning:
            message.reasoning_content = out.reasoning
        logprobs = ChoiceLogprobs(content=out.logprobs or []) if self.logprobs else None
        body = ChatCompletion(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=[Choice(message=message, finish_reason=finish, logprobs=logprobs)],
            usage=_completion_usage(usage),
        )
        return encode(body).decode()


def _completion_usage(usage: Usage | CompletionUsage) -> CompletionUsage:
    if isinstance(usage, CompletionUsage):
        return usage
    return completion_usage(usage.prompt_tokens, usage.completion_tokens)
