"""The ``*_since_last`` metrics window of heartbeats: pure, no I/O.

Heartbeats go out every tick (at most 5 s) but the coordinator reads the
window as covering its own heartbeat interval, so the window accumulates
across ticks and rolls only when a full interval has passed
(:meth:`MetricsWindow.maybe_roll`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowValues:
    requests_served_since_last: int
    avg_latency_ms_since_last: float
    throughput_tps_since_last: float


@dataclass
class MetricsWindow:
    interval_s: float
    started: float = 0.0
    requests: int = 0
    latency_ms_total: float = 0.0
    tokens: int = 0
    decode_s: float = 0.0

    def record(self, *, latency_ms: float, tokens: int, decode_s: float) -> None:
        """One request served: end-to-end latency, tokens made, decode time."""
        self.requests += 1
        self.latency_ms_total += max(0.0, latency_ms)
        self.tokens += max(0, tokens)
        self.decode_s += max(0.0, decode_s)

    def values(self) -> WindowValues:
        avg = self.latency_ms_total / self.requests if self.requests else 0.0
        tps = self.tokens / self.decode_s if self.decode_s > 0 else 0.0
        return WindowValues(self.requests, round(avg, 3), round(tps, 3))

    def maybe_roll(self, now: float) -> bool:
        """Start a new window if a full interval has passed since this one began."""
        if now - self.started < self.interval_s:
            return False
        self.started = now
        self.requests = 0
        self.latency_ms_total = 0.0
        self.tokens = 0
        self.decode_s = 0.0
        return True
