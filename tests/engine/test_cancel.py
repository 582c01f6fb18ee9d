"""Cancellation, early exit, errors and slot accounting of MlxEngine."""

from __future__ import annotations

import asyncio
import threading

import pytest

from provider.engine import EngineError, TokenBatch
from provider.engine.mlx import MlxEngine, RequestStats
from tests.engine.conftest import MakeEngine
from tests.engine.helpers import chat, collect

CONCURRENCY = pytest.mark.parametrize("concurrency", [1, 4], ids=["single", "batched"])

# Long enough that nothing here finishes by itself before being cancelled.
LONG = 3000


@CONCURRENCY
async def test_cancel_mid_decode_from_the_loop(make_engine: MakeEngine, concurrency: int) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)
    cancel = threading.Event()
    batches: list[TokenBatch] = []
    async for batch in engine.generate(chat(max_tokens=LONG), cancel, request_id="c"):
        batches.append(batch)
        if len(batches) == 1:
            cancel.set()
            # Read after setting: the thread was at most here when it was set.
            steps_when_set = engine.last_stats["c"].decode_steps
    stats = engine.last_stats["c"]
    assert batches[-1].finish_reason == "cancelled"
    assert all(b.finish_reason is None for b in batches[:-1])
    assert stats.decode_steps <= steps_when_set + 1
    assert batches[-1].completion_tokens == stats.completion_tokens < LONG
    assert engine.active == 0


@CONCURRENCY
async def test_cancel_at_a_decode_step_stops_there(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)
    cancel = threading.Event()

    def hook(stats: RequestStats, kind: str) -> None:
        if kind == "decode" and stats.decode_steps == 5:
            cancel.set()

    engine.step_hook = hook
    batches = await collect(engine, chat(max_tokens=LONG), cancel, "c5")
    assert batches[-1].finish_reason == "cancelled"
    assert batches[-1].completion_tokens == 5
    assert engine.last_stats["c5"].decode_steps == 5


@CONCURRENCY
async def test_cancel_mid_prefill_stops_within_one_chunk(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(max_concurrency=concurrency, prefill_step_size=16, ignore_eos=True)
    loop = asyncio.get_running_loop()
    at_chunk_3 = asyncio.Event()
    resume = threading.Event()

    def hook(stats: RequestStats, kind: str) -> None:
        # Hold the generation thread after chunk 3 until the loop has cancelled.
        if kind == "prefill" and stats.prefill_chunks == 3:
            loop.call_soon_threadsafe(at_chunk_3.set)
            resume.wait(10)

    engine.step_hook = hook
    cancel = threading.Event()
    request = chat("word " * 300, max_tokens=10)
    prompt_tokens = engine.count_tokens(request)
    task = asyncio.create_task(collect(engine, request, cancel, "p"))
    await at_chunk_3.wait()
    cancel.set()
    resume.set()
    batches = await task
    stats = engine.last_stats["p"]
    assert batches == [TokenBatch("", prompt_tokens, 0, "cancelled")]
    assert prompt_tokens // 16 > 10  # the whole prefill would take many more chunks
    assert 3 <= stats.prefill_chunks <= 4
    assert stats.decode_steps == 0
    assert engine.active == 0


@CONCURRENCY
async def test_cancel_before_start(make_engine: MakeEngine, concurrency: int) -> None:
    engine = await make_engine(max_concurrency=concurrency)
    cancel = threading.Event()
    cancel.set()
    batches = await collect(engine, chat(max_tokens=10), cancel, "pre")
    assert [b.finish_reason for b in batches] == ["cancelled"]
    assert batches[0].completion_tokens == 0
    assert engine.last_stats["pre"].decode_steps == 0


@CONCURRENCY
async def test_aclose_sets_cancel_and_frees_the_slot(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)
    cancel = threading.Event()
    stream = engine.generate(chat(max_tokens=LONG), cancel, request_id="a")
    await anext(stream)
    assert engine.active == 1
    await stream.aclose()
    assert cancel.is_set()
    assert engine.active == 0
    # The generation thread handles the cancel before it serves a later request.
    later = await collect(engine, chat(max_tokens=2))
    assert later[-1].finish_reason == "length"
    stats = engine.last_stats["a"]
    assert stats.finish_reason == "cancelled"
    assert stats.decode_steps < LONG


@CONCURRENCY
async def test_task_cancel_sets_cancel_and_frees_the_slot(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)
    cancel = threading.Event()
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(chat(max_tokens=LONG), cancel, request_id="t"):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.is_set()
    assert engine.active == 0
    await collect(engine, chat(max_tokens=2))
    assert engine.last_stats["t"].finish_reason == "cancelled"


@CONCURRENCY
async def test_internal_error_ends_the_request_and_frees_the_slot(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)

    def hook(stats: RequestStats, kind: str) -> None:
        if stats.request_id == "boom" and kind == "decode" and stats.decode_steps == 3:
            raise RuntimeError("boom")

    engine.step_hook = hook
    failing = asyncio.create_task(collect(engine, chat(max_tokens=50), None, "boom"))
    if concurrency > 1:  # a request batched alongside is unaffected
        assert (await collect(engine, chat(max_tokens=30)))[-1].completion_tokens == 30
    with pytest.raises(EngineError) as caught:
        await failing
    assert caught.value.status == "error_internal"
    assert "boom" in str(caught.value)
    assert engine.last_stats["boom"].decode_steps == 3
    assert engine.active == 0
    assert (await collect(engine, chat(max_tokens=3)))[-1].finish_reason == "length"


@CONCURRENCY
async def test_queue_full_beyond_max_concurrency(make_engine: MakeEngine, concurrency: int) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)
    streams = [
        engine.generate(chat(max_tokens=LONG), threading.Event()) for _ in range(concurrency)
    ]
    for stream in streams:
        await anext(stream)
    assert engine.active == concurrency
    with pytest.raises(EngineError) as caught:
        await collect(engine, chat(max_tokens=2))
    assert caught.value.status == "error_queue_full"
    assert caught.value.retryable
    for stream in streams:
        await stream.aclose()
    assert engine.active == 0
    assert (await collect(engine, chat(max_tokens=2)))[-1].finish_reason == "length"


