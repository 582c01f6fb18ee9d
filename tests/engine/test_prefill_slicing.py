"""Time-sliced prefill on the real engine: streams keep decoding, cancels land within a slice.

Everything here counts steps (through ``step_hook`` and ``last_stats``)
rather than timing them. A fresh engine's pacer starts from a chunk of a
few tokens and at most doubles it from one chunk to the next, so a prompt of
1,500 tokens takes at least 9 chunks on any machine (3, 7, 15, ... 511 add
up to 1,012), against 3 chunks of the fixed 512-token step.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading

import pytest

from provider.engine import TokenBatch
from provider.engine.mlx import MlxEngine, RequestStats, default_slice_ms
from tests.engine.conftest import MakeEngine
from tests.engine.helpers import chat, collect, text_of

CONCURRENCY = pytest.mark.parametrize("concurrency", [1, 4], ids=["single", "batched"])
LONG_PROMPT = "word " * 1500  # ~1,500 tokens: 3 chunks of the default 512
SLICE_MS = 20.0  # about a hundred tokens of the tiny model on an idle CPU


class ChunkLog:
    """A step hook that records every step and each prefill chunk's size."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.chunks: dict[str, list[int]] = {}

    def __call__(self, stats: RequestStats, kind: str) -> None:
        self.events.append((stats.request_id, kind))
        if kind == "prefill":
            sizes = self.chunks.setdefault(stats.request_id, [])
            sizes.append(stats.prefill_tokens - sum(sizes))


async def test_running_stream_decodes_between_every_chunk_of_a_newcomer(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(max_concurrency=4, ignore_eos=True, prefill_slice_ms=SLICE_MS)
    log = ChunkLog()
    engine.step_hook = log
    running = engine.generate(chat(max_tokens=3000), threading.Event(), request_id="A")
    await anext(running)
    newcomer = chat(LONG_PROMPT, max_tokens=4)
    prompt_tokens = engine.count_tokens(newcomer)
    batches = await collect(engine, newcomer, None, "B")
    await running.aclose()

    assert batches[-1].completion_tokens == 4
    chunks = [i for i, e in enumerate(log.events) if e == ("B", "prefill")]
    # Sliced: many more chunks than the 3 that prefill_step_size alone would make.
    assert len(chunks) > 2 * math.ceil((prompt_tokens - 1) / 512)
    assert sum(log.chunks["B"]) == engine.last_stats["B"].prefill_tokens == prompt_tokens - 1
    assert max(log.chunks["B"]) < 512
    # Between any two chunks, exactly one decode step of the running stream.
    for a, b in itertools.pairwise(chunks):
        assert log.events[a + 1 : b] == [("A", "decode")]
    # B's first token comes in the turn of its last chunk.
    assert log.events[chunks[-1] + 1] == ("B", "decode")


@CONCURRENCY
async def test_cancel_during_a_long_prefill_ends_within_one_slice(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prefill_slice_ms=SLICE_MS
    )
    cancel = threading.Event()
    log = ChunkLog()

    def hook(stats: RequestStats, kind: str) -> None:
        log(stats, kind)
        if kind == "prefill" and stats.prefill_chunks == 3:
            cancel.set()  # on the generation thread, right after chunk 3

    engine.step_hook = hook
    request = chat(LONG_PROMPT, max_tokens=10)
    prompt_tokens = engine.count_tokens(request)
    batches = await collect(engine, request, cancel, "p")
    stats = engine.last_stats["p"]
    assert batches == [TokenBatch("", prompt_tokens, 0, "cancelled")]
    # Not one more chunk after the cancel, and each chunk was a slice, far
    # short of the prompt (or of a 512-token step).
    assert stats.prefill_chunks == 3
    assert max(log.chunks["p"]) < 512
    assert stats.prefill_tokens < prompt_tokens / 4
    assert stats.decode_steps == 0
    assert engine.active == 0


@CONCURRENCY
async def test_without_slicing_chunks_are_the_step_size(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prefill_slice_ms=0, prefill_step_size=512
    )
    request = chat(LONG_PROMPT, max_tokens=2)
    prompt_tokens = engine.count_tokens(request)
    await collect(engine, request, None, "fixed")
    stats = engine.last_stats["fixed"]
    assert stats.prefill_chunks == math.ceil((prompt_tokens - 1) / 512)
    assert engine.timings().prefill_slice_s is None
    assert engine.timings().prefill_chunk_tokens == (prompt_tokens - 1) % 512


@CONCURRENCY
async def test_sliced_prefill_generates_what_fixed_chunks_do(
    make_engine: MakeEngine, concurrency: int
) -> None:
    fixed = await make_engine(max_concurrency=concurrency, ignore_eos=True, prefill_slice_ms=0)
    sliced = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prefill_slice_ms=SLICE_MS
    )
    requests = [chat(f"{i}: " + "tell me more " * 100, max_tokens=20) for i in range(3)]
    for request in requests:
        want = await collect(fixed, request)
        got = await collect(sliced, request, None, "s")
        assert text_of(got) == text_of(want)
        assert sliced.last_stats["s"].prefill_chunks > 1


