"""The host rows of ``mlx-provider status``."""

from __future__ import annotations

from typing import Any

from provider.ops.status_server import format_status_table


def rows(host: dict[str, Any]) -> dict[str, str]:
    table = format_status_table({"state": "degraded", "host": host}, now=0.0)
    return {line[:18].strip(): line[18:] for line in table.splitlines()}


MAC = {
    "chip": "Apple M3 Max",
    "cpu_cores": 16,
    "gpu_cores": 40,
    "memory_pressure": "critical",
    "thermal_state": "serious",
    "power_source": "external",
    "cpu_pct": 12.34,
    "gpu_pct": 87.0,
    "guard": True,
    "holding_back": [
        {"reason": "memory_pressure_critical", "slot_limit": 0},
        {"reason": "thermal_serious", "slot_limit": 1},
    ],
}


def test_a_mac_holding_back() -> None:
    shown = rows(MAC)
    assert shown["chip"] == "Apple M3 Max (16 CPU, 40 GPU cores)"
    assert shown["host"] == "memory pressure critical, thermal serious, power external"
    assert shown["cpu / gpu"] == "12.3% / 87.0%"
    assert shown["holding back"] == "memory_pressure_critical (paused), thermal_serious (1 slot)"


def test_unknowns_and_no_holds() -> None:
    host = {"chip": None, "cpu_cores": 2, "memory_pressure": None, "holding_back": []}
    shown = rows(host)
    assert shown["chip"] == "- (2 CPU cores)"
    assert shown["host"] == "memory pressure unknown, thermal unknown, power unknown"
    assert shown["cpu / gpu"] == "- / -"
    assert shown["holding back"] == "no"
    assert rows(host | {"guard": False})["holding back"] == "no (host_guard is off)"
