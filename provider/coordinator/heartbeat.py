"""Liveness towards the coordinator: the heartbeat task and the watchdog.

The coordinator arms a 10 s write deadline and only counts TEXT frames as
liveness, so the heartbeat is a text frame on a wall-clock tick of
``max(1, min(heartbeat_interval_s, 5))`` seconds. It runs in its own task and
never waits on inference: a long prefill cannot delay it.

The watchdog is a backstop: no completed write and no inbound frame for
``max(3 x tick, 15)`` s aborts the connection. A write that blocks is ended
sooner by the bounded send (5 s), and on an idle dead path the heartbeats
still complete into the kernel's buffer, so there it is ``TCP_USER_TIMEOUT``
(:mod:`.sockopts`) that ends the connection (docs/reliability.md has the
table of which mechanism ends which case).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from provider import telemetry
from provider.coordinator.reconnect import ConnectionLost
from provider.coordinator.sender import Sender

log = logging.getLogger("mlx_provider.heartbeat")


def heartbeat_tick(interval_s: float) -> float:
    """Seconds between heartbeats: max(1, min(interval, 5)), below the 10 s deadline."""
    return max(1.0, min(float(interval_s), 5.0))


def watchdog_timeout(tick_s: float) -> float:
    """Silence that means a half-open socket: max(3 x tick, 15) s."""
    return max(3.0 * tick_s, 15.0)


async def heartbeat_loop(
    sender: Sender,
    make_heartbeat: Callable[[], msgspec.Struct],
    *,
    tick: float,
    on_sent: Callable[[float], None] | None = None,
) -> None:
    """Send ``make_heartbeat()`` now and then every ``tick`` seconds, forever.

    Ticks are scheduled on the loop clock from the start, not from the end of
    the previous send, so a slow send does not push every later one back.
    """
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        await sender.send(make_heartbeat())
        telemetry.heartbeats_sent.inc()
        if on_sent is not None:
            on_sent(time.time())
        due += tick
        now = loop.time()
        if due < now:  # fell behind (a send waited); skip, do not burst
            due = now + tick
        await asyncio.sleep(due - now)


async def watchdog_loop(
    silence: Callable[[], float],
    abort: Callable[[str], None],
    *,
    timeout: float,
    check_every: float = 1.0,
) -> None:
    """Raise ConnectionLost("watchdog") once ``silence()`` exceeds ``timeout``.

    ``abort(detail)`` is called first, to drop the connection.
    """
    while True:
        await asyncio.sleep(min(check_every, timeout / 4))
        quiet = silence()
        if quiet > timeout:
            detail = f"no completed send or inbound frame for {quiet:.1f} s"
            abort(detail)
            raise ConnectionLost("watchdog", detail)
