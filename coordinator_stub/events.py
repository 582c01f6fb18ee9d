"""Pool event bus with bounded, lossy subscribers.

:meth:`EventBus.publish` never blocks and never awaits: each subscriber has
its own bounded queue, and a subscriber whose queue is full loses the event
(counted). When it has room again, a ``dropped`` notice carrying the number
of lost events is queued first, so the notice sits exactly where the gap is.

Subscribing takes a snapshot in the same synchronous step
(:meth:`EventBus.subscribe`), so no event can fall between the snapshot and
the first queued event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Event = dict[str, Any]


class Subscriber:
    """One consumer of pool events, with a bounded queue.

    Args:
        subscriber_id: Identifier shown in statistics.
        maxsize: Capacity of the queue, ``dropped`` notices included.
    """

    def __init__(self, subscriber_id: int, maxsize: int) -> None:
        self.id = subscriber_id
        self.maxsize = maxsize
        self.dropped_total = 0
        self.delivered = 0
        self._pending_dropped = 0
        self._items: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, event: Event) -> bool:
        """Queue ``event`` if there is room; never blocks. Returns whether queued."""
        if self._closed:
            return False
        if self._pending_dropped and len(self._items) < self.maxsize:
            self._items.append({"type": "dropped", "count": self._pending_dropped})
            self._pending_dropped = 0
        if len(self._items) >= self.maxsize:
            self._pending_dropped += 1
            self.dropped_total += 1
            return False
        self._items.append(event)
        self._wakeup.set()
        return True

    async def get(self) -> Event | None:
        """The next event; ``None`` once the subscriber is closed."""
        while not self._items:
            if self._closed:
                return None
            if self._pending_dropped:
                # Caught up after losing events: report the gap now rather
                # than waiting for the next event to carry it.
                count, self._pending_dropped = self._pending_dropped, 0
                return {"type": "dropped", "count": count}
            self._wakeup.clear()
            await self._wakeup.wait()
        self.delivered += 1
        return self._items.popleft()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queued": len(self._items),
            "delivered": self.delivered,
            "dropped_total": self.dropped_total,
        }


class EventBus:
    """Fan-out of pool events to subscribers and synchronous listeners.

    Every published event gets ``seq`` (increasing by one per event, so a
    subscriber sees gaps) and ``ts`` (Unix time).

    Args:
        queue_size: Bound of each subscriber's queue (default 256).
    """

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self.seq = 0
        self.published = 0
        self._subscribers: dict[int, Subscriber] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._ids = itertools.count(1)

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` synchronously on every publish."""
        self._listeners.append(listener)

    def publish(self, event: Event) -> Event:
        """Stamp and deliver ``event`` to everyone; never blocks."""
        self.seq += 1
        self.published += 1
        stamped = {"seq": self.seq, "ts": round(time.time(), 6), **event}
        for subscriber in self._subscribers.values():
            subscriber.offer(stamped)
        for listener in self._listeners:
            try:
                listener(stamped)
            except Exception:
                logger.exception("event listener failed event_type=%s", event.get("type"))
        return stamped

    def publish_all(self, events: list[Event]) -> None:
        for event in events:
            self.publish(event)

    def subscribe(self, snapshot: Callable[[], Any]) -> tuple[Subscriber, Event]:
        """Register a subscriber and take ``snapshot()`` in one step.

        Returns the subscriber and a ``snapshot`` event whose ``seq`` is the
        last event it already reflects; the subscriber's first queued event
        has ``seq`` + 1.
        """
        subscriber = Subscriber(next(self._ids), self.queue_size)
        self._subscribers[subscriber.id] = subscriber
        event = {"type": "snapshot", "seq": self.seq, "ts": round(time.time(), 6)}
        event["pool"] = snapshot()
        return subscriber, event

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.close()
        self._subscribers.pop(subscriber.id, None)

    def subscribers(self) -> list[Subscriber]:
        return list(self._subscribers.values())

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self._subscribers.values()]

    def close(self) -> None:
        """Close every subscriber (their :meth:`Subscriber.get` returns ``None``)."""
        for subscriber in list(self._subscribers.values()):
            self.unsubscribe(subscriber)
