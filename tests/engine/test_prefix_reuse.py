"""The prefix cache and the memory budget in the real engine, on the tiny model."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import pytest

from provider.engine import TokenBatch
from provider.engine.capacity import KV_STEP
from provider.engine.job import RequestStats, StepKind
from provider.engine.mlx import MlxEngine
from provider.openai.request import ChatCompletionRequest, ChatMessage
from tests.engine.conftest import MakeEngine
from tests.engine.helpers import collect, text_of

SYSTEM = "You are a careful assistant who answers in short sentences. " * 6


def messages(*turns: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in turns]  # type: ignore[arg-type]


def request(turns: list[tuple[str, str]], max_tokens: int = 12) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=messages(*turns), max_tokens=max_tokens)


async def chat_script(engine: MlxEngine) -> list[TokenBatch]:
    """A conversation of three turns, another buyer with the same system prompt, a repeat."""
    turns = [("system", SYSTEM), ("user", "Where do lighthouses stand?")]
    lasts = []
    texts = []
    for question in ("And who keeps them?", "Are they still needed?"):
        batches = await collect(engine, request(turns))
        texts.append(text_of(batches))
        lasts.append(batches[-1])
        turns += [("assistant", texts[-1]), ("user", question)]
    batches = await collect(engine, request(turns))
    texts.append(text_of(batches))
    lasts.append(batches[-1])
    other = [("system", SYSTEM), ("user", "What is a fog horn?")]
    for _ in range(2):  # the second time the very same prompt
        batches = await collect(engine, request(other))
        texts.append(text_of(batches))
        lasts.append(batches[-1])
    for last, text in zip(lasts, texts, strict=True):
        last.text = text  # keep each request's whole text on its last batch
    return lasts


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_greedy_outputs_equal_with_and_without_the_cache(
    make_engine: MakeEngine, concurrency: int
) -> None:
    cached = await make_engine(max_concurrency=concurrency, ignore_eos=True, prompt_lookup="off")
    plain = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prompt_lookup="off", prompt_cache_bytes=0
    )
    with_cache = await chat_script(cached)
    without = await chat_script(plain)
    assert [b.text for b in with_cache] == [b.text for b in without]
    assert all(b.cached_tokens == 0 for b in without)
    hits = [b.cached_tokens for b in with_cache]
    assert hits[0] == 0 and all(n > 0 for n in hits[1:]), hits
    # Every request after the first reuses at least the system prompt.
    system_only = len(cached._encode(request([("system", SYSTEM), ("user", "")]))) - 8
    assert all(n >= system_only for n in hits[1:]), (hits, system_only)
    # The repeated prompt is served whole but for its last token.
    assert hits[-1] == with_cache[-1].prompt_tokens - 1
    memory = cached.memory_status()
    assert memory is not None and memory.prompt_cache_hits == len(hits) - 1
    assert memory.cached_tokens == sum(hits)
    assert plain.memory_status().prompt_cache_lookups == 0  # type: ignore[union-attr]


async def test_cached_tokens_are_the_shared_prefix_of_prompt_and_output(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(max_concurrency=1, ignore_eos=True, prompt_lookup="off")
    first = request([("system", SYSTEM), ("user", "Count to three.")])
    await collect(engine, first, request_id="t1")
    stored = engine._encode(first) + engine.last_stats["t1"].token_ids
    second = request([("system", SYSTEM), ("user", "Count to three."), ("user", "Again.")])
    batches = await collect(engine, second, request_id="t2")
    expected = common_prefix(stored, engine._encode(second)[:-1])
    assert expected > 0
    assert batches[-1].cached_tokens == engine.last_stats["t2"].cached_tokens == expected
    # Only the rest was prefilled (in time slices: how many depends on the speed).
    stats = engine.last_stats["t2"]
    assert stats.prefill_tokens == stats.prompt_tokens - 1 - expected


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_cache_bytes_never_above_the_budget(
    make_engine: MakeEngine, concurrency: int
) -> None:
    probe = await make_engine(max_concurrency=1)
    per_token = probe.memory_status().kv_bytes_per_token  # type: ignore[union-attr]
    bound = int(150 * per_token)  # about three of the requests below
    budget = int(3 * KV_STEP * per_token)  # running requests and cache together
    engine = await make_engine(
        max_concurrency=concurrency,
        ignore_eos=True,
        prompt_lookup="off",
        prompt_cache_bytes=bound,
        memory_budget_bytes=budget,
    )
    cache, capacity = engine.prompt_cache, engine._capacity
    assert cache is not None and capacity is not None
    seen: list[int] = []

    def check(stats: RequestStats, kind: StepKind) -> None:
        # On the generation thread, between steps: the books are consistent here.
        seen.append(cache.nbytes)
        assert cache.nbytes <= bound
        assert cache.nbytes + capacity.reserved <= budget

    engine.step_hook = check
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    requests = [
        request([("user", f"{w} " * (3 + 2 * i))], max_tokens=8) for i, w in enumerate(words)
    ]
    for at in range(0, len(requests), concurrency):
        await asyncio.gather(*(collect(engine, r) for r in requests[at : at + concurrency]))
        await engine.settled()
    assert max(seen) > 0 and cache.evictions > 0
    assert cache.nbytes <= bound


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_cancelled_prefill_keeps_what_it_prefilled(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine = await make_engine(
        max_concurrency=concurrency, ignore_eos=True, prefill_step_size=16, prompt_lookup="off"
    )
    long = request([("user", "lighthouse keeper " * 40)], max_tokens=4)
    cancel = threading.Event()

    def stop_after_three_chunks(stats: RequestStats, kind: StepKind) -> None:
        if stats.request_id == "cut" and stats.prefill_chunks == 3:
            cancel.set()

    engine.step_hook = stop_after_three_chunks
    batches = await collect(engine, long, cancel, request_id="cut")
    assert batches[-1].finish_reason == "cancelled"
    engine.step_hook = None
    cut = engine.last_stats["cut"]
    # The cancel ended it right after the chunk it was set in.
    assert cut.prefill_chunks == 3 and 3 <= cut.prefill_tokens <= 3 * 16
    again = await collect(engine, long, request_id="again")
    # Chunks are sized by time (at most prefill_step_size): as many as were prefilled.
    assert again[-1].cached_tokens == cut.prefill_tokens


async def test_warm_up_keeps_nothing(engine: MlxEngine) -> None:
    assert engine.prompt_cache is not None
    before = len(engine.prompt_cache)
    await engine.warm_up()
    await engine.settled()
    assert len(engine.prompt_cache) == before
    await collect(engine, request([("user", "x")], max_tokens=2))
    await engine.settled()
    assert len(engine.prompt_cache) == before + 1


async def test_a_request_that_does_not_fit_beside_another_waits_in_order(
    make_engine: MakeEngine,
) -> None:
    probe = await make_engine(max_concurrency=1)
    per_token = probe.memory_status().kv_bytes_per_token  # type: ignore[union-attr]
    one = int(KV_STEP * per_token)  # a request under 256 tokens of context
    engine = await make_engine(
        max_concurrency=4, ignore_eos=True, memory_budget_bytes=2 * one - 1, prompt_lookup="off"
    )
    # The advertised context is what one request can hold.
    assert engine.info is not None and engine.info.max_context_tokens == KV_STEP
    ids = ["m1", "m2", "m3"]
    reqs = [request([("user", f"question {i}")], max_tokens=40) for i in range(3)]
    await asyncio.gather(*(collect(engine, r, None, i) for r, i in zip(reqs, ids, strict=True)))
    await engine.settled()
    stats = [engine.last_stats[i] for i in ids]
    for earlier, later in itertools.pairwise(stats):
        assert later.started_at is not None and earlier.finished_at is not None
        # One at a time, in arrival order: the next starts after the last ended.
        assert later.started_at >= earlier.finished_at
    memory = engine.memory_status()
    assert memory is not None and memory.reserved_bytes == 0 and memory.waiting_for_memory == 0


async def test_too_long_for_memory_is_refused_up_front(make_engine: MakeEngine) -> None:
    probe = await make_engine(max_concurrency=1)
    per_token = probe.memory_status().kv_bytes_per_token  # type: ignore[union-attr]
    engine = await make_engine(max_concurrency=2, memory_budget_bytes=int(KV_STEP * per_token))
    assert engine.info is not None and engine.info.max_context_tokens == KV_STEP
    from provider.engine import EngineError

    with pytest.raises(EngineError) as refused:
        await collect(engine, request([("user", "word " * 300)]))
    assert refused.value.status == "error_context_exceeded"
    assert "256 tokens" in str(refused.value)


async def test_estimated_wait_grows_with_the_work_ahead(make_engine: MakeEngine) -> None:
    engine = await make_engine(max_concurrency=1, ignore_eos=True, prompt_lookup="off")
    assert engine.estimated_wait_ms(100) == 0
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    engine.step_hook = lambda stats, kind: loop.call_soon_threadsafe(started.set)
    cancel = threading.Event()
    task = asyncio.create_task(collect(engine, request([("user", "go")], max_tokens=3000), cancel))
    await started.wait()
    busy = engine.estimated_wait_ms(100)
    assert busy > 0
    cancel.set()
    await task
    assert engine.estimated_wait_ms(100) == 0


async def test_memory_status_shapes(engine: MlxEngine) -> None:
    memory = engine.memory_status()
    assert memory is not None
    # tiny llama: 2 layers x 2 KV heads x 32 dims x (K and V) x float32.
    assert memory.kv_bytes_per_token == 2 * 2 * 32 * 2 * 4
    assert memory.budget_bytes > 0 and memory.prompt_cache_max_bytes > 0
    assert memory.hit_rate == 0.0 and memory.token_hit_rate == 0.0


async def test_a_wait_for_memory_past_the_limit_is_refused_queue_full(
    make_engine: MakeEngine,
) -> None:
    probe = await make_engine(max_concurrency=1)
    per_token = probe.memory_status().kv_bytes_per_token  # type: ignore[union-attr]
    engine = await make_engine(
        max_concurrency=2,
        ignore_eos=True,
        memory_budget_bytes=int(16 * KV_STEP * per_token),  # one request of 4096 tokens
        max_queue_wait_s=0.5,
        prompt_lookup="off",
    )
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    engine.step_hook = lambda stats, kind: loop.call_soon_threadsafe(started.set)
    cancel = threading.Event()
    long = asyncio.create_task(collect(engine, request([("user", "go")], max_tokens=4000), cancel))
    await started.wait()
    from provider.engine import EngineError

    with pytest.raises(EngineError) as refused:
        # Thousands of tokens to go ahead of it: far more than half a second.
        await collect(engine, request([("user", "me too")], max_tokens=4000))
    assert refused.value.status == "error_queue_full" and refused.value.retryable
    assert "KV memory" in str(refused.value)
    cancel.set()
    await long


@pytest.mark.slow
async def test_a_real_second_turn_reuses_the_first_turn_and_its_answer(smollm2_dir: Path) -> None:
    """SmolLM2: the answer's tokens come back through the chat template as they were
    generated, so the second turn reuses the first prompt *and* the answer; and its
    greedy tokens are mlx-lm's for the whole prompt, prefilled from scratch."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    engine = MlxEngine(smollm2_dir, prompt_lookup="off", record_token_ids=True)
    await engine.load()
    try:
        turns = [("user", "What is the capital of France? One short sentence.")]
        first = await collect(engine, request(turns, max_tokens=10), request_id="t1")
        turns += [("assistant", text_of(first)), ("user", "And of Italy?")]
        second_request = request(turns, max_tokens=10)
        second = await collect(engine, second_request, request_id="t2")
        answered = first[-1].prompt_tokens + len(engine.last_stats["t1"].token_ids)
        assert second[-1].cached_tokens >= answered
        assert "Paris" in text_of(first) and "Rome" in text_of(second)
        prompt = engine._encode(second_request)
        cached_tokens = engine.last_stats["t2"].token_ids
    finally:
        await engine.close()
    model, _ = load(str(smollm2_dir))
    import mlx.core as mx

    steps = generate_step(
        mx.array(prompt), model, max_tokens=len(cached_tokens), sampler=lambda x: mx.argmax(x, -1)
    )
    assert [int(t) for t, _ in steps] == cached_tokens


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_logits_processors_see_the_cached_prompt_too(
    make_engine: MakeEngine, concurrency: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Penalties read the tokens so far, prompt included (repetition: the last
    # 20). The same request twice: the second time all of its prompt but the
    # last token comes from the cache, and the processors must still see it.
    import provider.engine.mlx as mlx_module

    seen: list[int] = []

    def recording(tokens: object, logits: object) -> object:
        seen.append(len(tokens))  # type: ignore[arg-type]
        return logits

    options = mlx_module.request_options

    def with_recorder(*args: object, **kwargs: object) -> dict:
        out = options(*args, **kwargs)  # type: ignore[arg-type]
        out["logits_processors"] = [recording]
        return out

    monkeypatch.setattr(mlx_module, "request_options", with_recorder)
    engine = await make_engine(max_concurrency=concurrency, ignore_eos=True, prompt_lookup="off")
    body = request([("user", "red green blue red green blue")], max_tokens=3)
    first = await collect(engine, body)
    prompt = first[-1].prompt_tokens
    assert seen[:3] == [prompt, prompt + 1, prompt + 2]
    seen.clear()
    again = await collect(engine, body)
    assert again[-1].cached_tokens == prompt - 1
    assert seen[:3] == [prompt, prompt + 1, prompt + 2]
    assert text_of(again) == text_of(first)
