"""A prefix cache across requests: start a prompt from the KV cache of its longest stored prefix.

When a request ends (finished, stopped or cancelled), its KV cache is stored
under the tokens it holds: the prompt, or as much of it as was prefilled,
plus the completion tokens the model has seen. A later prompt looks up the
longest stored prefix of itself and prefills only the rest. Chats resend
their history and agents resend long contexts, so a second turn prefills only
what is new, and a system prompt shared by many requests is prefilled once.

Lookups are by token ids alone. An entry is used only up to the tokens it
shares with the new prompt: a longer entry is cut to the common prefix
(trimmable caches only), a shorter one is used whole. The copy a request gets
holds only those tokens, so nothing of another request beyond an identical
prefix ever reaches it, not even in memory. A ``conversation`` hint (the
coordinator's ``conversation_key``, hashed) only decides what to keep: a
conversation keeps one entry, its newest, since each turn extends the last.

Memory: entries are compacted to their tokens when stored (a running KV
cache grows in steps of 256 tokens) and counted with mlx-lm's ``nbytes``.
The cache is bounded by bytes and by entries and evicts the least recently
used entry first; :meth:`PromptCache.evict_to` lets running requests take the
memory back. An entry that alone exceeds the bound is not stored.

Built on mlx-lm's :class:`~mlx_lm.models.cache.PromptTrie` rather than its
:class:`~mlx_lm.models.cache.LRUPromptCache`, which (mlx-lm 0.32) hands out
a deep copy of the whole matched entry, tokens past the common prefix
included; returns a cache with no prompt token left to run on an exact match
(a prompt needs one to give the first token's logits); orders eviction by
segment type rather than use; and keeps no hit counts. This module keeps the
trie and adds the LRU, the byte bound, prefix-only copies and counters.

Everything here runs on the generation thread; the counters may be read from
any thread.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: PromptTrie keeps one trie per model key; an engine serves one model.
_MODEL = "model"


@dataclass(eq=False, slots=True)
class _Entry:
    tokens: tuple[int, ...]
    cache: list[Any]
    draft: list[Any] | None
    nbytes: int
    conversation: str | None


@dataclass(slots=True)
class Hit:
    """What :meth:`PromptCache.fetch` found.

    ``cache`` holds the first ``tokens`` prompt tokens (None on a miss);
    ``draft`` the draft model's cache, when asked for, holding the first
    ``draft_tokens``.
    """

    cache: list[Any] | None
    draft: list[Any] | None
    tokens: int
    draft_tokens: int = 0


MISS = Hit(None, None, 0)


class PromptCache:
    """Stored KV caches keyed by token prefix, least recently used evicted first.

    ``max_bytes`` and ``max_entries`` bound it (0 disables it). Counters:
    ``lookups``, ``hits`` (lookups that reused at least one token),
    ``prompt_tokens`` (tokens looked up), ``cached_tokens`` (tokens reused),
    ``stores``, ``evictions``.
    """

    def __init__(self, *, max_bytes: int, max_entries: int) -> None:
        from mlx_lm.models.cache import PromptTrie

        self.max_bytes = max(0, max_bytes)
        self.max_entries = max(0, max_entries)
        self._trie = PromptTrie()
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._conversations: dict[str, tuple[int, ...]] = {}
        self.nbytes = 0
        self.lookups = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.stores = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries > 0

    def keys(self) -> list[tuple[int, ...]]:
        """Stored token sequences, least recently used first."""
        return list(self._entries)

    # -- lookup ----------------------------------------------------------------

    def fetch(self, tokens: Sequence[int], *, draft: bool = False) -> Hit:
        """A fresh cache holding the longest stored prefix of ``tokens[:-1]``.

        The last prompt token is never served from the cache: running it
        gives the first completion token. The copy is the caller's to extend.
        With ``draft``, the draft model's cache comes too when the entry has
        one (else the hit has ``draft`` None and the caller prefills the
        draft model from the start).
        """
        self.lookups += 1
        self.prompt_tokens += len(tokens)
        if len(tokens) < 2 or not self._entries:
            return MISS
        want = list(tokens[:-1])
        found = self._trie.search(_MODEL, want)
        best: tuple[int, _Entry] | None = None
        if found.exact is not None:
            best = (len(want), self._trie.get(_MODEL, found.exact))
        else:
            if found.shorter is not None:
                best = (len(found.shorter), self._trie.get(_MODEL, found.shorter))
            if found.longer is not None and found.common_prefix > (best[0] if best else 0):
                entry = self._trie.get(_MODEL, found.longer)
                if _trimmable(entry.cache):
                    best = (found.common_prefix, entry)
        if best is None:
            return MISS
        n, entry = best
        self._entries.move_to_end(entry.tokens)
        have = len(entry.tokens)
        cache = _prefix_copy(entry.cache, have, n)
        draft_cache = None
        if draft and entry.draft is not None and (n == have or _trimmable(entry.draft)):
            draft_cache = _prefix_copy(entry.draft, have, n)
        self.hits += 1
        self.cached_tokens += n
        return Hit(cache, draft_cache, n, n if draft_cache is not None else 0)

    # -- store -----------------------------------------------------------------

    def store(
        self,
        tokens: Sequence[int],
        cache: list[Any],
        *,
        draft: list[Any] | None = None,
        conversation: str | None = None,
        limit: int | None = None,
    ) -> bool:
        """Keep ``cache``, which holds exactly ``tokens``; returns whether it was kept.

        The cache is compacted (the caller must not use it afterwards).
        Entries whose tokens are a prefix of ``tokens`` go (this one serves
        them), and so does the previous entry of the same ``conversation``.
        Then the least recently used entries go until the cache is within
        ``max_bytes``, ``limit`` (what running requests leave, if given) and
        ``max_entries``. An entry bigger than that bound is not stored (the
        others are still brought within it).
        """
        n = len(tokens)
        cap = self.max_bytes if limit is None else min(self.max_bytes, max(0, limit))
        if n < 1 or self.max_entries < 1 or cap <= 0:
            self.evict_to(cap)
            return False
        try:
            layers = _compact(cache, n)
            draft_layers = _compact(draft, n) if draft is not None else None
            nbytes = _nbytes(layers) + (_nbytes(draft_layers) if draft_layers else 0)
        except (NotImplementedError, AttributeError, ValueError):
            # A cache type whose size or length we cannot tell: do not keep it.
            self.evict_to(cap)
            return False
        if nbytes > cap:
            self.evict_to(cap)
            return False
        key = tuple(tokens)
        if key in self._entries:
            self._remove(key)
        if conversation is not None:
            previous = self._conversations.get(conversation)
            if previous is not None and previous in self._entries:
                self._remove(previous)
        entry = _Entry(key, layers, draft_layers, nbytes, conversation)
        self._trie.add(_MODEL, list(key), entry)
        self._entries[key] = entry
        self.nbytes += nbytes
        if conversation is not None:
            self._conversations[conversation] = key
        if _trimmable(layers) and (draft_layers is None or _trimmable(draft_layers)):
            for length, prefix in self._trie.pop_prefixes(_MODEL, list(key)):
                self._forget(key[:length], prefix)
        self.stores += 1
        self.evict_to(cap)
        return True

    def evict_to(self, nbytes: int) -> int:
        """Evict least recently used entries until at most ``nbytes`` and ``max_entries``
        remain; returns how many went."""
        gone = 0
        while self._entries and (self.nbytes > nbytes or len(self._entries) > self.max_entries):
            key = next(iter(self._entries))
            self._remove(key)
            gone += 1
        self.evictions += gone
        return gone

    def clear(self) -> None:
        self.evict_to(-1)

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._trie.pop(_MODEL, list(key))
        self._forget(key, entry)

    def _forget(self, key: tuple[int, ...], entry: _Entry) -> None:
        del self._entries[key]
        self.nbytes -= entry.nbytes
        conversation = entry.conversation
        if conversation is not None and self._conversations.get(conversation) == key:
            del self._conversations[conversation]


# -- cache layers ----------------------------------------------------------------


def cache_length(layers: list[Any]) -> int | None:
    """Tokens held by a model's cache, read from its first layer that counts them."""
    for layer in layers:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def _trimmable(layers: list[Any]) -> bool:
    return all(layer.is_trimmable() for layer in layers)


