"""The provider's state machine: pure, no I/O.

The state is derived, never set directly, from a handful of facts:

- ``registered``: a hello_ack arrived on the current connection. A provider
  that is not registered is ``unavailable``; only :meth:`StateMachine.registered`
  leaves ``unavailable``, which is the coordinator's rule that recovery from
  unavailable is a fresh registration.
- ``draining``: a drain was asked for (coordinator ``drain`` or a signal).
- ``degraded`` reasons: model loading, warm-up running, engine failure.
- slots: ``slots_free = max(0, slots_offered - in_flight)``; no free slot is
  ``busy``. ``slots_offered`` is ``slots_total`` unless a slot limit is set
  (:meth:`StateMachine.limit_slots`: the host holding back for its owner),
  which lowers it without touching the requests already running.

Precedence: unavailable, draining, degraded, busy, ready. Each input
returns the new :class:`Status` when (state, reason) changed, else ``None``,
so the caller sends exactly one ``state_update`` per change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from provider.coordinator.messages import ProviderState


@dataclass(frozen=True, slots=True)
class Status:
    state: ProviderState
    reason: str
    slots_free: int
    slots_total: int


@dataclass
class StateMachine:
    slots_total: int
    registered_now: bool = False
    draining: bool = False
    in_flight: int = 0
    degraded_reasons: list[str] = field(default_factory=list)
    disconnect_reason: str = "not_connected"
    slot_limit: int | None = None
    limit_reason: str = ""
    _last: tuple[ProviderState, str] | None = None

    def __post_init__(self) -> None:
        if self.slots_total < 1:
            raise ValueError("slots_total must be >= 1")
        self._last = (self.state, self.reason)

    @property
    def slots_offered(self) -> int:
        if self.slot_limit is None:
            return self.slots_total
        return max(0, min(self.slots_total, self.slot_limit))

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_offered - self.in_flight)

    @property
    def state(self) -> ProviderState:
        if not self.registered_now:
            return "unavailable"
        if self.draining:
            return "draining"
        if self.degraded_reasons:
            return "degraded"
        if self.in_flight >= self.slots_offered:
            return "busy"
        return "ready"

    @property
    def reason(self) -> str:
        state = self.state
        if state == "unavailable":
            return self.disconnect_reason
        if state == "draining":
            return "drain_requested"
        if state == "degraded":
            return self.degraded_reasons[-1]
        if state == "busy":
            limited = self.slot_limit is not None and self.in_flight < self.slots_total
            return self.limit_reason if limited and self.limit_reason else "all_slots_busy"
        return "ok"

    def status(self) -> Status:
        return Status(self.state, self.reason, self.slots_free, self.slots_total)

    def _changed(self) -> Status | None:
        now = (self.state, self.reason)
        if now == self._last:
            return None
        self._last = now
        return self.status()

    # Inputs ---------------------------------------------------------------

    def registered(self) -> Status | None:
        self.registered_now = True
        return self._changed()

    def disconnected(self, reason: str) -> Status | None:
        self.registered_now = False
        self.disconnect_reason = reason
        return self._changed()

    def degrade(self, reason: str) -> Status | None:
        if reason not in self.degraded_reasons:
            self.degraded_reasons.append(reason)
        return self._changed()

    def recover(self, reason: str) -> Status | None:
        if reason in self.degraded_reasons:
            self.degraded_reasons.remove(reason)
        return self._changed()

    def limit_slots(self, limit: int | None, reason: str = "") -> Status | None:
        """Offer at most ``limit`` slots (``None``: all) because of ``reason``.

        Requests in flight are never touched: a limit below them only leaves
        no slot free until enough of them finish.
        """
        if limit is not None and limit < 0:
            raise ValueError("slot limit must be >= 0")
        self.slot_limit = limit
        self.limit_reason = reason if limit is not None else ""
        return self._changed()

    def start_drain(self) -> Status | None:
        self.draining = True
        return self._changed()

    def end_drain(self) -> Status | None:
        """A coordinator-asked drain is over: the next registration serves again."""
        self.draining = False
        return self._changed()

    def job_started(self) -> Status | None:
        self.in_flight += 1
        return self._changed()

    def job_finished(self) -> Status | None:
        if self.in_flight <= 0:
            raise RuntimeError("job_finished without a job in flight")
        self.in_flight -= 1
        return self._changed()

    def can_accept(self) -> bool:
        return self.state == "ready"
