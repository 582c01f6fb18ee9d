"""Runtime fault knobs of the stub (state only; the sides apply them).

These are the stub-wide faults; per-session ones (dropping a provider,
stalling its reads) act on the session directly, see
:class:`~coordinator_stub.app.CoordinatorStub`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RefuseMode = Literal["http_503", "unlisten"]


@dataclass
class Faults:
    """Stub-wide fault state.

    Outgoing frames:
        delay_s: Every frame sent to providers leaves this long after it was
            queued (order preserved; delays do not add up).
        duplicate: Every frame sent to providers is written twice.

    Connections:
        refuse_until: Monotonic time until which new connections are refused.
        refuse_mode: ``"http_503"`` answers the upgrade request with HTTP 503
            (and ``Retry-After``); ``"unlisten"`` closes the listening socket
            so connects fail with ECONNREFUSED, and listens again afterwards.
        accept_then_close: ``True``: accept every WebSocket, then close it at
            once; an int: do that to the next N connections; 0/``False``: off.
        accept_close_code: Close code used by accept-then-close.
        accept_close_reason: Close reason used by accept-then-close.
    """

    delay_s: float = 0.0
    duplicate: bool = False
    refuse_until: float = 0.0
    refuse_mode: RefuseMode = "http_503"
    accept_then_close: int | bool = 0
    accept_close_code: int = 1013
    accept_close_reason: str = "try again later"

    def refusing(self, now: float) -> bool:
        return now < self.refuse_until

    def take_accept_then_close(self) -> bool:
        """Whether the connection being accepted must be closed at once."""
        if self.accept_then_close is True:
            return True
        if self.accept_then_close is False or self.accept_then_close <= 0:
            return False
        self.accept_then_close -= 1
        return True

    def reset(self) -> None:
        """Back to no faults."""
        self.delay_s = 0.0
        self.duplicate = False
        self.refuse_until = 0.0
        self.refuse_mode = "http_503"
        self.accept_then_close = 0
