"""The prefix cache on its own: longest prefix, prefix-only copies, LRU, byte bound, hints."""

from __future__ import annotations

import random
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from provider.engine.prompt_cache import PromptCache, cache_length

LAYERS = 2
HEADS = 2
DIM = 4
#: float32 keys and values of every layer, per token.
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4


def filled(tokens: list[int], dim: int = DIM) -> list[Any]:
    """A KV cache whose keys at position i hold the token id at i (so we can read them back)."""
    cache = [KVCache() for _ in range(LAYERS)]
    ids = mx.array(tokens, dtype=mx.float32)
    kv = mx.broadcast_to(ids[None, None, :, None], (1, HEADS, len(tokens), dim))
    for layer in cache:
        layer.update_and_fetch(kv, kv)
    return cache


def held(cache: list[Any]) -> list[int]:
    """The token ids a :func:`filled` cache holds, read from its keys."""
    keys, _ = cache[0].keys_and_values() if cache[0].keys is not None else (None, None)
    if keys is None:
        return []
    return [int(x) for x in keys[0, 0, :, 0].tolist()]


def store(pc: PromptCache, tokens: list[int], **kw: Any) -> bool:
    return pc.store(tokens, filled(tokens), **kw)


def test_miss_then_longest_stored_prefix() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    assert pc.fetch([1, 2, 3]).cache is None
    store(pc, [1, 2, 3])
    store(pc, [1, 2, 3, 4, 5, 6])
    # The shorter entry went: the longer one serves its tokens too.
    assert pc.keys() == [(1, 2, 3, 4, 5, 6)]
    hit = pc.fetch([1, 2, 3, 4, 5, 9, 9])
    assert hit.tokens == 5 and held(hit.cache) == [1, 2, 3, 4, 5]
    assert cache_length(hit.cache) == 5
    assert (pc.lookups, pc.hits, pc.cached_tokens) == (2, 1, 5)


def test_the_last_prompt_token_is_never_served() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    store(pc, [7, 8, 9, 10])
    # Same tokens again: all but the last come from the cache.
    assert pc.fetch([7, 8, 9, 10]).tokens == 3
    # A prompt that is a prefix of the entry: the entry is cut to it, less one.
    assert pc.fetch([7, 8, 9]).tokens == 2
    # An entry equal to the prompt less its last token is used whole.
    store(pc, [1, 2, 3])
    hit = pc.fetch([1, 2, 3, 4])
    assert hit.tokens == 3 and held(hit.cache) == [1, 2, 3]
    assert pc.fetch([5]).tokens == 0


def test_a_copy_holds_only_the_common_prefix_and_never_changes_the_entry() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    secret = [1, 2, 3, 40, 41, 42, 43]
    store(pc, secret)
    hit = pc.fetch([1, 2, 3, 9, 9])
    assert hit.tokens == 3
    # Not even in memory: the arrays handed out are 3 tokens long.
    for layer in hit.cache:
        assert layer.keys.shape[2] == 3 and layer.values.shape[2] == 3
    # The request extends its copy; the stored entry does not move.
    mine = mx.full((1, HEADS, 2, DIM), 99.0)
    for layer in hit.cache:
        layer.update_and_fetch(mine, mine)
    assert held(hit.cache) == [1, 2, 3, 99, 99]
    again = pc.fetch([*secret, 0])
    assert held(again.cache) == secret


def test_stored_entries_are_compacted_to_their_tokens() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    cache = filled(list(range(10)))
    assert cache[0].keys.shape[2] == 256  # a running cache grows in steps of 256
    pc.store(list(range(10)), cache)
    assert pc.nbytes == 10 * TOKEN_BYTES


def test_a_cache_with_more_tokens_than_its_key_is_cut_to_the_key() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    pc.store([5, 6, 7], filled([5, 6, 7, 8, 9]))
    assert pc.nbytes == 3 * TOKEN_BYTES
    assert held(pc.fetch([5, 6, 7, 1]).cache) == [5, 6, 7]


