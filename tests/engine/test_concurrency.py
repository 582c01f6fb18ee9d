"""Continuous batching, the thread->loop hand-off and event-loop responsiveness."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import pytest

from provider.engine.mlx import MlxEngine
from provider.openai.request import ChatCompletionRequest
from tests.engine.helpers import chat, collect, text_of


def mixed_requests(n: int, **fields: Any) -> list[ChatCompletionRequest]:
    """Requests with different prompt lengths and limits."""
    return [
        chat(f"Request {i}: " + "tell me more " * (3 * i), max_tokens=30 + 7 * i, **fields)
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [2, 4])
async def test_concurrent_greedy_matches_single(
    engine: MlxEngine, batch_engine: MlxEngine, n: int
) -> None:
    requests = mixed_requests(n)
    singles = [text_of(await collect(engine, r)) for r in requests]
    results = await asyncio.gather(*(collect(batch_engine, r) for r in requests))
    for request, single, batches in zip(requests, singles, results, strict=True):
        assert batches[-1].finish_reason == "length"
        assert batches[-1].completion_tokens == request.max_tokens
        assert text_of(batches) == single
    assert batch_engine.active == 0


async def test_concurrent_seeded_sampling_keeps_per_request_state(
    engine: MlxEngine, batch_engine: MlxEngine
) -> None:
    requests = [
        chat("Same prompt", temperature=1.0, seed=seed, max_tokens=40) for seed in (1, 2, 1, 3)
    ]
    singles = [text_of(await collect(engine, r)) for r in requests]
    results = await asyncio.gather(*(collect(batch_engine, r) for r in requests))
    assert [text_of(b) for b in results] == singles
    assert singles[0] == singles[2] != singles[1]


async def test_batching_interleaves_and_prefills_in_arrival_order(
    batch_engine: MlxEngine,
) -> None:
    requests = [chat("word " * 200, max_tokens=100) for _ in range(4)]
    ids = [f"b{i}" for i in range(4)]
    events: list[tuple[str, str]] = []
    batch_engine.step_hook = lambda stats, kind: events.append((stats.request_id, kind))
    await asyncio.gather(
        *(collect(batch_engine, r, None, i) for r, i in zip(requests, ids, strict=True))
    )
    # Each request has its first token before the next one's prefill starts.
    firsts = [e for i, e in enumerate(events) if e not in events[:i]]
    assert firsts == [(i, kind) for i in ids for kind in ("prefill", "decode")]
    for n, rid in enumerate(ids):
        chunks = [i for i, e in enumerate(events) if e == (rid, "prefill")]
        # The first token comes out of the last prefill chunk's turn, with no
        # batch step in between.
        assert events[chunks[-1] + 1] == (rid, "decode")
        # Between two chunks, at most one decode step of each request already
        # running: its tokens go out before the next chunk runs.
        for a, b in itertools.pairwise(chunks):
            between = events[a + 1 : b]
            assert all(kind == "decode" and r in ids[:n] for r, kind in between)
            assert len(between) == len(set(between)) <= n
        # The same before the next prompt's first chunk, this one included.
        if n + 1 < len(ids):
            between = events[chunks[-1] + 2 : events.index((ids[n + 1], "prefill"))]
            assert all(kind == "decode" and r in ids[: n + 1] for r, kind in between)
            assert len(between) == len(set(between)) <= n + 1
    stats = [batch_engine.last_stats[i] for i in ids]
    first_tokens = [s.first_token_at for s in stats]
    assert all(t is not None for t in first_tokens)
    assert first_tokens == sorted(first_tokens)  # type: ignore[type-var]
    # All four were decoding at the same time: continuous batching, not a queue.
    assert max(first_tokens) < min(s.finished_at for s in stats)  # type: ignore[type-var,operator]


async def test_handoff_is_batched_when_the_loop_is_busy(engine: MlxEngine) -> None:
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        batches = []
        async for batch in engine.generate(chat(max_tokens=400), threading.Event()):
            batches.append(batch)
            time.sleep(0.02)  # noqa: ASYNC251 -- a busy loop: tokens pile up meanwhile
    finally:
        del loop.call_soon_threadsafe  # type: ignore[method-assign]
    assert batches[-1].completion_tokens == 400
    # One wake-up per batch, not one per token.
    assert wakeups <= len(batches) + 1
    assert len(batches) < 400 / 4


@pytest.mark.parametrize("concurrency", [1, 4], ids=["single", "batched"])
async def test_event_loop_stays_responsive(make_engine: Any, concurrency: int) -> None:
    # The whole prompt is one prefill call, so running model code on the loop
    # would stall it for that call (about a second for the tiny model on a
    # 2-core CPU) at least.
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True, prefill_step_size=2048)
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    # A long prefill then a long decode, alongside a second request when batching.
    requests = [chat("word " * 1500, max_tokens=600)] * min(concurrency, 2)
    started = loop.time()
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    elapsed = loop.time() - started
    done.set()
    await task
    assert all(b[-1].completion_tokens == 600 for b in results)
    assert len(gaps) > 50
    # Typically a few ms; the margin absorbs a loaded machine descheduling us.
    assert max(gaps) < min(0.25, elapsed / 4), f"event loop stalled for {max(gaps) * 1e3:.0f} ms"
