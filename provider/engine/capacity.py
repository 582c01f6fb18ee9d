"""Memory-aware capacity: what a request's KV cache costs, whether it fits, how long until it would.

A request's KV memory is known before it runs: its context (prompt plus
completion limit) times the bytes a token costs in every layer's keys and
values, which :func:`measure_kv_shape` reads off the model once. The engine
keeps running requests within a memory budget (:func:`default_budget`: what
macOS recommends a process keep wired, or 3/4 of RAM, less the weights and a
prefill's working memory) rather than let the Mac swap:

- the advertised context is capped at what one request can hold
  (:meth:`KvShape.max_tokens`), so a request that could never fit is
  refused ``error_context_exceeded`` up front;
- a request that fits alone but not beside those running waits, in arrival
  order, until enough of them have ended (:class:`Capacity`);
- the prefix cache gets what running requests leave, and gives it back.

Batched requests are counted as mlx-lm batches them: every sequence in a
batch is padded to the longest, so ``n`` requests reserve ``n`` times the
largest context among them.

:func:`estimate_wait_s` turns the running requests and the measured speeds
into the ``estimated_wait_ms`` of a ``preflight_ack``.

Pure except :func:`measure_kv_shape` and :func:`total_memory`, which read
MLX and the OS.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: mlx-lm's KV caches grow in steps of this many tokens.
KV_STEP = 256
#: Share of RAM the budget starts from when MLX does not say (macOS keeps the rest).
RAM_SHARE = 0.75
#: Weight of the newest observation in the speed averages.
EMA_WEIGHT = 0.2


@dataclass(frozen=True, slots=True)
class KvShape:
    """What one request's KV cache costs, from the model's shape.

    ``bytes_per_token``: keys and values of every layer for one token at the
    model's dtype (``itemsize`` bytes an element); ``fixed_bytes``: state
    that does not grow with the context (recurrent layers). With ``kv_bits``
    the cache is quantized once it holds ``quantized_start`` tokens
    (mlx-lm's ``maybe_quantize_kv_cache``).
    """

    bytes_per_token: float
    fixed_bytes: int = 0
    itemsize: int = 2
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_start: int = 5000

    def request_bytes(self, tokens: int) -> int:
        """Upper bound of one request's KV memory at ``tokens`` of context."""
        steps = math.ceil(max(tokens, 1) / KV_STEP) * KV_STEP
        full = steps * self.bytes_per_token
        if self.kv_bits is None or tokens <= self.quantized_start:
            return int(full) + self.fixed_bytes
        # Quantizing copies the cache: count the float cache at the switch
        # plus the quantized one at the end.
        per_element = self.kv_bits / 8 + 2 * self.itemsize / self.kv_group_size
        quantized = full * per_element / self.itemsize
        at_switch = math.ceil(self.quantized_start / KV_STEP) * KV_STEP * self.bytes_per_token
        return int(at_switch + quantized) + self.fixed_bytes

    def max_tokens(self, budget: int) -> int:
        """The longest context one request can hold within ``budget`` bytes."""
        if self.request_bytes(KV_STEP) > budget:
            return 0
        low, high = KV_STEP, KV_STEP
        while self.request_bytes(high * 2) <= budget and high < 1 << 30:
            high *= 2
        low, high = high, high * 2
        while high - low > 1:  # request_bytes grows with tokens: bisect the last that fits
            mid = (low + high) // 2
            if self.request_bytes(mid) <= budget:
                low = mid
            else:
                high = mid
        return low


def batch_bytes(shape: KvShape, contexts: Sequence[int]) -> int:
    """KV memory of requests decoded together: each padded to the longest context."""
    if not contexts:
        return 0
    return len(contexts) * shape.request_bytes(max(contexts))


def measure_kv_shape(
    model: Any, *, kv_bits: int | None = None, kv_group_size: int = 64, quantized_start: int = 5000
) -> KvShape:
    """Run one token through a fresh cache and read what each layer allocated.

    Runs on the generation thread (it calls the model).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    per_token = 0.0
    fixed = 0
    itemsize = 2
    for layer in cache:
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if isinstance(keys, mx.array) and isinstance(values, mx.array) and keys.ndim == 4:
            per_token += (keys.nbytes + values.nbytes) / keys.shape[2]
            itemsize = keys.dtype.size
        else:
            try:
                fixed += int(layer.nbytes)
            except (NotImplementedError, AttributeError):
                pass
    return KvShape(per_token, fixed, itemsize, kv_bits, kv_group_size, quantized_start)


def total_memory() -> tuple[int, int | None]:
    """RAM in bytes, and the working set MLX recommends (Metal only; else None)."""
    import mlx.core as mx

    info: dict[str, Any] = {}
    try:
        info = dict(mx.device_info())
    except Exception:  # older MLX, or a backend without the call
        info = {}
    ram = int(info.get("memory_size") or 0)
    if not ram:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 0
    recommended = info.get("max_recommended_working_set_size")
    return ram, int(recommended) if recommended else None


def default_budget(ram: int, recommended: int | None, weights: int, working: int) -> int:
    """KV memory for running requests and the prefix cache when none is configured.

    The working set MLX recommends (on a Mac about 2/3 to 3/4 of RAM), else
    :data:`RAM_SHARE` of RAM, less the model's weights and ``working`` (a
    prefill chunk's activations and logits).
    """
    limit = recommended if recommended else int(ram * RAM_SHARE)
    return max(0, limit - weights - working)


def model_bytes(model: Any) -> int:
    """Bytes of the model's parameters."""
    from mlx.utils import tree_flatten

    return int(sum(v.nbytes for _, v in tree_flatten(model.parameters())))


@dataclass(frozen=True, slots=True)
class Live:
    """A request the engine holds, for :func:`estimate_wait_s`.

    ``context``: prompt plus completion limit; ``prefill_left``: prompt
    tokens still to prefill; ``decode_left``: completion tokens it may still
    generate; ``admitted``: it holds its memory (else it waits for it).
    """

    context: int
    prefill_left: int
    decode_left: int
    admitted: bool


def estimate_wait_s(
    live: Sequence[Live],
    context: int,
    *,
    shape: KvShape,
    budget: int,
    slots: int,
    sequential: bool,
    prefill_tps: float,
    decode_tps: float,
    length_ratio: float = 1.0,
) -> float:
    """Seconds before a new request of ``context`` tokens would start its prefill.

    ``decode_tps`` is one stream's decode speed as measured (with whatever
    ran beside it); ``length_ratio`` the share of its completion limit a
    request has been generating on average, so limits that buyers never
    reach do not count in full. Sequential engines run requests one after
    the other: the wait is all the work ahead. Batched ones wait for a slot,
    for memory (requests ending in order of their remaining time until the
    new one fits), and then for the prompts queued ahead to prefill, one at
    a time.
    """
    prefill_tps = max(prefill_tps, 1e-3)
    decode_tps = max(decode_tps, 1e-3)
    ratio = min(max(length_ratio, 0.0), 1.0)

    def remaining(r: Live) -> float:
        return r.prefill_left / prefill_tps + r.decode_left * ratio / decode_tps

    if sequential:
        return sum(remaining(r) for r in live)
    ends = sorted(remaining(r) for r in live)
    wait = 0.0
    if len(live) >= slots:
        wait = ends[len(live) - slots]
    admitted = sorted((r for r in live if r.admitted), key=remaining)
    contexts = [r.context for r in admitted]
    for r in admitted:
        if batch_bytes(shape, [*contexts, context]) <= budget:
            break
        contexts.remove(r.context)
        wait = max(wait, remaining(r))
    backlog = sum(r.prefill_left for r in live if r.prefill_left > 0) / prefill_tps
    return wait + backlog


class Capacity:
    """The generation thread's memory book: what running requests reserve.

    ``admit(request_id, context)`` reserves a request's KV memory when it
    fits beside those admitted (see :func:`batch_bytes`) and says whether it
    did; ``release`` gives it back. ``sequential`` engines run one request
    at a time, so only that one counts. Speeds are averages of finished
    requests (:meth:`observe`), seeded with the load-time throughput.
    """

    def __init__(self, shape: KvShape, budget: int, *, sequential: bool, decode_tps: float) -> None:
        self.shape = shape
        self.budget = budget
        self.sequential = sequential
        self.admitted: dict[str, int] = {}
        self.blocked: str | None = None  # the request waiting at the head of the queue
        self.decode_tps = max(decode_tps, 1.0)
        # Prefill is never slower than decoding one token at a time.
        self.prefill_tps = self.decode_tps
        self.length_ratio = 1.0

    @property
    def reserved(self) -> int:
        """Bytes the admitted requests hold."""
        return self.reserved_except(None)

    def reserved_except(self, request_id: str | None) -> int:
        """Bytes the admitted requests other than ``request_id`` hold."""
        # A snapshot first: other threads read this while the generation thread writes.
        contexts = [c for r, c in list(self.admitted.items()) if r != request_id]
        if self.sequential and contexts:
            return self.shape.request_bytes(max(contexts))
        return batch_bytes(self.shape, contexts)

    def fits(self, context: int) -> bool:
        """Whether a request of ``context`` tokens fits beside those admitted."""
        if self.sequential:
            return self.shape.request_bytes(context) <= self.budget
        return batch_bytes(self.shape, [*self.admitted.values(), context]) <= self.budget

    def admit(self, request_id: str, context: int) -> bool:
        if request_id in self.admitted:
            return True
        if not self.fits(context):
            self.blocked = request_id
            return False
        if self.blocked == request_id:
            self.blocked = None
        self.admitted[request_id] = context
        return True

    def release(self, request_id: str) -> None:
        self.admitted.pop(request_id, None)
        if self.blocked == request_id:
            self.blocked = None

    def observe(
        self,
        *,
        prefilled: int,
        prefill_s: float | None,
        decode_tps: float | None,
        completion: int,
        limit: int,
    ) -> None:
        """Fold one finished request's speeds and length into the averages."""
        if prefill_s is not None and prefill_s > 0 and prefilled > 0:
            self.prefill_tps = _ema(self.prefill_tps, prefilled / prefill_s)
        if decode_tps is not None and decode_tps > 0:
            self.decode_tps = _ema(self.decode_tps, decode_tps)
        if limit > 0:
            self.length_ratio = _ema(self.length_ratio, min(1.0, completion / limit))


def _ema(old: float, new: float) -> float:
    return old + EMA_WEIGHT * (new - old)
