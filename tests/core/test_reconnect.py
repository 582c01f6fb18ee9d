"""Backoff policy: growth, cap, jitter, and which losses reset or stop it."""

from __future__ import annotations

import random

import tenacity

from provider.coordinator.reconnect import (
    BackoffPolicy,
    ConnectionLost,
    FatalRefusal,
    is_retryable,
    wait_backoff,
)


def test_growth_cap_and_jitter() -> None:
    policy = BackoffPolicy(initial=1.0, cap=60.0, jitter=0.1)
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(1, 12)]
    bases = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60]
    for delay, base in zip(delays, bases, strict=True):
        assert base <= delay <= base * 1.1
    at_cap = [policy.delay(50, rng) for _ in range(50)]
    assert len(set(at_cap)) > 40, "jitter must apply at the cap too"


def test_no_jitter_is_exact() -> None:
    policy = BackoffPolicy(initial=0.5, cap=4.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def _state(exc: BaseException, attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_invalid_token_waits_at_the_cap() -> None:
    wait = wait_backoff(BackoffPolicy(initial=1, cap=60, jitter=0), random.Random(1))
    assert wait(_state(ConnectionLost("closed", close_code=4005), 1)) == 60
    assert wait(_state(ConnectionLost("closed", close_code=4429), 1)) == 1
    assert wait(_state(ConnectionLost("refused"), 3)) == 4


def test_what_resets_the_backoff() -> None:
    assert is_retryable(ConnectionLost("refused"))
    assert is_retryable(ConnectionLost("closed", close_code=1000))  # accept-then-close backs off
    assert not is_retryable(ConnectionLost("closed", stable=True))
    assert not is_retryable(ConnectionLost("wake"))
    assert not is_retryable(FatalRefusal(4009, "banned"))
    assert "4009" in str(FatalRefusal(4009, "banned")) and "banned" in str(FatalRefusal(4009, "x"))
