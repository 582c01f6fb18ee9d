"""The coordinator's rules for a heartbeat's host fields, written from COORDINATOR.md
6.1, 6.2, 6.4 and 10.3 and Go's ``ParseHeartbeat`` (``internal/ws/messages.go``).

Independent of the provider's Structs: it reads the JSON as Go would, so a
float in an int field, a missing key or a value out of range is an error here
even if msgspec would have accepted it. Each function returns the list of
errors (empty: the coordinator accepts it).
"""

from __future__ import annotations

import json
import re
from typing import Any

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CANONICAL_ALGORITHMS = ("macprovider.snapshot-manifest.v1", "macprovider.gguf-file.v1")

V1_KEYS = (
    "schema_version", "provider_id", "model_id", "model_loaded", "runtime_state",
    "hardware_tier", "requests_in_flight", "requests_queued", "memory_rss_mb",
    "memory_capacity_mb", "memory_pressure", "thermal_state", "thermally_throttled",
    "restart_count", "uptime_s", "coordinator_connected", "observation_id",
    "observed_at", "valid_for_ms",
)  # fmt: skip
V2_KEYS = (
    "coordinator_session_id", "cpu_utilization_pct", "gpu_utilization_pct",
    "gpu_utilization_scope", "power_source", "binary_version", "compatibility_set_id",
    "model_hash", "model_hash_algorithm",
)  # fmt: skip
INT_KEYS = (
    "schema_version", "requests_in_flight", "requests_queued", "memory_rss_mb",
    "memory_capacity_mb", "restart_count", "uptime_s", "valid_for_ms",
)  # fmt: skip


def is_int(value: Any) -> bool:
    """A JSON integer, as Go's int takes it (``1.0`` is a float: refused)."""
    return type(value) is int


def is_number(value: Any) -> bool:
    return type(value) in (int, float)


def has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F or 0x80 <= ord(c) <= 0x9F for c in text)


def string_ok(value: Any, limit: int) -> bool:
    return type(value) is str and 0 < len(value.encode()) <= limit and not has_control(value)


def check_safety_telemetry(heartbeat: dict[str, Any]) -> list[str]:
    """Errors of ``heartbeat["safety_telemetry"]``; any one rejects the heartbeat."""
    t = heartbeat.get("safety_telemetry")
    if t is None:
        return []
    if not isinstance(t, dict):
        return ["safety_telemetry is not an object"]
    errors = [f"missing {k}" for k in V1_KEYS if t.get(k) is None]
    if errors:
        return errors
    errors += [f"{k} is not a JSON integer: {t[k]!r}" for k in INT_KEYS if not is_int(t[k])]
    if errors:
        return errors
    if t["schema_version"] not in (1, 2):
        errors.append("schema_version")
    if not string_ok(t["provider_id"], 256):
        errors.append("provider_id")
    if t["model_id"] != heartbeat["model_id"] or not string_ok(t["model_id"], 256):
        errors.append("model_id differs from the heartbeat's")
    if t["runtime_state"] != heartbeat["status"]:
        errors.append("runtime_state differs from the heartbeat's status")
    if not string_ok(t["hardware_tier"], 128):
        errors.append("hardware_tier")
    for key in ("model_loaded", "thermally_throttled", "coordinator_connected"):
        if type(t[key]) is not bool:
            errors.append(f"{key} is not a bool")
    for key in ("requests_in_flight", "requests_queued", "memory_rss_mb", "restart_count"):
        if t[key] < 0:
            errors.append(f"{key} < 0")
    if t["uptime_s"] < 0:
        errors.append("uptime_s < 0")
    if t["memory_capacity_mb"] < 1:
        errors.append("memory_capacity_mb < 1")
    if not string_ok(t["observation_id"], 128):
        errors.append("observation_id")
    if type(t["observed_at"]) is not str or len(t["observed_at"]) > 64:
        errors.append("observed_at")
    elif not RFC3339.match(t["observed_at"]):
        errors.append(f"observed_at is not RFC 3339: {t['observed_at']!r}")
    if not 1 <= t["valid_for_ms"] <= 300_000:
        errors.append("valid_for_ms")
    if t["memory_pressure"] not in ("normal", "warning", "critical"):
        errors.append("memory_pressure")
    if t["thermal_state"] not in ("nominal", "fair", "serious", "critical"):
        errors.append("thermal_state")
    if t["schema_version"] == 2:
        errors += _check_v2(heartbeat, t)
    return errors


