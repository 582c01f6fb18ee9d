"""The heartbeat's ``safety_telemetry``, built as the coordinator checks it (pure).

:func:`safety_telemetry` reads the heartbeat it goes in (so ``model_id``,
``runtime_state`` and, for schema 2, the model hash always match the outer
frame, as the coordinator requires) and the latest host reading. It sends
schema 2 when every schema 2 identity is known and valid (the advertised
binary version, a compatibility set id, the coordinator's session id and the
heartbeat's own ``model_hash`` with its ``model_hash_algorithm``), as the
official provider does, and schema 1 otherwise.

The wire has no "unknown" for memory pressure or thermal state: an unknown
reading goes out as ``normal`` / ``nominal`` (what the official provider's
monitors report before their first event). CPU and GPU use and the power
source do have unknowns: ``null`` and ``"unknown"``.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from provider.coordinator.messages import Heartbeat, SafetyTelemetry

#: How long an observation stays valid, in ms (the official provider's value).
VALID_FOR_MS: Final = 90_000
_MIB: Final = 2**20
#: What the coordinator accepts as a model identity (``modelidentity`` in Go).
CANONICAL_ALGORITHMS: Final = frozenset(
    {"macprovider.snapshot-manifest.v1", "macprovider.gguf-file.v1"}
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Reading(Protocol):
    """A host reading (:class:`provider.host.sensors.HostSample`)."""

    @property
    def memory_pressure(self) -> Any: ...
    @property
    def thermal_state(self) -> Any: ...
    @property
    def power_source(self) -> Any: ...
    @property
    def cpu_pct(self) -> float | None: ...
    @property
    def gpu_pct(self) -> float | None: ...


def hardware_tier(ram_gb: int) -> str:
    """The official provider's RAM buckets: up to 12 GB ``8GB``, 24 ``16GB``,
    48 ``32GB``, above ``64GB+``."""
    if ram_gb <= 12:
        return "8GB"
    if ram_gb <= 24:
        return "16GB"
    if ram_gb <= 48:
        return "32GB"
    return "64GB+"


def _fits(value: object, limit: int) -> str | None:
    """``value`` if it is a non-empty string of at most ``limit`` bytes without
    control characters (what the coordinator checks), else ``None``."""
    if not isinstance(value, str) or not value or len(value.encode()) > limit:
        return None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        return None
    return value


def observed_at(now: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-07-14T12:00:00.123Z``."""
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def safety_telemetry(
    heartbeat: Heartbeat,
    *,
    provider_id: str | None,
    reading: Reading | None,
    model_loaded: bool,
    requests_in_flight: int,
    rss_bytes: int,
    restart_count: int,
    uptime_s: float,
    assigned_id: str | None = None,
    binary_version: str | None = None,
    compatibility_set_id: str | None = None,
    coordinator_connected: bool = True,
    now: datetime | None = None,
    observation_id: str | None = None,
) -> SafetyTelemetry | None:
    """The telemetry for ``heartbeat``; ``None`` when a required fact is missing
    (no provider id, memory size unknown), since an invalid object would get the
    whole heartbeat rejected. Memory capacity is the heartbeat's ``ram_gb`` x
    1024 MiB, as the official provider reports it."""
    pid = _fits(provider_id, 256)
    capacity_mb = heartbeat.ram_gb * 1024
    if pid is None or capacity_mb < 1 or not heartbeat.model_id:
        return None
    outer_hash = getattr(heartbeat, "model_hash", None)
    outer_algorithm = getattr(heartbeat, "model_hash_algorithm", None)
    if not (isinstance(outer_hash, str) and _SHA256.fullmatch(outer_hash)):
        outer_hash = None
    if outer_algorithm not in CANONICAL_ALGORITHMS:
        outer_algorithm = None
    identity = {
        "coordinator_session_id": _fits(assigned_id, 256),
        "binary_version": _fits(binary_version, 32),
        "compatibility_set_id": _fits(compatibility_set_id, 1024),
        "model_hash": outer_hash,
        "model_hash_algorithm": outer_algorithm,
    }
    thermal = (reading.thermal_state if reading else None) or "nominal"
    telemetry = SafetyTelemetry(
        schema_version=1,
        provider_id=pid,
        model_id=heartbeat.model_id,
        model_loaded=model_loaded,
        runtime_state=heartbeat.status,
        hardware_tier=hardware_tier(heartbeat.ram_gb),
        requests_in_flight=max(0, int(requests_in_flight)),
        # Requests beyond the free slots are refused, never queued.
        requests_queued=0,
        memory_rss_mb=max(0, int(rss_bytes) // _MIB),
        memory_capacity_mb=int(capacity_mb),
        memory_pressure=(reading.memory_pressure if reading else None) or "normal",
        thermal_state=thermal,
        thermally_throttled=thermal in ("serious", "critical"),
        restart_count=max(0, int(restart_count)),
        uptime_s=max(0, int(uptime_s)),
        coordinator_connected=coordinator_connected,
        observation_id=observation_id or str(uuid.uuid4()),
        observed_at=observed_at(now or datetime.now(UTC)),
        valid_for_ms=VALID_FOR_MS,
    )
    if all(identity.values()):
        telemetry.schema_version = 2
        for name, value in identity.items():
            setattr(telemetry, name, value)
        telemetry.cpu_utilization_pct = reading.cpu_pct if reading else None
        telemetry.gpu_utilization_pct = reading.gpu_pct if reading else None
        telemetry.gpu_utilization_scope = "host"
        telemetry.power_source = (reading.power_source if reading else None) or "unknown"
        weights = _fits(getattr(heartbeat, "weights_manifest_sha256", None), 128)
        weights_algorithm = _fits(getattr(heartbeat, "weights_manifest_algorithm", None), 128)
        if weights and weights_algorithm:
            telemetry.weights_manifest_sha256 = weights
            telemetry.weights_manifest_algorithm = weights_algorithm
    return telemetry
