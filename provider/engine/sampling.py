"""Per-request samplers: greedy shared, sampling with a PRNG key of its own."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

Sampler = Callable[[Any], Any]


def make_sampler(
    *,
    temperature: float,
    top_p: float,
    seed: int | None,
    greedy: Sampler,
    eos_mask: Any = None,
) -> Sampler:
    """A request's sampler: ``greedy`` (shared) at temperature 0, else its own key chain.

    Every sampling request owns its PRNG key (from ``seed``, else random), so
    requests never share random state and a seed reproduces its text whatever
    else runs. ``eos_mask`` (additive, or None) is applied before top-p.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    if temperature <= 0:
        return greedy
    key = mx.random.key((seed if seed is not None else secrets.randbits(64)) % (1 << 64))
    scale = 1.0 / temperature
    mask = eos_mask

    def sample(logprobs: Any) -> Any:
        nonlocal key
        if mask is not None:
            logprobs = logprobs + mask
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * scale, key=sub)

    return sample
