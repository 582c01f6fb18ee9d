from __future__ import annotations

import pytest

from provider.coordinator.heartbeat import heartbeat_tick, watchdog_timeout
from provider.coordinator.window import MetricsWindow


@pytest.mark.parametrize(("interval", "tick"), [(30, 5), (5, 5), (3, 3), (1, 1), (0, 1)])
def test_tick(interval: float, tick: float) -> None:
    assert heartbeat_tick(interval) == tick


def test_watchdog() -> None:
    assert watchdog_timeout(5) == 15 and watchdog_timeout(1) == 15 and watchdog_timeout(6) == 18


def test_window_rolls_only_on_full_interval() -> None:
    w = MetricsWindow(interval_s=30, started=0)
    w.record(latency_ms=100, tokens=10, decode_s=0.5)
    w.record(latency_ms=300, tokens=30, decode_s=1.5)
    assert not w.maybe_roll(5) and not w.maybe_roll(29.9)
    v = w.values()
    assert (v.requests_served_since_last, v.avg_latency_ms_since_last) == (2, 200)
    assert v.throughput_tps_since_last == 20
    assert w.maybe_roll(30)
    assert w.values().requests_served_since_last == 0
    assert not w.maybe_roll(45)
