"""Speculative decoding for the one request a sequential engine runs.

Two ways to propose tokens, both verified by the model in one forward pass
and accepted while they match what the model itself picks:

- a **draft model** (``draft_model``): mlx-lm's
  :func:`~mlx_lm.generate.speculative_generate_step`, after the scheduler
  has prefilled both models' caches in time slices (:mod:`.prefill`:
  mlx-lm's own prefill is not interruptible);
- **prompt lookup** without a draft model: the continuation of the latest
  earlier occurrence of the last few tokens in the prompt and output so far
  (:class:`NgramIndex`), as in "prompt lookup decoding". It drafts only
  when a match exists *and* the speed measured at load says the expected
  accepted tokens pay for the wider forward pass (:class:`LookupCosts`);
  otherwise the request decodes with mlx-lm's pipelined
  :func:`~mlx_lm.generate.generate_step`, switching back when a match shows
  up (:func:`lookup_generate_step`).

Both are used only where they give exactly the tokens plain decoding gives
(:func:`eligible`): greedy requests (temperature 0), no per-request logits
processors, a trimmable cache. A sampled request draws its tokens from a
seeded key chain that speculation would consume in a different order, so its
seeded text would change; a logits processor (penalties, grammars) sees
tokens that may be rejected afterwards.

Exactness caveat: the verification pass computes several positions in one
matrix product, which can round differently from one-at-a-time decoding; a
near tie between two tokens can then break the other way (the same is true
of mlx-lm's speculative decoding).

Everything here runs on the generation thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

#: n-gram sizes tried for a prompt-lookup match, longest first.
NGRAM_SIZES = (3, 2, 1)
#: Lookup must beat plain decoding by this factor to be used.
MARGIN = 1.05
#: Prior for the share of drafted tokens accepted, before a request has any.
PRIOR_ACCEPTANCE = 0.6

Step = tuple[int, Any, bool]  # token, logprobs, from_draft


def eligible(job: Any, cache: list[Any]) -> bool:
    """Whether speculation gives ``job`` exactly the tokens plain decoding would."""
    if job.temperature > 0:
        return False
    if getattr(job, "logits_processors", None):
        return False
    return all(layer.is_trimmable() for layer in cache)


# -- prompt lookup --------------------------------------------------------------


class NgramIndex:
    """Where each n-gram of a growing token sequence last began, to draft its continuation.

    An n-gram is indexed once a token follows it, so the sequence's own tail
    never matches itself.
    """

    def __init__(self, tokens: Sequence[int] = (), sizes: Sequence[int] = NGRAM_SIZES) -> None:
        self.sizes = tuple(sizes)
        self.seq: list[int] = []
        self._last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.seq.append(token)
        length = len(self.seq)
        for n in self.sizes:
            start = length - 1 - n
            if start >= 0:
                self._last[n][tuple(self.seq[start : start + n])] = start

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the tail."""
        if k <= 0:
            return []
        seq = self.seq
        for n in self.sizes:
            if len(seq) < n:
                continue
            start = self._last[n].get(tuple(seq[-n:]))
            if start is not None:
                return seq[start + n : start + n + k]
        return []


@dataclass(frozen=True, slots=True)
class LookupCosts:
    """Seconds of one plain decoding step and of verifying ``k`` drafted tokens.

    ``plain_s`` is a pipelined step (the load-time throughput); ``verify_s[k]``
    a synchronous forward pass of ``k + 1`` tokens.
    """

    plain_s: float
    verify_s: tuple[float, ...]

    @property
    def max_draft(self) -> int:
        return len(self.verify_s) - 1

    def best_draft(self, acceptance: float) -> int:
        """The draft length with the most tokens per second, 0 if none beats plain decoding."""
        a = min(max(acceptance, 0.0), 0.999)
        best, best_rate = 0, MARGIN / self.plain_s
        for k in range(1, self.max_draft + 1):
            expected = (1 - a ** (k + 1)) / (1 - a)  # tokens per round: accepted + 1
            rate = expected / self.verify_s[k]
            if rate > best_rate or (best and rate == best_rate):  # a tie: the longer draft
                best, best_rate = k, rate
        return best

    def pays(self) -> bool:
        """Whether lookup can pay at all: with every draft accepted."""
        return self.best_draft(0.999) > 0


