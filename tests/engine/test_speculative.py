"""Speculative decoding: n-gram drafts, when lookup pays, and exact greedy text in the engine."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from provider.engine.job import RequestStats, StepKind
from provider.engine.speculative import MARGIN, LookupCosts, LookupStats, NgramIndex
from provider.openai.request import ChatCompletionRequest, ChatMessage
from provider.testing.model import build_test_model
from tests.engine.conftest import MakeEngine
from tests.engine.helpers import chat, collect, text_of


def test_ngram_index_drafts_what_followed_the_latest_earlier_occurrence() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 1, 2, 3])
    # Tail (1, 2, 3) occurred at the start, followed by 4, 5, 9.
    assert index.draft(3) == [4, 5, 9]
    assert index.draft(1) == [4]
    assert index.draft(0) == []
    index.append(4)
    # Tail (2, 3, 4): latest earlier occurrence is at 6, followed by 7, 8.
    assert index.draft(5) == [7, 8, 1, 2, 3]


def test_ngram_index_falls_back_to_shorter_ngrams_and_never_matches_its_own_tail() -> None:
    index = NgramIndex([5, 6, 7])
    assert index.draft(2) == []  # no earlier occurrence of anything
    index.append(6)
    assert index.draft(2) == [7, 6]  # (6,) occurred at 1
    assert NgramIndex([1]).draft(3) == []


def test_lookup_pays_only_when_verifying_is_cheaper_than_the_tokens_it_gives() -> None:
    # Verifying 3 drafts costs what one plain step does (Metal-like): it pays.
    cheap = LookupCosts(plain_s=0.010, verify_s=(0.010, 0.010, 0.011, 0.012))
    assert cheap.pays()
    assert cheap.best_draft(0.9) == 3
    assert cheap.best_draft(0.0) == 0
    # A forward pass costs as much per token as steps do (this CPU): never.
    linear = LookupCosts(plain_s=0.010, verify_s=(0.010, 0.020, 0.030, 0.040))
    assert not linear.pays()
    assert linear.best_draft(0.999) == 0
    # "on": drafting always wins.
    forced = LookupCosts(math.inf, (1.0,) * 4)
    assert forced.best_draft(0.0) == 3


def test_best_draft_weighs_expected_accepted_tokens() -> None:
    costs = LookupCosts(plain_s=0.010, verify_s=(0.010, 0.012, 0.014, 0.030))
    # At acceptance a, a round of k drafts yields (1 - a^(k+1)) / (1 - a) tokens.
    a = 0.8
    rates = [(1 - a ** (k + 1)) / (1 - a) / costs.verify_s[k] for k in range(1, 4)]
    best = max(range(3), key=lambda i: rates[i]) + 1
    assert costs.best_draft(a) == best
    assert rates[best - 1] > MARGIN / costs.plain_s


def test_acceptance_leans_on_the_prior_until_there_is_evidence() -> None:
    stats = LookupStats()
    assert 0.5 < stats.acceptance < 0.7
    stats.drafted, stats.accepted = 4, 0
    assert 0.2 < stats.acceptance < 0.6
    stats.drafted, stats.accepted = 100, 10
    assert stats.acceptance == 0.1


# -- in the engine -------------------------------------------------------------

REPEAT = "the lamp turns and the light goes round; " * 12


@pytest.fixture(scope="session")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same size, same tokenizer, other weights: a draft that is mostly wrong.
    return build_test_model(tmp_path_factory.mktemp("draft") / "tiny", size="tiny", seed=1)


@pytest.mark.parametrize("mode", ["lookup", "same-draft", "other-draft"])
async def test_greedy_text_is_the_same_with_speculation(
    make_engine: MakeEngine, tiny_model_dir: Path, draft_dir: Path, mode: str
) -> None:
    plain = await make_engine(ignore_eos=True, prompt_lookup="off", prompt_cache_bytes=0)
    options: dict[str, Any] = {"prompt_lookup": "on"}
    if mode == "same-draft":  # every draft right: the most tokens per round
        options = {"draft_model": tiny_model_dir, "num_draft_tokens": 3}
    elif mode == "other-draft":  # drafts mostly wrong: every correction path
        options = {"draft_model": draft_dir, "num_draft_tokens": 2}
    fast = await make_engine(ignore_eos=True, prompt_cache_bytes=0, **options)
    for i, content in enumerate([REPEAT, "Tell me about lighthouses.", REPEAT + " again"]):
        req = chat(content, max_tokens=48)
        expected = await collect(plain, req, request_id=f"p{i}")
        got = await collect(fast, req, request_id=f"s{i}")
        assert text_of(got) == text_of(expected)
        assert got[-1].completion_tokens == 48
        assert fast.last_stats[f"s{i}"].token_ids == plain.last_stats[f"p{i}"].token_ids
        assert fast.last_stats[f"s{i}"].speculation == mode.split("-")[-1]
    stats = fast.last_stats["s0"]
    assert stats.drafted > 0
    if mode != "other-draft":
        assert stats.accepted > 0


async def test_sampled_requests_do_not_speculate(make_engine: MakeEngine) -> None:
    engine = await make_engine(ignore_eos=True, prompt_lookup="on")
    req = chat(REPEAT, max_tokens=16, temperature=0.7, seed=3)
    await collect(engine, req, request_id="sampled")
    assert engine.last_stats["sampled"].speculation is None
    await collect(engine, chat(REPEAT, max_tokens=16), request_id="greedy")
    assert engine.last_stats["greedy"].speculation == "lookup"


async def test_batched_engines_do_not_speculate(make_engine: MakeEngine) -> None:
    engine = await make_engine(max_concurrency=2, ignore_eos=True, prompt_lookup="on")
    await collect(engine, chat(REPEAT, max_tokens=8), request_id="b")
    assert engine.last_stats["b"].speculation is None


async def test_cancel_reaches_a_speculating_request_within_one_token(
    make_engine: MakeEngine, tiny_model_dir: Path
) -> None:
    # A draft that is always right: each round yields 5 tokens, and the
    # cancel still lands on the very token it was set at.
    engine = await make_engine(ignore_eos=True, draft_model=tiny_model_dir, num_draft_tokens=4)
    cancel = threading.Event()

    def stop_at_ten(stats: RequestStats, kind: StepKind) -> None:
        if kind == "decode" and stats.decode_steps == 10:
            cancel.set()

    engine.step_hook = stop_at_ten
    batches = await collect(engine, chat(REPEAT, max_tokens=400), cancel, request_id="c")
    assert batches[-1].finish_reason == "cancelled"
    assert engine.last_stats["c"].decode_steps == 10
    assert engine.last_stats["c"].accepted > 0


async def test_speculation_starts_from_a_cached_prefix(
    make_engine: MakeEngine, draft_dir: Path
) -> None:
    plain = await make_engine(ignore_eos=True, prompt_lookup="off", prompt_cache_bytes=0)
    engine = await make_engine(ignore_eos=True, draft_model=draft_dir)
    first = chat(REPEAT, max_tokens=12)
    await collect(engine, first)
    second = ChatCompletionRequest(
        messages=[
            *first.messages,
            ChatMessage(role="assistant", content="yes"),
            ChatMessage(role="user", content="more"),
        ],
        max_tokens=24,
    )
    got = await collect(engine, second)
    assert got[-1].cached_tokens > 0
    assert text_of(got) == text_of(await collect(plain, second))


async def test_quantized_kv_cache(make_engine: MakeEngine) -> None:
    from mlx_lm.models.cache import QuantizedKVCache

    engine = await make_engine(
        max_concurrency=4, ignore_eos=True, kv_bits=8, kv_group_size=32, quantized_kv_start=0
    )
    assert not engine._batched  # quantized caches do not merge: one at a time
    results = await asyncio.gather(
        *(collect(engine, chat(f"q{i}", max_tokens=20)) for i in range(4))
    )
    assert all(r[-1].completion_tokens == 20 for r in results)
    await engine.settled()
    cache = engine.prompt_cache
    assert cache is not None and len(cache) == 4
    hit = cache.fetch([*engine._encode(chat("q1")), 1, 2])
    assert hit.cache is not None and all(isinstance(c, QuantizedKVCache) for c in hit.cache)
    # 8-bit keys and values plus a float32 scale and bias per 32: well under float32's bytes.
    memory = engine.memory_status()
    assert memory is not None
    per_token = cache.nbytes / sum(len(k) for k in cache.keys())
    assert per_token < memory.kv_bytes_per_token * 0.5
