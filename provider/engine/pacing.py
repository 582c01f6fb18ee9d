"""Prefill pacing: how many prompt tokens fit a time slice, and the inter-token gaps it protects.

A prompt is prefilled in chunks, and between two chunks every running
request gets a decode step and every cancel flag is looked at. A chunk of a
fixed token count (``prefill_step_size``) takes whatever time it takes: 512
tokens are a fraction of a second for a small model on a GPU and tens of
seconds for a large one (or on a CPU), and every running stream freezes that
long. So chunks are sized by time instead: :class:`PrefillPacer` measures
how long chunks of each size take (seconds per token, per power-of-two size
bucket: the median of the bucket's latest measurements, so one chunk slowed
down by another process does not shrink the next ones) and picks the largest
chunk that the measurements say fits the slice (:func:`chunk_for_budget`);
``prefill_step_size`` stays the upper bound.

:class:`GapWindow` keeps the last inter-token gaps of every request, so
``status`` and ``/metrics`` can show what the pacing achieves (p50, p99 and
max).

Everything here is pure bookkeeping (no MLX, no I/O, no clock of its own):
the schedulers time the chunks and report them.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Mapping

#: How many of a bucket's latest measurements its rate is the median of.
RATE_WINDOW = 5
#: A size never timed is tried once if it should take at most this many budgets.
PROBE_OVERSHOOT = 1.5
#: How many inter-token gaps :class:`GapWindow` keeps (all requests together).
GAP_WINDOW = 2048


def size_bucket(tokens: int) -> int:
    """The bucket of a chunk of ``tokens`` (>= 1): ``k`` holds sizes ``2**k`` to ``2**(k+1)-1``."""
    return max(1, tokens).bit_length() - 1


def chunk_for_budget(seconds_per_token: Mapping[int, float], budget_s: float, limit: int) -> int:
    """The largest chunk (1 to ``limit`` tokens) the measured speed says fits ``budget_s``.

    ``seconds_per_token`` maps a size bucket (see :func:`size_bucket`) to the
    measured seconds per token of chunks of that size. A bucket never
    measured borrows the rate of the nearest measured bucket below it (per
    token, a bigger chunk is no slower: it shares the weight reads and the
    per-call overhead), or above it when there is none below. Only one
    bucket above the largest measured one is tried, so the chosen size at
    most doubles beyond what has been timed: a rate taken from small chunks
    does not send a huge one through on trust.

    Borrowing is pessimistic where a pass has a fixed cost (a 1-token pass
    can cost more per token than a 2-token one: on this CPU it takes
    another matrix-vector path), so the smallest size of that bucket is
    tried once, to be measured, when the borrowed rate says it would take
    at most :data:`PROBE_OVERSHOOT` times the budget. With nothing measured
    the answer is 1 token.
    """
    limit = max(1, limit)
    if limit == 1 or not seconds_per_token or budget_s <= 0:
        return 1
    measured = sorted(seconds_per_token)
    explore = measured[-1] + 1
    for k in range(min(size_bucket(limit), explore), -1, -1):
        below = [m for m in measured if m <= k]
        rate = seconds_per_token[below[-1] if below else measured[0]]
        lo, hi = 1 << k, min(limit, (2 << k) - 1)
        n = hi if rate <= 0 else min(hi, math.floor(budget_s / rate))
        if n >= lo:
            return n
        if k == explore and lo * rate <= PROBE_OVERSHOOT * budget_s:
            return lo
    return 1


class PrefillPacer:
    """Chunk sizes for one model's prefill, from that model's measured prefill speed.

    ``slice_s`` is the time one chunk should take; ``None`` (or 0) turns
    pacing off, and every chunk is ``max_chunk`` tokens (the fixed
    ``prefill_step_size`` chunks of mlx-lm). ``max_chunk`` bounds every
    chunk either way.

    Used by the generation thread only (:meth:`chunk`, :meth:`record`); the
    loop reads :attr:`last_chunk`, :attr:`tokens_per_s` and :attr:`slice_s`,
    plain attributes that are replaced, never mutated in place.
    """

    def __init__(
        self, slice_s: float | None, max_chunk: int, *, window: int = RATE_WINDOW
    ) -> None:
        if max_chunk < 1:
            raise ValueError("max_chunk must be >= 1")
        self.slice_s = slice_s if slice_s else None
        self.max_chunk = max_chunk
        #: Seconds per token by size bucket: the median of the bucket's samples.
        self.rates: dict[int, float] = {}
        self._samples: dict[int, deque[float]] = {}
        self._window = window
        #: The size of the latest chunk chosen (None before the first).
        self.last_chunk: int | None = None
        #: Prefill tokens per second measured for chunks of that size (None before).
        self.tokens_per_s: float | None = None

    def seed(self, seconds_per_token: float) -> None:
        """Start from a guess before any chunk is timed (the load-time decode speed).

        A decode step is one token through the whole model, so its time per
        token bounds a prefill chunk's from above: a safe first guess. It
        only fills the 1-token bucket, and only while nothing was measured.
        """
        if not self.rates and seconds_per_token > 0:
            self.rates[0] = seconds_per_token

    def chunk(self, remaining: int) -> int:
        """How many of the ``remaining`` prompt tokens the next chunk takes."""
        limit = max(1, min(remaining, self.max_chunk))
        if self.slice_s is None:
            n = limit
        else:
            n = chunk_for_budget(self.rates, self.slice_s, limit)
        self.last_chunk = n
        return n

    def record(self, tokens: int, seconds: float) -> None:
        """Add the time one chunk of ``tokens`` took to its bucket's measurements."""
        if tokens < 1 or seconds <= 0:
            return
        k = size_bucket(tokens)
        samples = self._samples.setdefault(k, deque(maxlen=self._window))
        samples.append(seconds / tokens)
        self.rates[k] = statistics.median(samples)
        self.tokens_per_s = tokens / seconds


class GapWindow:
    """The latest inter-token gaps (seconds) of all requests, for percentiles.

    The generation thread adds; the event loop reads a summary. Bounded:
    only the last ``size`` gaps are kept.
    """

    def __init__(self, size: int = GAP_WINDOW) -> None:
        self._gaps: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0

    def add(self, gap_s: float) -> None:
        with self._lock:
            self._gaps.append(gap_s)
            self.total += 1

    def summary(self) -> tuple[int, float | None, float | None, float | None]:
        """``(samples, p50, p99, max)`` over the window; ``None`` values when it is empty."""
        with self._lock:
            gaps = sorted(self._gaps)
        if not gaps:
            return 0, None, None, None
        return len(gaps), percentile(gaps, 0.50), percentile(gaps, 0.99), gaps[-1]


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of an ascending non-empty list, nearest rank."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