def _check_v2(heartbeat: dict[str, Any], t: dict[str, Any]) -> list[str]:
    errors = [f"missing {k}" for k in V2_KEYS if k not in t]
    if errors:
        return errors
    if not string_ok(t["coordinator_session_id"], 256):
        errors.append("coordinator_session_id")
    if t["gpu_utilization_scope"] != "host":
        errors.append("gpu_utilization_scope")
    if not string_ok(t["binary_version"], 32):
        errors.append("binary_version")
    if not string_ok(t["compatibility_set_id"], 1024):
        errors.append("compatibility_set_id")
    if t["model_hash_algorithm"] not in CANONICAL_ALGORITHMS:
        errors.append("model_hash_algorithm")
    if type(t["model_hash"]) is not str or not SHA256.match(t["model_hash"]):
        errors.append("model_hash")
    if "model_hash" not in heartbeat or "model_hash_algorithm" not in heartbeat:
        errors.append("schema 2 needs the heartbeat's own model_hash and algorithm")
    elif (t["model_hash"], t["model_hash_algorithm"]) != (
        heartbeat["model_hash"],
        heartbeat["model_hash_algorithm"],
    ):
        errors.append("model hash differs from the heartbeat's")
    weights = ("weights_manifest_sha256" in t, "weights_manifest_algorithm" in t)
    if weights[0] != weights[1]:
        errors.append("weights identity must come in pairs")
    elif weights[0] and (
        t["weights_manifest_sha256"] != heartbeat.get("weights_manifest_sha256")
        or t["weights_manifest_algorithm"] != heartbeat.get("weights_manifest_algorithm")
    ):
        errors.append("weights identity differs from the heartbeat's")
    for key in ("cpu_utilization_pct", "gpu_utilization_pct"):
        value = t[key]
        if value is not None and (not is_number(value) or not 0 <= value <= 100):
            errors.append(f"{key} out of 0..100")
    if t["power_source"] not in ("external", "battery", "unknown"):
        errors.append("power_source")
    return errors


def check_hardware_summary(heartbeat: dict[str, Any]) -> list[str]:
    """Errors that make the coordinator drop ``hardware_summary`` (silently)."""
    h = heartbeat.get("hardware_summary")
    if h is None:
        return []
    if not isinstance(h, dict):
        return ["hardware_summary is not an object"]
    errors = []
    chip = h.get("chip", "")
    if type(chip) is not str or len(chip.strip().encode()) > 120 or has_control(chip):
        errors.append("chip")
    limits = {"bandwidth_gb_per_s": 10_000, "gpu_cores_total": 4096, "cpu_cores_total": 1024}
    for key, top in limits.items():
        if key in h and (not is_int(h[key]) or not 0 <= h[key] <= top):
            errors.append(f"{key}: {h[key]!r}")
    power = h.get("network_power_kw", 0)
    if not is_number(power) or not 0 <= power <= 10.0:
        errors.append("network_power_kw")
    return errors


def check_heartbeat_ints(heartbeat: dict[str, Any]) -> list[str]:
    """The heartbeat's own int fields (10.3); a float there rejects the frame."""
    keys = (
        "ram_gb", "max_context_tokens", "max_concurrency", "slots_free", "slots_total",
        "requests_served_since_last",
    )  # fmt: skip
    return [f"{k} is not a JSON integer" for k in keys if not is_int(heartbeat.get(k))]


def check_diagnostic_status(raw: str) -> list[str]:
    """Errors that make the coordinator refuse a ``diagnostic_status`` (6.3), and
    optional fields of the wrong type (which it would silently drop)."""
    if len(raw.encode()) > 8192:
        return ["over 8192 bytes"]
    d = json.loads(raw)
    errors = [] if is_int(d.get("schema_version")) and d["schema_version"] == 1 else ["schema"]
    for key in ("provider_id", "assigned_id", "status", "model_id"):
        if not string_ok(d.get(key), 1 << 20):
            errors.append(key)
    if type(d.get("model_loaded")) is not bool:
        errors.append("model_loaded")
    ints = ("uptime_s", "requests_total", "requests_in_flight", "errors_total", "restart_count",
            "memory_rss_mb")  # fmt: skip
    errors += [k for k in ints if d.get(k) is not None and not is_int(d[k])]
    strings = ("reason", "observed_at", "binary_version", "memory_pressure", "thermal_state")
    for key in strings:
        value = d.get(key)
        if value is not None and (type(value) is not str or has_control(value)):
            errors.append(key)
    if d.get("thermally_throttled") not in (None, True, False):
        errors.append("thermally_throttled")
    return errors
