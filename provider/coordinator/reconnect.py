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
- close codes follow the coordinator's meaning (:func:`close_policy`): 4004
  (binary version below the floor) and 4009 (banned) stop the agent
  (:class:`FatalRefusal`) with the reason; 4000, 4001, 4003 and 4005 (a
  problem only the owner can fix: the token, a setting, the identity) wait at
  the cap every time and say what to fix; 4007, 4008, 4012, 4013 and 4429
  (pool full, rate limited, attestation, a failed encrypted leg, too many
  connections) are transient and back off as usual.

The waits are a tenacity wait strategy (:class:`wait_backoff`), so the retry
loop itself is tenacity's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import tenacity
from tenacity.wait import wait_base

from provider.coordinator.admission import required_version_from_reason

CLOSE_REASONS: dict[int, str] = {
    4000: "unrecognised first message",
    4001: "invalid hello",
    4002: "unknown provider_id",
    4003: "identity or tier refused",
    4004: "binary version unsupported",
    4005: "invalid provider token",
    4007: "provisional pool full",
    4008: "rate limited",
    4009: "provider banned",
    4012: "attestation failed",
    4013: "encrypted leg failed",
    4429: "too many connections",
}
FATAL_CLOSE_CODES = frozenset({4004, 4009})
AT_CAP_CLOSE_CODES = frozenset({4000, 4001, 4003, 4005})
#: 4001 reasons that are not the owner's to fix: retried as usual.
_TRANSIENT_4001 = ("receipt_key_rotation_grace_active",)

#: What the owner should do, by close code and then by reason prefix.
_FIXES: dict[int, list[tuple[str, str]]] = {
    4000: [("", "upgrade mlx-provider: the coordinator did not recognise its first message")],
    4001: [
        ("credential_bootstrap_requires_v2", 'set protocol = "v2"'),
        ("no_common_aead_suite", "upgrade mlx-provider: no common encryption suite"),
        ("compatibility_set_required", "set compatibility_set_id (the marketplace publishes it)"),
        ("compatibility_set_invalid", "fix compatibility_set_id: OWNER/NAME:vX.Y.Z@<commit>"),
        ("compatibility_set_unaccepted", "set a compatibility_set_id the coordinator accepts"),
        ("catalog_incompatible", "the model's catalog row changed: restart to fetch the feed"),
        ("invalid_model_hash_identity", "the model hash is malformed: report a bug"),
        ("model_hash_algorithm_required", "serve a local model directory so it can be hashed"),
        ("invalid_hello", "a registration field was refused (the reason names it)"),
        ("", "a registration field was refused; see the reason"),
    ],
    4003: [
        ("bootstrap_identity_requires_v2", 'set protocol = "v2"'),
        ("durable_identity_requires_v2", 'set protocol = "v2"'),
        ("bootstrap_receipt_identity_required", "upgrade mlx-provider (no receipt key was sent)"),
        (
            "identity_signature",
            "the identity key on this Mac is not the one the coordinator "
            "knows: restore ~/.config/mlx-provider/ or ask the marketplace to reset it",
        ),
        ("", "the coordinator refused this provider's identity or tier"),
    ],
    4005: [
        ("referral_required", "set referral_code (from the marketplace) to bootstrap"),
        ("referral_", "the referral code was refused: get a new one from the marketplace"),
        (
            "bootstrap_",
            "the bootstrap was refused: remove provider_token and provider_id "
            "to start over, or ask the marketplace",
        ),
        (
            "",
            "the provider token was refused: fix provider_token, or remove it to get a new "
            "one (credential bootstrap needs referral_code)",
        ),
    ],
}


@dataclass(frozen=True)
class ClosePolicy:
    """What a close code means for the reconnect loop.

    ``action`` is ``final`` (stop), ``at_cap`` (retry at the backoff cap) or
    ``transient`` (usual backoff); ``fix`` says what the owner can do.
    """

    action: Literal["final", "at_cap", "transient"]
    fix: str | None = None


def close_policy(code: int | None, reason: str = "") -> ClosePolicy:
    """The coordinator's close ``code`` and ``reason``, as an action and a fix."""
    if code in FATAL_CLOSE_CODES:
        if code == 4004:
            required = _required_version(reason)
            target = f" {required} or later" if required else " the required version"
            fix = (
                f"upgrade mlx-provider, or set advertised_binary_version to{target} if this "
                "build implements that protocol"
            )
        else:
            fix = "contact the marketplace"
        return ClosePolicy("final", fix)
    if code in AT_CAP_CLOSE_CODES and not reason.startswith(_TRANSIENT_4001):
        fix = next(
            (hint for prefix, hint in _FIXES.get(code, []) if reason.startswith(prefix)), None
        )
        return ClosePolicy("at_cap", fix)
    return ClosePolicy("transient")


def _required_version(reason: str) -> str | None:
    return required_version_from_reason(reason)


class ConnectionLost(Exception):
    """The connection ended; the reconnect loop retries.

    ``cause`` is a short machine-readable word for logs and metrics
    (``refused``, ``closed``, ``send_timeout``, ``watchdog``, ``wake``, ...).
    ``stable`` says the session had been registered long enough to reset the
    backoff; ``close_code`` is the WebSocket close code, when there was one.
    """

    def __init__(
        self,
        cause: str,
        detail: str = "",
        *,
        stable: bool = False,
        close_code: int | None = None,
        close_reason: str = "",
    ) -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.detail = detail
        self.stable = stable
        self.close_code = close_code
        self.close_reason = close_reason

    @property
    def at_cap(self) -> bool:
        """The owner must fix something: retry only at the backoff cap."""
        return close_policy(self.close_code, self.close_reason).action == "at_cap"


class FatalRefusal(Exception):
    """The coordinator refused us for good (4004, 4009): stop, do not retry.

    ``reason`` is the coordinator's close reason (e.g. ``version_unsupported:
    binary_version 0.1.0 below required 1.8.33``), ``fix`` what to do.
    """

    def __init__(self, close_code: int, reason: str) -> None:
        what = CLOSE_REASONS.get(close_code, "refused")
        self.fix = close_policy(close_code, reason).fix
        message = f"coordinator closed with {close_code} ({what}): {reason or 'no reason'}"
        super().__init__(message + (f"; {self.fix}" if self.fix else ""))
        self.close_code = close_code
        self.reason = reason


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
        if isinstance(exc, ConnectionLost) and exc.at_cap:
            return self.policy.delay(10_000, self.rng)
        return self.policy.delay(retry_state.attempt_number, self.rng)


def is_retryable(exc: BaseException) -> bool:
    """Retry within one backoff run: any loss except one that resets it.

    A stable session's loss and a wake from sleep reset the backoff: the
    caller reconnects at once with a fresh run.
    """
    return isinstance(exc, ConnectionLost) and not (exc.stable or exc.cause == "wake")