@CONCURRENCY
async def test_close_ends_in_flight_requests_cancelled(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True)
    started = asyncio.Event()

    async def consume(rid: str) -> list[TokenBatch]:
        batches = []
        async for batch in engine.generate(
            chat(max_tokens=LONG), threading.Event(), request_id=rid
        ):
            batches.append(batch)
            started.set()
        return batches

    tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(concurrency)]
    await started.wait()
    await engine.close()
    results = await asyncio.gather(*tasks)
    for batches in results:
        assert batches[-1].finish_reason == "cancelled"
        assert batches[-1].completion_tokens < LONG
    assert engine.active == 0


async def test_slot_free_after_every_path(make_engine: MakeEngine) -> None:
    """complete, stop, cancel, error, aclose: the single slot is reusable after each."""
    engine = await make_engine(max_context_tokens=64, ignore_eos=True)
    await collect(engine, chat(max_tokens=3))
    assert engine.active == 0
    await collect(engine, chat(max_tokens=30, temperature=1.0, seed=1, stop=" "))
    assert engine.active == 0
    cancel = threading.Event()
    cancel.set()
    await collect(engine, chat(max_tokens=3), cancel)
    assert engine.active == 0
    with pytest.raises(EngineError):
        await collect(engine, chat("word " * 100))
    assert engine.active == 0
    stream = engine.generate(chat(max_tokens=30), threading.Event())
    await anext(stream)
    await stream.aclose()
    assert engine.active == 0
    assert (await collect(engine, chat(max_tokens=3)))[-1].completion_tokens == 3


async def test_unbatchable_model_serves_slots_in_turn(
    make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mergeable caches: one at a time; a waiting request still cancels at once."""
    monkeypatch.setattr(MlxEngine, "_batchable", lambda self: False)
    engine = await make_engine(max_concurrency=2, ignore_eos=True)
    cancel = threading.Event()

    def hook(stats: RequestStats, kind: str) -> None:
        # Cancel the second request from the generation thread once it waits.
        if stats.request_id == "first" and "second" in engine.last_stats:
            cancel.set()

    engine.step_hook = hook
    running = engine.generate(chat(max_tokens=LONG), threading.Event(), request_id="first")
    await anext(running)
    batches = await collect(engine, chat(max_tokens=5), cancel, "second")
    assert [b.finish_reason for b in batches] == ["cancelled"]
    assert engine.last_stats["second"].decode_steps == 0
    assert engine.last_stats["first"].finish_reason is None  # still generating
    await running.aclose()
    assert (await collect(engine, chat(max_tokens=3)))[-1].completion_tokens == 3
