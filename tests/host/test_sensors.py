"""Host readings: each parser against fixture text, the readers against trees, this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from provider.host.sensors import (
    CpuMeter,
    HostReader,
    HostSample,
    Psi,
    Supply,
    Zone,
    parse_darwin_pressure_level,
    parse_ioreg_gpu_utilization,
    parse_pmset_batt,
    parse_pmset_therm,
    parse_psi,
    power_from_supplies,
    pressure_from_meminfo,
    pressure_from_psi,
    read_linux_memory_pressure,
    read_supplies,
    read_zones,
    thermal_from_ns_level,
    thermal_from_zone,
    worst_thermal,
)

from . import fixtures as fx

# --------------------------------------------------------------------------
# Memory pressure


def test_darwin_pressure_levels() -> None:
    assert [parse_darwin_pressure_level(t) for t in ("1\n", "2\n", "4\n")] == [
        "normal",
        "warning",
        "critical",
    ]
    assert parse_darwin_pressure_level("0") is None
    assert parse_darwin_pressure_level("sysctl: unknown oid") is None
    assert parse_darwin_pressure_level(None) is None


def test_psi_parsing_and_thresholds() -> None:
    assert parse_psi(fx.PSI_IDLE) == Psi(0.0, 0.0)
    assert parse_psi(fx.PSI_CRITICAL) == Psi(62.15, 31.40)
    assert parse_psi("some avg10=3.5 avg60=1 avg300=0 total=1\n") == Psi(3.5, 0.0)  # no full line
    assert parse_psi("") is None and parse_psi("garbage") is None
    # The stated thresholds: full >= 10 or some >= 40 critical; some >= 10 warning.
    assert pressure_from_psi(Psi(9.99, 9.99)) == "normal"
    assert pressure_from_psi(Psi(10.0, 0.0)) == "warning"
    assert pressure_from_psi(Psi(39.9, 9.9)) == "warning"
    assert pressure_from_psi(Psi(40.0, 0.0)) == "critical"
    assert pressure_from_psi(Psi(12.0, 10.0)) == "critical"


def test_meminfo_fallback() -> None:
    def meminfo(total: int, available: int) -> str:
        return f"MemTotal: {total} kB\nMemFree: 1 kB\nMemAvailable: {available} kB\n"

    assert pressure_from_meminfo(meminfo(1000, 500)) == "normal"
    assert pressure_from_meminfo(meminfo(1000, 149)) == "warning"
    assert pressure_from_meminfo(meminfo(1000, 49)) == "critical"
    assert pressure_from_meminfo("MemTotal: 1000 kB\n") is None  # old kernel: no MemAvailable
    assert pressure_from_meminfo(None) is None


def test_linux_memory_pressure_prefers_psi(tmp_path: Path) -> None:
    low_memory = "MemTotal: 1000 kB\nMemAvailable: 10 kB\n"
    proc = fx.write_tree(tmp_path, {"pressure/memory": fx.PSI_IDLE, "meminfo": low_memory})
    assert read_linux_memory_pressure(proc) == "normal"
    (proc / "pressure" / "memory").unlink()
    assert read_linux_memory_pressure(proc) == "critical"
    assert read_linux_memory_pressure(tmp_path / "none") is None


# --------------------------------------------------------------------------
# Thermal state


def test_ns_thermal_levels() -> None:
    assert [thermal_from_ns_level(n) for n in range(4)] == [
        "nominal",
        "fair",
        "serious",
        "critical",
    ]
    assert thermal_from_ns_level(None) is None and thermal_from_ns_level(7) is None


def test_pmset_therm() -> None:
    assert parse_pmset_therm(fx.PMSET_THERM_NOMINAL) == "nominal"
    assert parse_pmset_therm(fx.PMSET_THERM_SPEED_LIMITED) == "serious"
    assert parse_pmset_therm(fx.PMSET_THERM_SPEED_LIMITED.replace("= 70", "= 90")) == "fair"
    assert parse_pmset_therm(fx.PMSET_THERM_CRISIS) == "critical"
    assert parse_pmset_therm("Thermal warning level set to 5.\n") == "serious"
    assert parse_pmset_therm("") is None and parse_pmset_therm("pmset: usage") is None


def test_thermal_zone_against_its_trip_points() -> None:
    trips = (("active", 50_000), ("passive", 85_000), ("hot", 95_000), ("critical", 105_000))
    assert thermal_from_zone(Zone(40_000, trips)) == "nominal"
    assert thermal_from_zone(Zone(52_000, trips)) == "fair"  # fans on
    assert thermal_from_zone(Zone(76_000, (("passive", 85_000),))) == "fair"  # within 10 °C
    assert thermal_from_zone(Zone(85_000, trips)) == "serious"  # kernel throttling
    assert thermal_from_zone(Zone(96_000, trips)) == "critical"
    assert thermal_from_zone(Zone(110_000, (("critical", 105_000),))) == "critical"
    assert thermal_from_zone(Zone(60_000)) is None  # no trip points: unknown
    assert thermal_from_zone(Zone(60_000, (("passive", 0),))) is None  # bogus trip
    assert worst_thermal([None, "fair", "nominal"]) == "fair"
    assert worst_thermal([None]) is None


def test_zones_from_a_sys_tree(tmp_path: Path) -> None:
    sys_root = fx.write_tree(
        tmp_path,
        {
            "class/thermal/thermal_zone0/temp": "45000\n",
            "class/thermal/thermal_zone0/trip_point_0_type": "passive\n",
            "class/thermal/thermal_zone0/trip_point_0_temp": "90000\n",
            "class/thermal/thermal_zone0/trip_point_1_type": "critical\n",
            "class/thermal/thermal_zone0/trip_point_1_temp": "105000\n",
            "class/thermal/thermal_zone1/temp": "91000\n",
            "class/thermal/thermal_zone1/trip_point_0_type": "passive\n",
            "class/thermal/thermal_zone1/trip_point_0_temp": "90000\n",
            "class/thermal/thermal_zone2/temp": "not a number\n",
            "class/thermal/cooling_device0/type": "Processor\n",
        },
    )
    zones = read_zones(sys_root)
    assert zones == [
        Zone(45_000, (("passive", 90_000), ("critical", 105_000))),
        Zone(91_000, (("passive", 90_000),)),
    ]
    assert worst_thermal([thermal_from_zone(z) for z in zones]) == "serious"
    assert read_zones(tmp_path / "none") == []


# --------------------------------------------------------------------------
# Power source


def test_pmset_batt() -> None:
    assert parse_pmset_batt(fx.PMSET_BATT_AC) == "external"
    assert parse_pmset_batt(fx.PMSET_BATT_DESKTOP) == "external"
    assert parse_pmset_batt(fx.PMSET_BATT_BATTERY) == "battery"
    assert parse_pmset_batt(fx.PMSET_BATT_UPS) == "external"  # as IOKit's UPS power type
    assert parse_pmset_batt("") == "unknown" and parse_pmset_batt(None) == "unknown"


def test_power_from_supplies() -> None:
    mains_on, mains_off = Supply("Mains", online=True), Supply("Mains", online=False)
    charging = Supply("Battery", status="Charging")
    discharging = Supply("Battery", status="Discharging")
    mouse = Supply("Battery", status="Discharging", scope="Device")
    assert power_from_supplies([mains_on, discharging]) == "external"
    assert power_from_supplies([mains_off, discharging]) == "battery"
    assert power_from_supplies([mains_off, Supply("Battery", status="Unknown")]) == "battery"
    assert power_from_supplies([charging]) == "external"
    assert power_from_supplies([discharging]) == "battery"
    assert power_from_supplies([mains_on, mouse]) == "external"
    assert power_from_supplies([mouse]) == "unknown"  # a mouse battery is not the machine's
    assert power_from_supplies([]) == "unknown"  # desktops and servers often have none


def test_supplies_from_a_sys_tree(tmp_path: Path) -> None:
    sys_root = fx.write_tree(
        tmp_path,
        {
            "class/power_supply/AC/type": "Mains\n",
            "class/power_supply/AC/online": "0\n",
            "class/power_supply/BAT0/type": "Battery\n",
            "class/power_supply/BAT0/status": "Discharging\n",
            "class/power_supply/BAT0/scope": "System\n",
        },
    )
    supplies = read_supplies(sys_root)
    assert supplies == [
        Supply("Mains", online=False),
        Supply("Battery", online=None, status="Discharging", scope="System"),
    ]
    assert power_from_supplies(supplies) == "battery"


# --------------------------------------------------------------------------
# CPU and GPU


def test_cpu_meter_is_delta_over_wall_over_cores() -> None:
    cpu, wall = iter([10.0, 11.0, 13.0, 13.0, 12.0]), iter([100.0, 101.0, 102.0, 102.0, 103.0])
    meter = CpuMeter(4, cpu_seconds=lambda: next(cpu), clock=lambda: next(wall))
    assert meter.percent() is None  # first call: nothing to compare with
    assert meter.percent() == 25.0  # 1 s of CPU in 1 s on 4 cores
    assert meter.percent() == 50.0  # 2 s of CPU in 1 s
    assert meter.percent() is None  # the clock did not move
    assert meter.percent() is None  # CPU time went backwards


def test_cpu_meter_clamps() -> None:
    cpu, wall = iter([0.0, 10.0]), iter([0.0, 1.0])
    meter = CpuMeter(1, cpu_seconds=lambda: next(cpu), clock=lambda: next(wall))
    meter.percent()
    assert meter.percent() == 100.0


def test_gpu_utilization_from_ioreg() -> None:
    assert parse_ioreg_gpu_utilization(fx.IOREG_AGX) == 31.0
    assert parse_ioreg_gpu_utilization('"Device Utilization %"=250') == 100.0
    assert parse_ioreg_gpu_utilization("") is None


# --------------------------------------------------------------------------
# The reader


def test_mac_reader_from_command_outputs() -> None:
    calls, run = fx.runner(
        fx.darwin_outputs(
            {
                "sysctl -n kern.memorystatus_vm_pressure_level": "4\n",
                "pmset -g batt": fx.PMSET_BATT_BATTERY,
            }
        )
    )
    reader = HostReader(
        platform="darwin", run=run, ns_thermal=lambda: 2, rss=lambda: 3 * 2**30, clock=lambda: 1.5
    )
    sample = reader.sample()
    assert sample == HostSample(
        observed_at=1.5,
        memory_pressure="critical",
        thermal_state="serious",
        power_source="battery",
        cpu_pct=None,
        gpu_pct=31.0,
        rss_bytes=3 * 2**30,
    )
    assert sample.thermally_throttled
    assert ("pmset", "-g", "therm") not in calls  # NSProcessInfo answered
    assert reader.hardware().chip == "Apple M3 Max"


def test_mac_reader_thermal_falls_back_to_pmset() -> None:
    _, run = fx.runner(fx.darwin_outputs({"pmset -g therm": fx.PMSET_THERM_CRISIS}))
    reader = HostReader(platform="darwin", run=run, ns_thermal=lambda: None)
    assert reader.sample().thermal_state == "critical"


def test_mac_reader_with_nothing_answering() -> None:
    _, run = fx.runner({})
    sample = HostReader(platform="darwin", run=run, ns_thermal=lambda: None).sample()
    assert (sample.memory_pressure, sample.thermal_state, sample.power_source) == (
        None,
        None,
        "unknown",
    )
    assert sample.gpu_pct is None and not sample.thermally_throttled


def test_linux_reader_from_trees(tmp_path: Path) -> None:
    proc = fx.write_tree(tmp_path / "proc", {"pressure/memory": fx.PSI_CRITICAL})
    sys_root = fx.write_tree(
        tmp_path / "sys",
        {
            "class/thermal/thermal_zone0/temp": "99000\n",
            "class/thermal/thermal_zone0/trip_point_0_type": "hot\n",
            "class/thermal/thermal_zone0/trip_point_0_temp": "95000\n",
            "class/power_supply/ADP1/type": "Mains\n",
            "class/power_supply/ADP1/online": "1\n",
        },
    )
    _, run = fx.runner({})
    sample = HostReader(platform="linux", run=run, proc=proc, sys_root=sys_root).sample()
    assert sample.memory_pressure == "critical"
    assert sample.thermal_state == "critical" and sample.thermally_throttled
    assert sample.power_source == "external"
    assert sample.gpu_pct is None


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="Linux or macOS sources")
def test_this_machine_twice() -> None:
    reader = HostReader()
    first, second = reader.sample(), reader.sample()
    for sample in (first, second):
        assert sample.memory_pressure in (None, "normal", "warning", "critical")
        assert sample.thermal_state in (None, "nominal", "fair", "serious", "critical")
        assert sample.power_source in ("external", "battery", "unknown")
        assert sample.gpu_pct is None or 0.0 <= sample.gpu_pct <= 100.0
        assert isinstance(sample.rss_bytes, int) and sample.rss_bytes > 0
        assert sample.observed_at > 1_600_000_000
    assert first.cpu_pct is None
    assert second.cpu_pct is None or 0.0 <= second.cpu_pct <= 100.0
    if sys.platform.startswith("linux"):
        # This kernel has PSI or meminfo; one of them answers.
        assert first.memory_pressure is not None
