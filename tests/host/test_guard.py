"""The owner-first policy as a pure function, the state machine's slot limit, restarts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from provider.coordinator.state import StateMachine
from provider.host.guard import (
    MEMORY_CRITICAL,
    ON_BATTERY,
    THERMAL_CRITICAL,
    THERMAL_SERIOUS,
    GuardPolicy,
    Holds,
    step,
)
from provider.host.restarts import record_start
from provider.host.sensors import HostSample

POLICY = GuardPolicy(recover_after_s=60.0)


def sample(**kw: object) -> HostSample:
    return HostSample(observed_at=0.0, **kw)  # type: ignore[arg-type]


CALM = sample(memory_pressure="normal", thermal_state="nominal", power_source="external")


def test_calm_machine_holds_nothing() -> None:
    holds = step(POLICY, Holds(), CALM, 0.0)
    assert holds == Holds() and holds.slot_limit is None and holds.pauses == ()


def test_each_condition_and_its_limit() -> None:
    assert dict(step(POLICY, Holds(), sample(memory_pressure="critical"), 0).active) == {
        MEMORY_CRITICAL: 0
    }
    assert dict(step(POLICY, Holds(), sample(memory_pressure="warning"), 0).active) == {}
    assert dict(step(POLICY, Holds(), sample(thermal_state="serious"), 0).active) == {
        THERMAL_SERIOUS: 1
    }
    assert dict(step(POLICY, Holds(), sample(thermal_state="fair"), 0).active) == {}
    critical = step(POLICY, Holds(), sample(thermal_state="critical"), 0)
    assert dict(critical.active) == {THERMAL_CRITICAL: 0, THERMAL_SERIOUS: 1}
    assert critical.slot_limit == 0 and critical.pauses == (THERMAL_CRITICAL,)
    assert critical.limiting_reason == THERMAL_CRITICAL
    battery = sample(power_source="battery")
    assert dict(step(POLICY, Holds(), battery, 0).active) == {ON_BATTERY: 0}
    assert step(GuardPolicy(pause_on_battery=False), Holds(), battery, 0) == Holds()


def test_hold_starts_at_once_and_ends_only_after_a_clear_stretch() -> None:
    hot = sample(thermal_state="serious")
    holds = step(POLICY, Holds(), hot, 0.0)
    assert holds.slot_limit == 1
    holds = step(POLICY, holds, CALM, 10.0)  # cooled: the clock starts
    assert holds.slot_limit == 1 and dict(holds.clear_since) == {THERMAL_SERIOUS: 10.0}
    holds = step(POLICY, holds, CALM, 69.9)
    assert holds.slot_limit == 1
    holds = step(POLICY, holds, hot, 70.0)  # hot again: the clock resets
    assert holds.slot_limit == 1 and dict(holds.clear_since) == {}
    holds = step(POLICY, holds, CALM, 80.0)
    holds = step(POLICY, holds, CALM, 139.9)
    assert holds.slot_limit == 1
    holds = step(POLICY, holds, CALM, 140.0)
    assert holds == Holds()


def test_hovering_at_a_threshold_does_not_flap() -> None:
    holds, changes, limit = Holds(), 0, None
    for i in range(600):  # a machine toggling between fair and serious every second
        reading = sample(thermal_state="serious" if i % 2 else "fair")
        holds = step(POLICY, holds, reading, float(i))
        if holds.slot_limit != limit:
            changes, limit = changes + 1, holds.slot_limit
    assert changes == 1 and limit == 1


def test_unknown_readings_count_as_clear() -> None:
    holds = step(POLICY, Holds(), sample(memory_pressure="critical"), 0.0)
    holds = step(POLICY, holds, sample(), 1.0)
    assert holds.pauses == (MEMORY_CRITICAL,)
    assert step(POLICY, holds, sample(), 61.0) == Holds()


def test_worse_condition_while_recovering_takes_over() -> None:
    holds = step(POLICY, Holds(), sample(thermal_state="critical"), 0.0)
    holds = step(POLICY, holds, sample(thermal_state="serious"), 5.0)
    # Still paused (critical is recovering), and serious goes on holding one slot.
    assert holds.slot_limit == 0 and THERMAL_CRITICAL in holds.clear_since
    holds = step(POLICY, holds, sample(thermal_state="serious"), 65.0)
    assert dict(holds.active) == {THERMAL_SERIOUS: 1}


def test_zero_recovery_time_recovers_on_the_first_clear_reading() -> None:
    policy = GuardPolicy(recover_after_s=0.0)
    holds = step(policy, Holds(), sample(power_source="battery"), 0.0)
    assert step(policy, holds, CALM, 0.0) == Holds()


# --------------------------------------------------------------------------
# The state machine's slot limit


def test_limit_lowers_free_slots_and_never_touches_running_jobs() -> None:
    sm = StateMachine(slots_total=4)
    sm.registered()
    sm.job_started()
    sm.job_started()
    change = sm.limit_slots(1, THERMAL_SERIOUS)
    assert change is not None and change.state == "busy" and change.reason == THERMAL_SERIOUS
    assert (sm.in_flight, sm.slots_free, sm.slots_offered, sm.slots_total) == (2, 0, 1, 4)
    sm.job_finished()
    assert sm.state == "busy" and sm.slots_free == 0  # 1 running == 1 offered
    assert sm.job_finished().state == "ready"
    assert sm.slots_free == 1
    sm.limit_slots(None)
    assert sm.slots_free == 4 and sm.limit_reason == ""


def test_full_without_a_limit_is_still_all_slots_busy() -> None:
    sm = StateMachine(slots_total=1)
    sm.registered()
    sm.limit_slots(1, THERMAL_SERIOUS)
    assert sm.job_started().reason == "all_slots_busy"


def test_pause_is_degraded_with_the_reason() -> None:
    sm = StateMachine(slots_total=2)
    sm.registered()
    sm.limit_slots(0, ON_BATTERY)
    change = sm.degrade(ON_BATTERY)
    assert change is not None and (change.state, change.reason, change.slots_free) == (
        "degraded",
        ON_BATTERY,
        0,
    )
    sm.limit_slots(None)
    assert sm.recover(ON_BATTERY).state == "ready"


EVENTS = st.sampled_from(
    ["registered", "disconnected", "degrade", "recover", "drain", "start", "finish", "limit"]
)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 8),
    events=st.lists(st.tuples(EVENTS, st.none() | st.integers(0, 9)), max_size=60),
)
def test_limit_invariants(total: int, events: list[tuple[str, int | None]]) -> None:
    sm = StateMachine(slots_total=total)
    for event, n in events:
        if event == "registered":
            sm.registered()
        elif event == "disconnected":
            sm.disconnected("lost")
        elif event == "degrade":
            sm.degrade(ON_BATTERY)
        elif event == "recover":
            sm.recover(ON_BATTERY)
        elif event == "drain":
            sm.start_drain()
        elif event == "start":
            sm.job_started()
        elif event == "finish" and sm.in_flight > 0:
            sm.job_finished()
        elif event == "limit":
            sm.limit_slots(n, THERMAL_SERIOUS)
        status = sm.status()
        assert 0 <= status.slots_free <= status.slots_total == total
        assert status.slots_free <= sm.slots_offered
        if status.state == "ready":
            assert status.slots_free > 0
        if status.state == "busy":
            assert status.slots_free == 0


# --------------------------------------------------------------------------
# Restarts


def test_restart_count_counts_earlier_starts_of_the_same_provider(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert record_start(path, "prov-a", now=1.0) == 0
    assert record_start(path, "prov-a", now=2.0) == 1
    assert record_start(path, "prov-a", now=3.0) == 2
    assert json.loads(path.read_text()) == {
        "provider_id": "prov-a",
        "starts": 3,
        "last_start_unix": 3.0,
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record_start(path, "prov-b") == 0  # another provider starts over
    path.write_text("{not json")
    assert record_start(path, "prov-b") == 0
    assert record_start(path, "prov-b") == 1
