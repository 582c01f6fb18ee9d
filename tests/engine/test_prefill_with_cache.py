"""Time-sliced prefill and the prefix cache together, on the real engine.

A second turn starts from the cache and prefills only what is new, in
slices; a cancel during that prefill ends the request after the slice in
flight and leaves the cache filled that far; greedy text is the same with
and without the cache and with and without slicing; a draft model's cache
is prefilled in slices too. Steps are counted through ``step_hook`` and
``last_stats``, never timed.

A turn 1 of a few dozen tokens leaves the pacer having timed chunks of at
most that size, and it at most doubles the size from one chunk to the next,
so turn 2's hundreds of new tokens take several chunks on any machine.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest

from provider.engine import TokenBatch
from provider.engine.mlx import MlxEngine, RequestStats
from provider.openai.request import ChatCompletionRequest, ChatMessage
from tests.engine.conftest import MakeEngine
from tests.engine.helpers import collect, text_of

CONCURRENCY = pytest.mark.parametrize("concurrency", [1, 4], ids=["single", "batched"])
SLICE_MS = 20.0
FIRST = [("system", "You keep a lighthouse."), ("user", "Where do lighthouses stand?")]
MORE = "tell me more about the lamp and the lens " * 30  # ~600 new tokens here


def turn(turns: list[tuple[str, str]], max_tokens: int = 8) -> ChatCompletionRequest:
    messages = [ChatMessage(role=role, content=text) for role, text in turns]  # type: ignore[arg-type]
    return ChatCompletionRequest(messages=messages, max_tokens=max_tokens)


async def second_turn(engine: MlxEngine, tag: str = "") -> tuple[ChatCompletionRequest, str]:
    """Run turn 1; return turn 2 (turn 1, its answer, a long question) and turn 1's text."""
    answer = text_of(await collect(engine, turn(FIRST), None, f"t1{tag}"))
    await engine.settled()  # turn 1's cache is stored once the thread is done with it
    return turn([*FIRST, ("assistant", answer), ("user", MORE)], max_tokens=12), answer


