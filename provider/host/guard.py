"""The owner's Mac comes first: when to hold back, and when to come back (pure).

From each :class:`~provider.host.sensors.HostSample`, :func:`step` decides
which *holds* apply. A hold has a reason and a slot limit:

======================== ===================================== ===========
reason                   condition                             slot limit
======================== ===================================== ===========
``memory_pressure_critical`` memory pressure is critical       0 (pause)
``thermal_critical``     thermal state is critical             0 (pause)
``thermal_serious``      thermal state is serious or critical  1
``on_battery``           on battery and ``pause_on_battery``   0 (pause)
======================== ===================================== ===========

A hold starts on the first sample that shows its condition (the owner's
machine does not wait) and ends only after its condition has been absent for
``recover_after_s`` without a break (so a machine hovering at a threshold
does not flap). A reading that is unknown counts as absent: a broken sensor
must not hold the provider back for ever. Holds never touch requests already
running: a limit only lowers the slots offered for new ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from provider.host.sensors import HostSample

MEMORY_CRITICAL: Final = "memory_pressure_critical"
THERMAL_CRITICAL: Final = "thermal_critical"
THERMAL_SERIOUS: Final = "thermal_serious"
ON_BATTERY: Final = "on_battery"


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """``pause_on_battery``: pause while on battery; ``recover_after_s``: how
    long a condition must stay away before its hold ends; ``serious_slots``:
    slots offered while the thermal state is serious."""

    pause_on_battery: bool = True
    recover_after_s: float = 60.0
    serious_slots: int = 1

    def conditions(self, sample: HostSample) -> dict[str, int]:
        """The holds ``sample`` calls for, reason -> slot limit."""
        found: dict[str, int] = {}
        if sample.memory_pressure == "critical":
            found[MEMORY_CRITICAL] = 0
        if sample.thermal_state == "critical":
            found[THERMAL_CRITICAL] = 0
        if sample.thermal_state in ("serious", "critical"):
            found[THERMAL_SERIOUS] = self.serious_slots
        if self.pause_on_battery and sample.power_source == "battery":
            found[ON_BATTERY] = 0
        return found


@dataclass(frozen=True, slots=True)
class Holds:
    """The holds in force: ``active`` reason -> slot limit, in the order they
    began; ``clear_since`` reason -> when its condition was last seen gone
    (only for holds waiting out ``recover_after_s``)."""

    active: Mapping[str, int] = field(default_factory=dict)
    clear_since: Mapping[str, float] = field(default_factory=dict)

    @property
    def slot_limit(self) -> int | None:
        """The fewest slots any hold allows; ``None`` without holds."""
        return min(self.active.values()) if self.active else None

    @property
    def pauses(self) -> tuple[str, ...]:
        """Reasons whose hold allows no slot at all (the provider is degraded)."""
        return tuple(reason for reason, limit in self.active.items() if limit == 0)

    @property
    def limiting_reason(self) -> str:
        """The reason behind :attr:`slot_limit` (the first hold at that limit)."""
        limit = self.slot_limit
        return next((r for r, n in self.active.items() if n == limit), "")


def step(policy: GuardPolicy, holds: Holds, sample: HostSample, now: float) -> Holds:
    """The holds after ``sample``, taken at ``now`` (a monotonic clock, seconds)."""
    wanted = policy.conditions(sample)
    active: dict[str, int] = {}
    clear_since: dict[str, float] = {}
    for reason, limit in holds.active.items():
        if reason in wanted:
            active[reason] = wanted[reason]
            continue
        since = holds.clear_since.get(reason, now)
        if now - since < policy.recover_after_s:
            active[reason] = limit
            clear_since[reason] = since
    for reason, limit in wanted.items():
        active.setdefault(reason, limit)
    return Holds(active, clear_since)
