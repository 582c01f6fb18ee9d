"""The state machine: derived states, one change per transition, and its invariants."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from provider.coordinator.state import StateMachine


def test_lifecycle_reports_each_change_once() -> None:
    sm = StateMachine(slots_total=2)
    assert sm.state == "unavailable"
    assert sm.degrade("loading_model") is None  # still unavailable: no change to report
    change = sm.registered()
    assert change is not None and change.state == "degraded" and change.reason == "loading_model"
    assert sm.recover("loading_model").state == "ready"
    assert sm.job_started() is None  # ready -> ready, slots 1 of 2
    busy = sm.job_started()
    assert busy.state == "busy" and busy.slots_free == 0
    assert sm.job_finished().state == "ready"
    assert sm.start_drain().state == "draining"
    assert sm.disconnected("lost").state == "unavailable"


def test_unavailable_only_leaves_through_registration() -> None:
    sm = StateMachine(slots_total=1)
    sm.registered()
    sm.disconnected("lost")
    sm.degrade("x")
    sm.recover("x")
    sm.job_started()
    sm.job_finished()
    assert sm.state == "unavailable"
    assert sm.registered().state == "ready"


def test_job_finished_without_job_is_an_error() -> None:
    sm = StateMachine(slots_total=1)
    try:
        sm.job_finished()
    except RuntimeError:
        return
    raise AssertionError("expected RuntimeError")


EVENTS = st.sampled_from(
    ["registered", "disconnected", "degrade", "recover", "drain", "start", "finish"]
)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 8), events=st.lists(EVENTS, max_size=60))
def test_invariants(total: int, events: list[str]) -> None:
    sm = StateMachine(slots_total=total)
    for event in events:
        before = sm.state
        if event == "registered":
            sm.registered()
        elif event == "disconnected":
            sm.disconnected("lost")
        elif event == "degrade":
            sm.degrade("warming_up")
        elif event == "recover":
            sm.recover("warming_up")
        elif event == "drain":
            sm.start_drain()
        elif event == "start":
            sm.job_started()
        elif event == "finish" and sm.in_flight > 0:
            sm.job_finished()
        status = sm.status()
        assert 0 <= status.slots_free <= status.slots_total == total
        if before == "unavailable" and status.state != "unavailable":
            assert event == "registered"
        if status.state == "busy":
            assert status.slots_free == 0
