"""Pure pool state: effective state rules, routing, accounting, config checks."""

from __future__ import annotations

import msgspec
import pytest

from coordinator_stub import StubConfig
from coordinator_stub.frames import Registration, parse_heartbeat, parse_hello
from coordinator_stub.pool import Pool
from provider.coordinator.messages import encode_text

from .scripted import ScriptedProvider
from .scripted import make_hello as _provider_hello


def make_hello(provider_id: str = "p1", **overrides: object) -> Registration:
    """The registration the stub's own parser makes of the scripted hello."""
    return parse_hello(encode_text(_provider_hello(provider_id, **overrides)))


def _heartbeat(status: str = "ready", slots_free: int = 4):
    hb = ScriptedProvider("ws://unused").heartbeat(status=status, slots_free=slots_free)
    return parse_heartbeat(msgspec.json.encode(hb))


def test_gate_then_reported_states():
    pool = Pool(warmup_gate=True)
    record, replaced, events = pool.register(make_hello("a"), 1, now=0.0)
    assert replaced is None and record.state == "degraded"
    assert events[0]["type"] == "provider_joined"
    assert pool.heartbeat("a", 1, _heartbeat("ready"), 1.0)[1] == []  # still gated
    events = pool.warmed_up("a", 1, 2.0)
    assert [(e["from"], e["to"]) for e in events] == [("degraded", "ready")]
    gap, events = pool.heartbeat("a", 1, _heartbeat("busy"), 4.5)
    assert gap == 3.5 and events[0]["to"] == "busy"


def test_unavailable_is_sticky_until_reregistration():
    pool = Pool(warmup_gate=False)
    pool.register(make_hello("a"), 1, 0.0)
    pool.heartbeat("a", 1, _heartbeat("unavailable"), 1.0)
    assert pool.providers["a"].state == "unavailable"
    for status in ("ready", "degraded", "busy"):
        assert pool.heartbeat("a", 1, _heartbeat(status), 2.0)[1] == []
    assert pool.providers["a"].state == "unavailable"
    record, replaced, _ = pool.register(make_hello("a"), 2, 3.0)
    assert replaced == 1 and record.state == "ready"


def test_drop_grace_and_stale_sessions():
    pool = Pool(warmup_gate=False)
    pool.register(make_hello("a"), 1, 0.0)
    pool.begin_request("a", 1, "r1", "buyer", False)
    drop, events = pool.drop("a", 1, "inactivity", 5.0)
    assert (drop.cause, drop.time) == ("inactivity", 5.0)
    assert [e["type"] for e in events] == ["provider_dropped", "state_changed"]
    assert pool.providers["a"].state == "unavailable" and pool.providers["a"].in_flight == {}
    assert pool.pick() is None
    # A reconnect within grace wins over the old session's removal.
    pool.register(make_hello("a"), 2, 6.0)
    assert pool.remove("a", 1, "grace_expired", 35.0) == []
    assert pool.heartbeat("a", 1, _heartbeat(), 7.0) == (None, [])  # stale session ignored
    pool.drop("a", 2, "fault_drop", 8.0)
    assert pool.remove("a", 2, "grace_expired", 38.0)[0]["type"] == "provider_removed"
    assert "a" not in pool.providers and [d.cause for d in pool.drops] == [
        "inactivity",
        "fault_drop",
    ]


def test_routing_prefers_least_loaded_and_model():
    pool = Pool(warmup_gate=False)
    pool.register(make_hello("a", max_concurrency=2), 1, 0.0)
    pool.register(make_hello("b", max_concurrency=4, model_id="other"), 2, 0.0)
    assert pool.pick("other").provider_id == "b"  # type: ignore[union-attr]
    assert pool.pick("unknown-model") is not None
    pool.begin_request("b", 2, "r1", "buyer", False)
    assert pool.pick().provider_id == "a"  # type: ignore[union-attr]
    pool.begin_request("a", 1, "r2", "buyer", False)
    pool.begin_request("a", 1, "r3", "buyer", False)
    assert pool.pick().provider_id == "b"  # type: ignore[union-attr]
    pool.finish_request("a", 1, "r2", "buyer", "complete")
    assert pool.requests_finished["complete"] == 1 and pool.providers["a"].requests_served == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"heartbeat_interval_s": 0},
        {"write_deadline_s": 0},
        {"events_queue_size": 0},
        {"tokens": "abc"},
        {"grace_s": -1},
    ],
)
def test_config_rejects_nonsense(bad):
    with pytest.raises((ValueError, TypeError)):
        StubConfig(**bad)


def test_config_defaults_match_the_real_coordinator():
    config = StubConfig(tokens=["a"])
    assert config.tokens == ("a",)
    assert (config.write_deadline_s, config.inactivity_s, config.grace_s) == (10.0, 90.0, 30.0)
    assert (config.probe_timeout_s, config.wake_gap_s, config.heartbeat_interval_s) == (
        0.5,
        120.0,
        30,
    )
    assert config.warmup_gate and config.keepalive_s == 5.0 and config.request_timeout_s == 300
    assert config.replace(inactivity_s=None).inactivity_s is None
