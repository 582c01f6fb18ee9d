"""Reconnect policy: when to try again, how long to wait, when to stop.

A provider must never give up (one once sat disconnected for 42 hours), and
must not hammer a coordinator that refuses it. So:

- every lost or refused connection is retried forever, with exponential
  backoff from ``initial`` (1 s) doubling to ``cap`` (60 s), each wait
  stretched by a random factor in ``[1, 1 + jitter]`` (10%) so a fleet that
  lost the coordinator at once does not come back in lockstep, at the cap too;
- a connection that was accepted and then closed counts as a failure like a
  refused one: an accept-then-close loop is backed off, not a hot loop;
- only a session that stayed registered for ``stable_after_s`` resets the
  backoff: losing it is retried at once, then with the usual growth;
- close code 4005 (invalid token) waits at the cap every time; 4004 (version
  unsupported) and 4009 (banned) stop the agent (:class:`FatalRefusal`).

The waits are a tenacity wait strategy (:class:`wait_backoff`), so the retry
loop itself is tenacity's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import tenacity
from tenacity.wait import wait_base

CLOSE_REASONS: dict[int, str] = {
    4000: "unrecognised first message",
    4001: "invalid hello",
    4002: "unknown provider_id",
    4004: "protocol version unsupported",
    4005: "invalid provider token",
    4009: "provider banned",
    4429: "pool full",
}
FATAL_CLOSE_CODES = frozenset({4004, 4009})
AT_CAP_CLOSE_CODES = frozenset({4005})


class ConnectionLost(Exception):
    """The connection ended; the reconnect loop retries.

    ``cause`` is a short machine-readable word for logs and metrics
    (``refused``, ``closed``, ``send_timeout``, ``watchdog``, ``wake``, ...).
    ``stable`` says the session had been registered long enough to reset the
    backoff; ``close_code`` is the WebSocket close code, when there was one.
    """

    def __init__(
        self, cause: str, detail: str = "", *, stable: bool = False, close_code: int | None = None
    ) -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.detail = detail
        self.stable = stable
        self.close_code = close_code


class FatalRefusal(Exception):
    """The coordinator refused us for good (4004, 4009): stop, do not retry."""

    def __init__(self, close_code: int, reason: str) -> None:
        what = CLOSE_REASONS.get(close_code, "refused")
        super().__init__(f"coordinator closed with {close_code} ({what}): {reason or 'no reason'}")
        self.close_code = close_code


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 1.0
    cap: float = 60.0
    jitter: float = 0.1

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Wait before retry number ``attempt`` (1 = first retry)."""
        base = min(self.cap, self.initial * 2 ** max(0, attempt - 1))
        return base * (1.0 + (rng or random).uniform(0.0, self.jitter))


class wait_backoff(wait_base):
    """tenacity wait: :class:`BackoffPolicy`, at the cap after a 4005 close."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, ConnectionLost) and exc.close_code in AT_CAP_CLOSE_CODES:
            return self.policy.delay(10_000, self.rng)
        return self.policy.delay(retry_state.attempt_number, self.rng)


def is_retryable(exc: BaseException) -> bool:
    """Retry within one backoff run: any loss except one that resets it.

    A stable session's loss and a wake from sleep reset the backoff: the
    caller reconnects at once with a fresh run.
    """
    return isinstance(exc, ConnectionLost) and not (exc.stable or exc.cause == "wake")
