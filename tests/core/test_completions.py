"""OpenAI response shapes produced by the formatter parse with the official client's types."""

from __future__ import annotations

import json

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from provider.openai.completions import CompletionFormatter, make_usage


def events(sse: str) -> list[str]:
    assert sse.endswith("\n\n")
    return [e.removeprefix("data: ") for e in sse.strip().split("\n\n")]


def test_stream_shapes() -> None:
    fmt = CompletionFormatter("r1", "m", include_usage=True, created=5)
    first = events(fmt.stream_delta("Hel", first=True))
    role = ChatCompletionChunk.model_validate_json(first[0])
    assert role.choices[0].delta.role == "assistant" and role.id == "chatcmpl-r1"
    assert ChatCompletionChunk.model_validate_json(first[1]).choices[0].delta.content == "Hel"
    end = events(fmt.stream_end("lo", "stop", make_usage(3, 2), first=False))
    assert end[-1] == "[DONE]"
    finish = ChatCompletionChunk.model_validate_json(end[1])
    assert finish.choices[0].finish_reason == "stop"
    usage = ChatCompletionChunk.model_validate_json(end[2])
    assert usage.choices == [] and usage.usage.total_tokens == 5


def test_stream_without_usage_has_no_usage_chunk() -> None:
    fmt = CompletionFormatter("r1", "m")
    end = events(fmt.stream_end("", "length", make_usage(3, 2), first=True))
    assert len(end) == 3 and end[-1] == "[DONE]"  # role chunk, finish chunk, DONE


def test_completion_shape() -> None:
    fmt = CompletionFormatter("r2", "m", created=5)
    body = fmt.completion("hi there", "length", make_usage(4, 2))
    parsed = ChatCompletion.model_validate_json(body)
    assert parsed.choices[0].message.content == "hi there"
    assert parsed.choices[0].finish_reason == "length" and parsed.usage.prompt_tokens == 4
    assert json.loads(body)["object"] == "chat.completion"