def measure_lookup_costs(
    model: Any, stream: Any, *, max_draft: int, plain_tps: float, repeats: int = 5
) -> LookupCosts:
    """Time forward passes of 1 to ``max_draft + 1`` tokens on a warm cache.

    The fastest of ``repeats`` runs each: other processes only ever add time.
    A plain step is the pipelined decode speed measured at load, or a
    synchronous one-token pass if that is faster.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    with mx.stream(stream):
        cache = make_prompt_cache(model)
        model(mx.array([list(range(1, 65))]), cache=cache)
        mx.eval([c.state for c in cache])
        verify = []
        for m in range(1, max_draft + 2):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                mx.eval(model(mx.array([list(range(2, 2 + m))]), cache=cache))
                times.append(time.perf_counter() - started)
                trim_prompt_cache(cache, m)
            verify.append(min(times))
    plain = min(1.0 / plain_tps, verify[0]) if plain_tps > 0 else verify[0]
    return LookupCosts(plain, tuple(verify))


@dataclass(slots=True)
class LookupStats:
    """What lookup did for one request."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    switches: int = 0

    @property
    def acceptance(self) -> float:
        if self.drafted < 8:  # too few to trust: lean on the prior
            return (self.accepted + PRIOR_ACCEPTANCE * 8) / (self.drafted + 8)
        return self.accepted / self.drafted


def lookup_generate_step(
    prompt: Sequence[int],
    model: Any,
    cache: list[Any],
    stream: Any,
    *,
    sampler: Callable[[Any], Any],
    max_tokens: int,
    costs: LookupCosts,
    stats: LookupStats | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
) -> Generator[Step, None, None]:
    """Decode after ``cache`` holds ``prompt[:-1]``, drafting by prompt lookup where it pays.

    Yields ``(token, logprobs, from_draft)`` like mlx-lm's speculative
    generator. Between drafts it runs :func:`mlx_lm.generate.generate_step`
    (pipelined) and leaves it when a draft worth verifying appears; leaving
    costs the one step that generator had started. When the consumer stops
    early, ``cache`` holds the prompt and every token yielded except
    possibly the last (read its offset). ``kv_*`` quantize the cache as
    :func:`~mlx_lm.generate.generate_step` does.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
    from mlx_lm.models.cache import trim_prompt_cache

    kv = {
        "kv_bits": kv_bits,
        "kv_group_size": kv_group_size,
        "quantized_kv_start": quantized_kv_start,
    }

    stats = stats if stats is not None else LookupStats()
    index = NgramIndex(prompt)
    pending = [prompt[-1]]  # tokens given to the model next
    made = 0
    with mx.stream(stream):
        while made < max_tokens:
            k = min(costs.best_draft(stats.acceptance), max_tokens - made - 1)
            draft = index.draft(k)
            if not draft:
                # Plain pipelined decoding until a draft worth verifying shows up.
                stats.switches += 1
                steps = generate_step(
                    mx.array(pending),
                    model,
                    stream,
                    max_tokens=max_tokens - made,
                    sampler=sampler,
                    prompt_cache=cache,
                    **kv,
                )
                last = None
                # Acceptance does not change while decoding plainly: if it says
                # drafting never pays, stop looking for drafts at all.
                best = costs.best_draft(stats.acceptance)
                watch = best > 0
                try:
                    for token, logprobs in steps:
                        token = int(token)
                        made += 1
                        last = token
                        if watch:
                            index.append(token)
                        yield token, logprobs, False
                        if made >= max_tokens:
                            return
                        if not watch:
                            continue
                        k = min(best, max_tokens - made - 1)
                        if k > 0 and index.draft(k):
                            break
                    else:
                        return
                finally:
                    steps.close()
                # generate_step had already run ``last`` through the model to
                # start the next step: take it back and verify from there.
                trim_prompt_cache(cache, 1)
                pending = [int(last)] if last is not None else pending
                continue
            inputs = pending + draft
            logits = model(mx.array(inputs)[None], cache=cache)[0, -(len(draft) + 1) :, :]
            maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = sampler(logprobs).tolist()
            n = 0
            while n < len(draft) and picked[n] == draft[n]:
                n += 1
            stats.rounds += 1
            stats.drafted += len(draft)
            stats.accepted += n
            # Keep the accepted drafts in the cache, drop the rest, before
            # yielding: a consumer that stops leaves a consistent cache.
            trim_prompt_cache(cache, len(draft) - n)
            accepted = [*draft[:n], picked[n]]
            for i, token in enumerate(accepted):
                made += 1
                index.append(token)
                yield token, logprobs[i], i < n
                if made >= max_tokens:
                    return
            pending = [picked[n]]