def _nbytes(layers: list[Any]) -> int:
    return int(sum(layer.nbytes for layer in layers))


def _slice(x: Any, n: int) -> Any:
    return x[..., :n, :]


def _compact(layers: list[Any], n: int) -> list[Any]:
    """The layers cut to their first ``n`` tokens, in buffers of exactly that size.

    A running KV cache is allocated in steps of 256 tokens and may hold
    rejected draft tokens past its offset; a stored one holds ``n`` tokens and
    nothing else. Buffers already of that size are kept (the request that
    filled them is over). Layers that do not count tokens are kept as they
    are (their state is the state after all ``n`` tokens).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    out: list[Any] = []
    arrays: list[Any] = []
    for layer in layers:
        kind = type(layer)
        if kind is KVCache or kind is QuantizedKVCache:
            if layer.offset < n:
                raise ValueError(f"cache holds {layer.offset} tokens, not {n}")
            new = KVCache() if kind is KVCache else QuantizedKVCache(layer.group_size, layer.bits)
            new.offset = n
            if layer.keys is not None:
                keys = layer.keys if kind is QuantizedKVCache else (layer.keys,)
                if keys[0].shape[2] == n:
                    # Already exactly n tokens (e.g. extracted from a batch): no copy.
                    new.keys, new.values = layer.keys, layer.values
                elif kind is KVCache:
                    new.keys = mx.contiguous(_slice(layer.keys, n))
                    new.values = mx.contiguous(_slice(layer.values, n))
                    arrays += [new.keys, new.values]
                else:
                    new.keys = tuple(mx.contiguous(_slice(x, n)) for x in layer.keys)
                    new.values = tuple(mx.contiguous(_slice(x, n)) for x in layer.values)
                    arrays += [*new.keys, *new.values]
            out.append(new)
        else:
            offset = getattr(layer, "offset", None)
            if isinstance(offset, int) and offset != n:
                if offset < n or not layer.is_trimmable():
                    raise ValueError(f"cache holds {offset} tokens, not {n}")
                layer.trim(offset - n)
            out.append(layer)
    # Evaluate now, so the lazy slices stop referring to the running buffers.
    mx.eval(arrays)
    return out


def _prefix_copy(layers: list[Any], have: int, n: int) -> list[Any]:
    """New layer objects holding the first ``n`` of ``have`` tokens.

    KV layers get slices of the stored arrays: new array objects, so the
    request's in-place updates never reach the entry (and its first update
    reallocates anyway, since a stored buffer has no room to spare). Other
    layers are deep-copied, then trimmed, as mlx-lm's LRUPromptCache does.
    """
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    out: list[Any] = []
    for layer in layers:
        kind = type(layer)
        if kind is KVCache or kind is QuantizedKVCache:
            new = KVCache() if kind is KVCache else QuantizedKVCache(layer.group_size, layer.bits)
            new.offset = n
            if layer.keys is not None:
                if kind is KVCache:
                    new.keys, new.values = _slice(layer.keys, n), _slice(layer.values, n)
                else:
                    new.keys = tuple(_slice(x, n) for x in layer.keys)
                    new.values = tuple(_slice(x, n) for x in layer.values)
            out.append(new)
        else:
            new = copy.deepcopy(layer)
            if have > n:
                new.trim(have - n)
            out.append(new)
    return out