def test_least_recently_used_goes_first() -> None:
    pc = PromptCache(max_bytes=3 * 4 * TOKEN_BYTES, max_entries=8)
    for first in (1, 2, 3):
        store(pc, [first, 0, 0, 0])
    pc.fetch([1, 0, 0, 0, 5])  # touch 1: 2 is now the oldest
    store(pc, [4, 0, 0, 0])
    assert pc.keys() == [(3, 0, 0, 0), (1, 0, 0, 0), (4, 0, 0, 0)]
    assert pc.evictions == 1


def test_entries_bound() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=2)
    for first in (1, 2, 3):
        store(pc, [first, 9])
    assert pc.keys() == [(2, 9), (3, 9)]


def test_bytes_never_above_the_bound() -> None:
    bound = 50 * TOKEN_BYTES
    pc = PromptCache(max_bytes=bound, max_entries=64)
    rng = random.Random(7)
    for _ in range(60):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        limit = rng.choice([None, rng.randrange(0, bound)])
        store(pc, tokens, limit=limit)
        assert pc.nbytes <= bound
        if limit is not None:
            assert pc.nbytes <= max(limit, 0)
        assert pc.nbytes == sum(len(k) for k in pc.keys()) * TOKEN_BYTES
        if rng.random() < 0.3:
            pc.evict_to(rng.randrange(0, bound))
        pc.fetch([*tokens, 1])
    assert pc.stores > 0 and pc.evictions > 0


def test_an_entry_bigger_than_the_bound_is_not_stored() -> None:
    pc = PromptCache(max_bytes=4 * TOKEN_BYTES, max_entries=8)
    assert store(pc, [1, 2, 3])
    assert not store(pc, [1, 2, 3, 4, 5])
    assert pc.keys() == [(1, 2, 3)]
    assert not store(pc, [9, 9], limit=TOKEN_BYTES)
    disabled = PromptCache(max_bytes=0, max_entries=8)
    assert not disabled.enabled and not store(disabled, [1, 2])


def test_a_conversation_keeps_its_newest_entry_and_the_hint_opens_nothing() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    store(pc, [1, 2, 3, 4], conversation="c1")
    # The next turn's template rewrote an earlier token: not a prefix, but the
    # same conversation, so the old entry goes.
    store(pc, [1, 2, 5, 4, 6], conversation="c1")
    assert pc.keys() == [(1, 2, 5, 4, 6)]
    store(pc, [8, 8, 8], conversation="c2")
    assert len(pc) == 2
    # Lookups never use the hint: another prompt gets only what it shares.
    assert pc.fetch([8, 1, 1]).tokens == 1
    assert pc.fetch([3, 3]).tokens == 0


def test_quantized_layers_are_copied_by_prefix_too() -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    cache = filled(list(range(64)), dim=32)
    quantized = [layer.to_quantized(group_size=32, bits=8) for layer in cache]
    pc.store(list(range(64)), quantized)
    hit = pc.fetch([*range(40), 7])
    assert hit.tokens == 40
    assert all(isinstance(layer, QuantizedKVCache) for layer in hit.cache)
    assert all(layer.keys[0].shape[2] == 40 and layer.offset == 40 for layer in hit.cache)


@pytest.mark.parametrize("draft_kept", [True, False])
def test_draft_layers_travel_with_their_entry(draft_kept: bool) -> None:
    pc = PromptCache(max_bytes=1 << 20, max_entries=8)
    tokens = [1, 2, 3, 4]
    pc.store(tokens, filled(tokens), draft=filled(tokens) if draft_kept else None)
    hit = pc.fetch([1, 2, 3, 9], draft=True)
    assert hit.tokens == 3
    assert (hit.draft is not None) == draft_kept
    if draft_kept:
        assert held(hit.draft) == [1, 2, 3]
    assert pc.fetch([1, 2, 3, 9]).draft is None  # not asked for