async def test_timings_report_inter_token_latency_and_the_slice(make_engine: MakeEngine) -> None:
    engine = await make_engine(max_concurrency=4, ignore_eos=True, prefill_slice_ms=SLICE_MS)
    before = engine.timings()
    assert before.inter_token_samples == 0 and before.inter_token_p50_s is None
    results = await asyncio.gather(
        *(collect(engine, chat(f"{i} " + "word " * 50, max_tokens=40)) for i in range(3))
    )
    assert all(r[-1].completion_tokens == 40 for r in results)
    t = engine.timings()
    assert t.inter_token_samples == 3 * 39
    assert t.inter_token_p50_s is not None and t.inter_token_p99_s is not None
    assert 0 < t.inter_token_p50_s <= t.inter_token_p99_s <= (t.inter_token_max_s or 0)
    worst = max(engine.last_stats[r].max_gap_s for r in list(engine.last_stats)[-3:])
    assert t.inter_token_max_s == worst
    assert t.prefill_slice_s == SLICE_MS / 1000
    assert t.prefill_chunk_tokens is not None and t.prefill_chunk_tokens >= 1
    assert t.prefill_tokens_per_s is not None and t.prefill_tokens_per_s > 0


async def test_the_default_slice_is_100ms_or_3_decode_steps(make_engine: MakeEngine) -> None:
    assert default_slice_ms(1000.0) == 100.0  # a fast model: 3 steps are 3 ms
    assert default_slice_ms(7.0) == pytest.approx(428.6, abs=0.1)  # SmolLM2 on this CPU
    assert default_slice_ms(0.0) == 100.0  # nothing measured
    engine: MlxEngine = await make_engine()
    assert engine.prefill_slice_ms is None
    info = engine.info
    assert info is not None
    expected = default_slice_ms(info.throughput_tps_estimate)
    assert engine.timings().prefill_slice_s == pytest.approx(expected / 1000, rel=0.05)


async def test_logits_processors_see_the_whole_prompt_in_both_schedulers(
    make_engine: MakeEngine,
) -> None:
    # A repetition penalty counts the last 20 tokens, prompt included. The
    # sequential scheduler prefills before generate_step, which alone would
    # show its processors only the last prompt token; with a prefix cache hit
    # that part never runs at all. Each prompt ends with
    # the model's own greedy continuation, so the penalty changes the answer.
    single = await make_engine(max_concurrency=1, ignore_eos=True, prefill_slice_ms=SLICE_MS)
    batched = await make_engine(max_concurrency=4, ignore_eos=True, prefill_slice_ms=SLICE_MS)
    penalised = 0
    for i in range(4):
        prompt = f"{i} " + "tell me more " * 10
        prompt += text_of(await collect(single, chat(prompt, max_tokens=30)))
        plain = text_of(await collect(single, chat(prompt, max_tokens=12)))
        request = chat(prompt, max_tokens=12, repetition_penalty=2.0)
        one = text_of(await collect(single, request, None, f"s{i}"))
        assert one == text_of(await collect(batched, request))
        # All but the last prompt token were in the cache before generate_step
        # (the same prompt ran just before, so from the prefix cache).
        stats = single.last_stats[f"s{i}"]
        assert stats.cached_tokens > 0
        assert stats.prefill_tokens + stats.cached_tokens == stats.prompt_tokens - 1
        penalised += one != plain
    assert penalised >= 2  # the penalty did bite
