"""What tests observe: frame logs, rejections and change notification.

Tests should await a condition (:meth:`Changes.wait_for`) instead of
sleeping. Every recorded frame, rejection and pool event calls
:meth:`Changes.notify`, which re-evaluates the waiting predicates.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Direction = Literal["in", "out"]


@dataclass(frozen=True)
class FrameRecord:
    """One frame between the stub and a provider.

    Attributes:
        time: :func:`time.monotonic` when it was received or written.
        provider_id: The provider's id.
        session_id: Which connection of that provider (increasing).
        direction: ``"in"`` (provider -> stub) or ``"out"`` (stub -> provider).
        type: The message ``type``; ``"<binary>"`` for a binary frame,
            ``"<invalid>"`` for text the coordinator cannot even read a
            ``type`` from.
        message: Inbound: the frame as the coordinator parsed it (a record
            of :mod:`coordinator_stub.frames`, attributes named as on the
            wire; an encrypted frame's opened content), or ``None`` when it
            was refused. Outbound: the
            :class:`~coordinator_stub.messages.Outgoing` (an encrypted
            frame's view carries what is inside, e.g. ``body``), or ``None``
            for raw sends.
        raw: The frame as it travelled.
        error: Why the coordinator refused an inbound frame (its parser's
            bad-field message), ``None`` if it accepted it.
        action: What the coordinator did with a refused frame: ``dropped``
            (logged only), ``closed`` (the session was closed) or ``fenced``.
    """

    time: float
    provider_id: str
    session_id: int
    direction: Direction
    type: str
    message: Any
    raw: str | bytes
    error: str | None = None
    action: str | None = None


@dataclass(frozen=True)
class RejectRecord:
    """A connection closed before it became a provider session.

    ``code`` is the WebSocket close code (4000, 4001, 4004, 4005, the
    accept-then-close code) or the HTTP status of a refused handshake.
    """

    time: float
    code: int
    reason: str
    provider_id: str | None = None
    remote: str = ""


class Changes:
    """Wake-up point for anything that waits on stub state."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(
        self, predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Return the first truthy ``predicate()``, re-checked on every change.

        Raises :class:`TimeoutError` naming ``what`` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    result = predicate()
                    if result:
                        return result
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None


class FrameLog:
    """Per-provider frame history, bounded to ``size`` frames per direction."""

    def __init__(self, size: int, changes: Changes) -> None:
        self.size = size
        self._changes = changes
        self._frames: dict[tuple[str, Direction], deque[FrameRecord]] = {}
        self.rejections: list[RejectRecord] = []

    def add(self, record: FrameRecord) -> None:
        key = (record.provider_id, record.direction)
        frames = self._frames.get(key)
        if frames is None:
            frames = self._frames[key] = deque(maxlen=self.size)
        frames.append(record)
        self._changes.notify()

    def reject(self, record: RejectRecord) -> None:
        self.rejections.append(record)
        self._changes.notify()

    def frames(self, provider_id: str | None, direction: Direction) -> list[FrameRecord]:
        if provider_id is not None:
            return list(self._frames.get((provider_id, direction), ()))
        merged = [f for (_, d), frames in self._frames.items() if d == direction for f in frames]
        merged.sort(key=lambda f: f.time)
        return merged
