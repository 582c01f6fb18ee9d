"""provider.coordinator.jobs.relay: how a request's output becomes chunk frames."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from provider.coordinator.jobs import Job, relay
from provider.coordinator.messages import InferenceResponseChunk
from provider.engine import TokenBatch
from provider.openai.request import (
    ChatCompletionRequest,
    ChatMessage,
    StreamOptions,
    decode_chat_request,
)
from provider.openai.response import FunctionCallOut, TokenLogprob, ToolCallOut

from .scripted_engine import ScriptedEngine


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_last_chunk_is_queued_so_the_end_frame_follows_in_the_same_burst(
    stream: bool,
) -> None:
    # A buyer who reads [DONE] and asks again at once must find the slot free:
    # the last chunk is handed to the writer without waiting, so the end frame
    # and the slot's state_update the caller queues next leave right behind it.
    engine = ScriptedEngine(tokens=12)
    await engine.load()
    sent: list[InferenceResponseChunk] = []
    posted: list[InferenceResponseChunk] = []

    async def send(chunk: InferenceResponseChunk) -> None:
        sent.append(chunk)

    job = Job(request_id="r1", stream=stream)
    request = ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")])
    outcome = await relay(
        job, request, engine, send, model_id="m", chunk_interval=0.0, post=posted.append
    )
    assert outcome.status == "complete"
    assert len(posted) == 1
    last = posted[0]
    assert last.seq == job.chunks_sent - 1
    assert [c.seq for c in sent] == list(range(len(sent)))
    if stream:
        assert len(sent) >= 1  # the first token went out at once, awaited
        assert last.data.endswith("data: [DONE]\n\n")
        assert all("[DONE]" not in c.data for c in sent)
    else:
        assert sent == []
        assert '"finish_reason":"length"' in last.data


async def test_without_post_every_chunk_is_awaited() -> None:
    engine = ScriptedEngine(tokens=5)
    await engine.load()
    sent: list[InferenceResponseChunk] = []

    async def send(chunk: InferenceResponseChunk) -> None:
        sent.append(chunk)

    job = Job(request_id="r2", stream=True)
    request = ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")])
    await relay(job, request, engine, send, model_id="m", chunk_interval=0.0)
    assert sent[-1].data.endswith("data: [DONE]\n\n")
    assert len(sent) == job.chunks_sent


class TimedEngine:
    """Hands over ``(time, text)`` batches, setting the relay's clock to each time."""

    def __init__(self, script: list[tuple[float, str]]) -> None:
        self.script = script
        self.now = 0.0

    def generate(
        self, request: ChatCompletionRequest, cancel: threading.Event
    ) -> AsyncIterator[TokenBatch]:
        async def batches() -> AsyncIterator[TokenBatch]:
            for count, (at, text) in enumerate(self.script, 1):
                self.now = at
                yield TokenBatch(text, 3, count)
            yield TokenBatch("", 3, len(self.script), "length")

        return batches()


async def test_text_handed_over_on_time_goes_out_without_a_second_wake_up() -> None:
    # The engine times its hand-offs on the generation thread, which runs a
    # wake-up ahead of the loop: a batch it hands over on time reaches the relay
    # a little under chunk_interval after the previous flush. It goes out at
    # once; text that comes much sooner is still held for the interval.
    engine = TimedEngine([(0.0, "first"), (0.016, "second"), (0.020, "third")])
    sent: list[tuple[float, str]] = []

    async def send(chunk: InferenceResponseChunk) -> None:
        sent.append((engine.now, chunk.data))

    job = Job(request_id="r3", stream=True)
    request = ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")])
    outcome = await relay(
        job, request, engine, send, model_id="m", chunk_interval=0.02, clock=lambda: engine.now
    )  # type: ignore[arg-type]
    assert outcome.status == "complete"
    assert [at for at, _ in sent] == [0.0, 0.016, 0.020]
    first, second, last = (data for _, data in sent)
    assert '"first"' in first and '"second"' not in first
    assert '"second"' in second and '"third"' not in second
    assert '"third"' in last and last.endswith("data: [DONE]\n\n")


class BatchEngine:
    """Hands over the given batches as they are (reasoning, tool calls, logprobs)."""

    def __init__(self, batches: list[TokenBatch]) -> None:
        self.batches = batches

    def generate(
        self, request: ChatCompletionRequest, cancel: threading.Event
    ) -> AsyncIterator[TokenBatch]:
        async def batches() -> AsyncIterator[TokenBatch]:
            for batch in self.batches:
                yield batch

        return batches()


def _call(name: str, args: str, cid: str) -> ToolCallOut:
    return ToolCallOut(id=cid, function=FunctionCallOut(name=name, arguments=args))


def _events(chunks: list[InferenceResponseChunk]) -> list[dict[str, Any]]:
    data = "".join(c.data for c in chunks)
    return [json.loads(line[6:]) for line in data.split("\n\n") if line.startswith("data: {")]