class PrefillLog:
    """A step hook recording each prefill chunk's size per request."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[int]] = {}

    def __call__(self, stats: RequestStats, kind: str) -> None:
        if kind == "prefill":
            sizes = self.chunks.setdefault(stats.request_id, [])
            sizes.append(stats.prefill_tokens - sum(sizes))


@CONCURRENCY
async def test_a_second_turn_prefills_only_the_rest_in_slices(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prefill_slice_ms=SLICE_MS,
        prompt_lookup="off",
    )  # fmt: skip
    log = PrefillLog()
    engine.step_hook = log
    second, _ = await second_turn(engine)
    batches = await collect(engine, second, None, "t2")
    stats = engine.last_stats["t2"]
    rest = stats.prompt_tokens - 1 - stats.cached_tokens
    # It started from turn 1 (its prompt at least) ...
    assert batches[-1].cached_tokens == stats.cached_tokens >= len(engine._encode(turn(FIRST))) - 1
    # ... and prefilled the rest alone, in several slices, none of them all of it.
    assert rest > 200
    assert sum(log.chunks["t2"]) == stats.prefill_tokens == rest
    assert len(log.chunks["t2"]) >= 3 and max(log.chunks["t2"]) < rest


@CONCURRENCY
async def test_greedy_text_is_the_same_with_and_without_cache_and_slicing(
    make_engine: MakeEngine, concurrency: int
) -> None:
    texts = []
    for cache_bytes, slice_ms in [(None, SLICE_MS), (None, 0), (0, SLICE_MS), (0, 0)]:
        engine = await make_engine(
            max_concurrency=concurrency, ignore_eos=True, prompt_lookup="off",
            prompt_cache_bytes=cache_bytes, prefill_slice_ms=slice_ms,
        )  # fmt: skip
        second, answer = await second_turn(engine)
        got = await collect(engine, second, None, "t2")
        texts.append((answer, text_of(got)))
        stats = engine.last_stats["t2"]
        assert (stats.cached_tokens > 0) == (cache_bytes is None)
        fixed_chunks = math.ceil(stats.prefill_tokens / 512)  # prefill_step_size
        assert (stats.prefill_chunks > fixed_chunks) == (slice_ms > 0)
        await engine.close()
    assert all(t == texts[0] for t in texts), texts


@CONCURRENCY
async def test_a_cancel_during_a_cached_prefill_ends_within_one_slice_and_keeps_it(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prefill_slice_ms=SLICE_MS,
        prompt_lookup="off",
    )  # fmt: skip
    plain = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prompt_lookup="off", prompt_cache_bytes=0
    )
    second, _ = await second_turn(engine)
    cancel = threading.Event()
    log = PrefillLog()

    def hook(stats: RequestStats, kind: str) -> None:
        log(stats, kind)
        if stats.request_id == "cut" and kind == "prefill" and stats.prefill_chunks == 2:
            cancel.set()  # on the generation thread, right after the second slice

    engine.step_hook = hook
    batches = await collect(engine, second, cancel, "cut")
    cut = engine.last_stats["cut"]
    assert batches == [
        TokenBatch("", cut.prompt_tokens, 0, "cancelled", cached_tokens=cut.cached_tokens)
    ]
    # Not one more slice after the cancel, and two slices are far from the rest.
    assert cut.prefill_chunks == 2 and cut.decode_steps == 0
    assert 0 < cut.prefill_tokens < cut.prompt_tokens - 1 - cut.cached_tokens
    assert engine.active == 0
    await engine.settled()

    # Its cache was kept as far as it was filled: the hit before it, plus its two slices.
    engine.step_hook = None
    again = await collect(engine, second, None, "again")
    assert again[-1].cached_tokens == cut.cached_tokens + cut.prefill_tokens
    assert engine.last_stats["again"].prefill_tokens == (
        cut.prompt_tokens - 1 - cut.cached_tokens - cut.prefill_tokens
    )
    assert text_of(again) == text_of(await collect(plain, second))


async def test_a_draft_model_cache_is_prefilled_in_slices_and_cancel_is_seen_there(
    make_engine: MakeEngine, tiny_model_dir: Path
) -> None:
    # The model as its own draft: every draft is right if (and only if) the
    # draft's cache holds the same prompt as the model's.
    engine = await make_engine(
        ignore_eos=True, prefill_slice_ms=SLICE_MS, draft_model=tiny_model_dir, num_draft_tokens=3
    )
    plain = await make_engine(ignore_eos=True, prompt_lookup="off", prompt_cache_bytes=0)
    second, _ = await second_turn(engine)
    log: list[tuple[int, int]] = []  # (prefill_chunks, prefill_tokens) at each prefill step
    cancel = threading.Event()
    target: dict[str, int] = {}

    def hook(stats: RequestStats, kind: str) -> None:
        if kind != "prefill" or stats.request_id not in ("cut", "whole"):
            return
        log.append((stats.prefill_chunks, stats.prefill_tokens))
        main = stats.prompt_tokens - 1 - stats.cached_tokens
        if stats.request_id == "cut" and stats.prefill_tokens == main:
            # The model's cache is full; the draft's slices follow. Cancel after its second.
            target.setdefault("at", stats.prefill_chunks + 2)
            if stats.prefill_chunks == target["at"]:
                cancel.set()

    engine.step_hook = hook
    batches = await collect(engine, second, cancel, "cut")
    cut = engine.last_stats["cut"]
    assert batches[-1].finish_reason == "cancelled" and cut.decode_steps == 0
    assert cut.prefill_chunks == target["at"]  # no slice after the cancel
    assert cut.speculation is None  # it never decoded
    await engine.settled()

    # The model's cache was kept whole (the draft's, cut short, was not).
    log.clear()
    whole = await collect(engine, second, None, "whole")
    stats = engine.last_stats["whole"]
    assert whole[-1].cached_tokens == stats.prompt_tokens - 1
    assert stats.prefill_tokens == 0
    # The draft model's cache, not in the entry, was prefilled from the start in slices.
    assert len(log) >= 3 and stats.prefill_chunks == len(log)
    assert stats.speculation == "draft"
    assert stats.accepted >= stats.drafted * 0.8 > 0
    assert text_of(whole) == text_of(await collect(plain, second))
