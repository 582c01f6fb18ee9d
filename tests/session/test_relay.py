"""provider.coordinator.jobs.relay: how a request's output becomes chunk frames."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest

from provider.coordinator.jobs import Job, relay
from provider.coordinator.messages import InferenceResponseChunk
from provider.engine import TokenBatch
from provider.openai.request import ChatCompletionRequest, ChatMessage

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