async def _run(
    batches: list[TokenBatch], stream: bool, **fields: Any
) -> tuple[Job, Any, list[InferenceResponseChunk]]:
    sent: list[InferenceResponseChunk] = []

    async def send(chunk: InferenceResponseChunk) -> None:
        sent.append(chunk)

    job = Job(request_id="rq", stream=stream)
    request = ChatCompletionRequest(
        messages=[ChatMessage(role="user", content="hi")], stream=stream, **fields
    )
    outcome = await relay(job, request, BatchEngine(batches), send, model_id="m", chunk_interval=0)  # type: ignore[arg-type]
    return job, outcome, sent


REASONED_CALL = [
    TokenBatch("", 5, 3, reasoning="I need the weather."),
    TokenBatch(
        "\n", 5, 9, tool_calls=[_call("get_weather", '{"city": "Oslo"}', "call_" + "a" * 24)]
    ),
    TokenBatch("", 5, 10, "tool_calls", tool_calls=[_call("add", '{"a": 1}', "call_" + "b" * 24)]),
]


async def test_streamed_reasoning_and_tool_calls_have_openai_deltas() -> None:
    job, outcome, sent = await _run(REASONED_CALL, True)
    assert outcome.status == "complete"
    deltas = [e["choices"][0]["delta"] for e in _events(sent) if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert {"reasoning_content": "I need the weather."} in deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls == [
        {
            "index": 0,
            "id": "call_" + "a" * 24,
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"city": "Oslo"}'}},
        {
            "index": 1,
            "id": "call_" + "b" * 24,
            "type": "function",
            "function": {"name": "add", "arguments": ""},
        },
        {"index": 1, "function": {"arguments": '{"a": 1}'}},
    ]
    finishes = [e["choices"][0]["finish_reason"] for e in _events(sent) if e["choices"]]
    assert finishes[-1] == "tool_calls"
    # What was delivered, for the receipt's output record: no reasoning in it.
    assert job.delivered.content == "\n"
    assert job.delivered.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in job.delivered.tool_calls or []] == [
        ("call_" + "a" * 24, "get_weather", '{"city": "Oslo"}'),
        ("call_" + "b" * 24, "add", '{"a": 1}'),
    ]


async def test_whole_answer_with_reasoning_and_tool_calls() -> None:
    job, outcome, sent = await _run(REASONED_CALL, False)
    assert outcome.status == "complete" and len(sent) == 1
    body = json.loads(sent[0].data)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None  # only a newline besides the calls
    assert message["reasoning_content"] == "I need the weather."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "add"]
    assert choice["logprobs"] is None
    assert job.delivered.content == "" and len(job.delivered.tool_calls or []) == 2


async def test_logprobs_travel_with_their_text() -> None:
    lp = [TokenLogprob(token="a", logprob=-0.5, bytes=[97])]
    batches = [
        TokenBatch("a", 2, 1, logprobs=lp),
        TokenBatch("b", 2, 2, "stop", logprobs=[TokenLogprob(token="b", logprob=-1.0, bytes=[98])]),
    ]
    _, _, sent = await _run(batches, True, logprobs=True)
    entries = [
        e["choices"][0]["logprobs"]["content"]
        for e in _events(sent)
        if e["choices"] and e["choices"][0]["logprobs"]
    ]
    assert [x["token"] for group in entries for x in group] == ["a", "b"]
    _, _, whole = await _run(batches, False, logprobs=True)
    content = json.loads(whole[0].data)["choices"][0]["logprobs"]["content"]
    assert [(x["token"], x["logprob"], x["bytes"]) for x in content] == [
        ("a", -0.5, [97]),
        ("b", -1.0, [98]),
    ]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_structured_output_is_judged_before_it_completes(stream: bool) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    request = decode_chat_request(
        json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": fmt})
    )
    good = [TokenBatch('{"n": ', 2, 2), TokenBatch("3}", 2, 4, "stop")]
    _, outcome, sent = await _run(good, stream, response_format=request.response_format)
    assert outcome.status == "complete"
    cut = [TokenBatch('{"n": ', 2, 2), TokenBatch("3", 2, 3, "length")]
    _, outcome, sent = await _run(cut, stream, response_format=request.response_format)
    assert outcome.status == "malformed_json_response" and not outcome.retryable
    assert "max_tokens" in (outcome.error or "")
    assert all("[DONE]" not in c.data and '"finish_reason":"length"' not in c.data for c in sent)
    wrong = [TokenBatch('{"n": "three"}', 2, 4, "stop")]
    _, outcome, _ = await _run(wrong, stream, response_format=request.response_format)
    assert outcome.status == "json_schema_validation_failed" and "$.n" in (outcome.error or "")


async def test_obfuscation_pads_every_streamed_chunk() -> None:
    _, _, sent = await _run(
        [TokenBatch("a", 2, 1), TokenBatch("b", 2, 2, "stop")],
        True,
        stream_options=StreamOptions(include_usage=True, include_obfuscation=True),
    )
    events = _events(sent)
    assert events and all(
        isinstance(e.get("obfuscation"), str) and e["obfuscation"] for e in events
    )
    _, _, plain = await _run([TokenBatch("a", 2, 1, "stop")], True)
    assert all("obfuscation" not in e for e in _events(plain))
