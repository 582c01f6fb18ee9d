"""``safety_telemetry`` and ``hardware_summary`` as they go on the wire, checked
with the coordinator's rules (:mod:`.wire_rules`), not with our own Structs."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from provider.coordinator.messages import DiagnosticStatus, HardwareSummary, Heartbeat, encode
from provider.coordinator.safety import hardware_tier, safety_telemetry
from provider.host.sensors import HostSample

from .wire_rules import (
    check_diagnostic_status,
    check_hardware_summary,
    check_heartbeat_ints,
    check_safety_telemetry,
)

HASH = "0123456789abcdef" * 4
SNAPSHOT = "macprovider.snapshot-manifest.v1"


class HeartbeatWithHash(Heartbeat, tag="heartbeat", kw_only=True):
    """A heartbeat with the outer model identity (PROTO adds these fields to Heartbeat)."""

    model_hash: str | None = None
    model_hash_algorithm: str | None = None


def heartbeat(cls: type[Heartbeat] = Heartbeat, **kw: Any) -> Any:
    fields: dict[str, Any] = dict(
        status="ready",
        model_id="mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        model_params_b=0.5,
        ram_gb=36,
        max_context_tokens=32768,
        max_concurrency=2,
        slots_free=2,
        slots_total=2,
        throughput_tps_estimate=80.0,
        requests_served_since_last=0,
        avg_latency_ms_since_last=0.0,
        throughput_tps_since_last=0.0,
        loading=False,
    )
    return cls(**(fields | kw))


READING = HostSample(
    observed_at=1.0,
    memory_pressure="warning",
    thermal_state="serious",
    power_source="battery",
    cpu_pct=12.5,
    gpu_pct=31.0,
    rss_bytes=5 * 2**30,
)
NOW = datetime(2026, 7, 14, 12, 0, 0, 123456, tzinfo=UTC)


def build(hb: Any, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        provider_id="prov-a",
        reading=READING,
        model_loaded=True,
        requests_in_flight=1,
        rss_bytes=5 * 2**30 + 123,
        restart_count=2,
        uptime_s=3600.7,
        now=NOW,
        observation_id="obs-1",
    )
    hb.safety_telemetry = safety_telemetry(hb, **(args | kw))
    return hb


def wire(hb: Heartbeat) -> dict[str, Any]:
    return json.loads(encode(hb))


V2 = dict(assigned_id="session-1", binary_version="1.8.123", compatibility_set_id="set-a")


def test_schema_1_is_valid_and_exact() -> None:
    hb = wire(build(heartbeat()))
    assert check_safety_telemetry(hb) == [] and check_heartbeat_ints(hb) == []
    assert hb["safety_telemetry"] == {
        "schema_version": 1,
        "provider_id": "prov-a",
        "model_id": "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        "model_loaded": True,
        "runtime_state": "ready",
        "hardware_tier": "32GB",
        "requests_in_flight": 1,
        "requests_queued": 0,
        "memory_rss_mb": 5120,
        "memory_capacity_mb": 36 * 1024,
        "memory_pressure": "warning",
        "thermal_state": "serious",
        "thermally_throttled": True,
        "restart_count": 2,
        "uptime_s": 3600,
        "coordinator_connected": True,
        "observation_id": "obs-1",
        "observed_at": "2026-07-14T12:00:00.123Z",
        "valid_for_ms": 90000,
    }


def test_schema_2_when_every_identity_is_known() -> None:
    hb = wire(
        build(heartbeat(HeartbeatWithHash, model_hash=HASH, model_hash_algorithm=SNAPSHOT), **V2)
    )
    assert check_safety_telemetry(hb) == []
    t = hb["safety_telemetry"]
    assert t["schema_version"] == 2
    identity = ("coordinator_session_id", "binary_version", "compatibility_set_id")
    assert [t[k] for k in identity] == ["session-1", "1.8.123", "set-a"]
    assert (t["model_hash"], t["model_hash_algorithm"]) == (HASH, SNAPSHOT)
    assert (t["cpu_utilization_pct"], t["gpu_utilization_pct"]) == (12.5, 31.0)
    assert (t["gpu_utilization_scope"], t["power_source"]) == ("host", "battery")
    assert "weights_manifest_sha256" not in t


def test_schema_2_sends_null_for_unknown_utilisation() -> None:
    reading = HostSample(observed_at=1.0)
    hb = wire(
        build(
            heartbeat(HeartbeatWithHash, model_hash=HASH, model_hash_algorithm=SNAPSHOT),
            reading=reading,
            **V2,
        )
    )
    t = hb["safety_telemetry"]
    assert check_safety_telemetry(hb) == []
    assert t["cpu_utilization_pct"] is None and t["gpu_utilization_pct"] is None
    assert (t["memory_pressure"], t["thermal_state"], t["power_source"]) == (
        "normal",
        "nominal",
        "unknown",
    )
    assert t["thermally_throttled"] is False


@pytest.mark.parametrize(
    "missing",
    [
        {"assigned_id": None},
        {"binary_version": None},
        {"compatibility_set_id": None},
        {"binary_version": "1" * 33},  # over the coordinator's 32 bytes
        {"compatibility_set_id": "bad\x01id"},
    ],
)
def test_schema_1_when_a_v2_fact_is_missing_or_invalid(missing: dict[str, Any]) -> None:
    hb = wire(
        build(
            heartbeat(HeartbeatWithHash, model_hash=HASH, model_hash_algorithm=SNAPSHOT),
            **(V2 | missing),
        )
    )
    assert hb["safety_telemetry"]["schema_version"] == 1
    assert "cpu_utilization_pct" not in hb["safety_telemetry"]
    assert check_safety_telemetry(hb) == []


def test_schema_1_without_a_valid_outer_model_hash() -> None:
    # Schema 2 must match the heartbeat's own model_hash; without one it cannot be sent.
    for hb in (
        heartbeat(),
        heartbeat(HeartbeatWithHash, model_hash=HASH),
        heartbeat(HeartbeatWithHash, model_hash=HASH.upper(), model_hash_algorithm=SNAPSHOT),
        heartbeat(HeartbeatWithHash, model_hash=HASH, model_hash_algorithm="sha256"),
    ):
        out = wire(build(hb, **V2))
        assert out["safety_telemetry"]["schema_version"] == 1
        assert check_safety_telemetry(out) == []


def test_no_telemetry_rather_than_an_invalid_one() -> None:
    assert build(heartbeat(), provider_id=None).safety_telemetry is None
    assert build(heartbeat(ram_gb=0)).safety_telemetry is None  # capacity must be >= 1
    assert wire(build(heartbeat(), provider_id=None))["safety_telemetry"] is None


def test_state_and_model_follow_the_heartbeat() -> None:
    hb = wire(build(heartbeat(status="degraded", model_id="other")))
    assert hb["safety_telemetry"]["runtime_state"] == "degraded"
    assert hb["safety_telemetry"]["model_id"] == "other"
    assert check_safety_telemetry(hb) == []


@pytest.mark.parametrize(
    ("ram_gb", "tier"), [(8, "8GB"), (12, "8GB"), (16, "16GB"), (24, "16GB"), (36, "32GB"),
                         (48, "32GB"), (64, "64GB+"), (192, "64GB+")],
)  # fmt: skip
def test_hardware_tier_buckets(ram_gb: int, tier: str) -> None:
    assert hardware_tier(ram_gb) == tier


def test_the_validator_catches_what_the_coordinator_rejects() -> None:
    good = wire(
        build(heartbeat(HeartbeatWithHash, model_hash=HASH, model_hash_algorithm=SNAPSHOT), **V2)
    )
    mutations = [
        ("uptime_s", 3600.0),  # a float in an int field
        ("valid_for_ms", 0),
        ("memory_capacity_mb", 0),
        ("memory_pressure", "unknown"),
        ("thermal_state", "hot"),
        ("runtime_state", "busy"),
        ("observed_at", "yesterday"),
        ("cpu_utilization_pct", 100.5),
        ("gpu_utilization_scope", "process"),
        ("power_source", "mains"),
        ("model_hash", "A" * 64),
        ("binary_version", ""),
        ("schema_version", 3),
    ]
    for key, value in mutations:
        bad = copy.deepcopy(good)
        bad["safety_telemetry"][key] = value
        assert check_safety_telemetry(bad), key
    for key in ("thermal_state", "cpu_utilization_pct"):
        bad = copy.deepcopy(good)
        del bad["safety_telemetry"][key]
        assert check_safety_telemetry(bad), key


def test_hardware_summary_types() -> None:
    summary = HardwareSummary(
        chip="Apple M3 Max",
        bandwidth_gb_per_s=400,
        network_power_kw=0.095,
        gpu_cores_total=40,
        cpu_cores_total=16,
    )
    hb = wire(heartbeat(hardware_summary=summary))
    assert check_hardware_summary(hb) == []
    assert hb["hardware_summary"] == {
        "chip": "Apple M3 Max",
        "bandwidth_gb_per_s": 400,
        "network_power_kw": 0.095,
        "gpu_cores_total": 40,
        "cpu_cores_total": 16,
    }
    # Linux: only what is known goes out.
    hb = wire(heartbeat(hardware_summary=HardwareSummary(chip="AMD EPYC", cpu_cores_total=2)))
    assert hb["hardware_summary"] == {"chip": "AMD EPYC", "cpu_cores_total": 2}
    assert check_hardware_summary({"hardware_summary": {"bandwidth_gb_per_s": 400.0}})
    with pytest.raises(ValueError, match="120 bytes"):
        HardwareSummary(chip="x" * 121)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"gpu_cores_total": 5000}', type=HardwareSummary)


def test_diagnostic_status_on_the_wire() -> None:
    msg = DiagnosticStatus(
        provider_id="prov-a",
        assigned_id="session-1",
        status="degraded",
        model_id="m",
        model_loaded=True,
        reason="on_battery",
        uptime_s=12,
        memory_pressure="normal",
    )
    raw = encode(msg).decode()
    assert check_diagnostic_status(raw) == []
    assert json.loads(raw)["schema_version"] == 1 and json.loads(raw)["restart_count"] is None
    assert check_diagnostic_status(raw.replace('"uptime_s":12', '"uptime_s":12.0'))
    assert check_diagnostic_status(raw.replace('"assigned_id":"session-1"', '"assigned_id":""'))
