"""What the machine feels now: memory pressure, heat, power, CPU and GPU use.

:class:`HostReader` takes one :class:`HostSample` (blocking: it reads files
and may run short commands, each bounded by
:data:`~provider.host.hardware.COMMAND_TIMEOUT_S`), so it is called off the
event loop, on a timer (:mod:`provider.host.monitor`). Every source is
injectable (command runner, ``/proc`` and ``/sys`` roots, clocks), and each
format has a pure parser below, tested against fixture text.

Sources, on a Mac (what the official provider reads, or its command-line
equivalent):

- memory pressure: ``sysctl -n kern.memorystatus_vm_pressure_level``
  (1 normal, 2 warning, 4 critical: the levels of the dispatch memory
  pressure source the Swift provider listens to);
- thermal state: ``NSProcessInfo.thermalState`` (0 nominal, 1 fair, 2
  serious, 3 critical), read through the Objective-C runtime; if that fails,
  ``pmset -g therm`` (:func:`parse_pmset_therm`);
- power source: ``pmset -g batt`` ("AC Power" and "UPS Power" are external,
  "Battery Power" battery, as IOKit's providing power source type);
- GPU use: ``ioreg -r -d 1 -w 0 -c AGXAccelerator``'s
  ``"Device Utilization %"`` (host-wide, hence scope ``"host"``).

On Linux:

- memory pressure: PSI, ``/proc/pressure/memory`` (:func:`pressure_from_psi`:
  critical when all tasks stalled on memory at least 10 % of the last 10 s
  or some task 40 %, warning when some task 10 %); where the kernel has no
  PSI, ``/proc/meminfo`` (critical under 5 % of memory available, warning
  under 15 %);
- thermal state: the hottest of ``/sys/class/thermal/thermal_zone*`` against
  its own trip points (:func:`thermal_from_zone`);
- power source: ``/sys/class/power_supply/*`` ``type``, ``online``,
  ``status`` (:func:`power_from_supplies`);
- GPU use: unknown (``None``).

Everywhere: CPU use is this process's user+system CPU time (``getrusage``)
over wall time, divided by the logical cores, as the Swift provider computes
it; RSS is :func:`provider.host.hardware.rss_bytes`. A fact that cannot be
read is ``None`` (``"unknown"`` for the power source).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from provider.host import hardware
from provider.host.hardware import COMMAND_TIMEOUT_S, Runner, run_command

MemoryPressure = Literal["normal", "warning", "critical"]
ThermalState = Literal["nominal", "fair", "serious", "critical"]
PowerSource = Literal["external", "battery", "unknown"]

THERMAL_LEVELS: Final[tuple[ThermalState, ...]] = ("nominal", "fair", "serious", "critical")
PRESSURE_LEVELS: Final[tuple[MemoryPressure, ...]] = ("normal", "warning", "critical")


@dataclass(frozen=True, slots=True)
class HostSample:
    """One reading of the machine. ``observed_at`` is Unix time."""

    observed_at: float
    memory_pressure: MemoryPressure | None = None
    thermal_state: ThermalState | None = None
    power_source: PowerSource = "unknown"
    cpu_pct: float | None = None
    gpu_pct: float | None = None
    rss_bytes: int | None = None

    @property
    def thermally_throttled(self) -> bool:
        """Serious or critical: the OS is slowing the machine down to cool it."""
        return self.thermal_state in ("serious", "critical")


def _clamp_pct(value: float) -> float | None:
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return round(min(100.0, max(0.0, value)), 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


# --------------------------------------------------------------------------
# Memory pressure

_DARWIN_PRESSURE: Final[dict[int, MemoryPressure]] = {1: "normal", 2: "warning", 4: "critical"}


def parse_darwin_pressure_level(text: str | None) -> MemoryPressure | None:
    """``sysctl -n kern.memorystatus_vm_pressure_level`` output: 1, 2 or 4."""
    try:
        return _DARWIN_PRESSURE.get(int((text or "").strip()))
    except ValueError:
        return None


#: PSI thresholds, in percent of the last 10 s (``avg10``).
PSI_CRITICAL_FULL: Final = 10.0
PSI_CRITICAL_SOME: Final = 40.0
PSI_WARNING_SOME: Final = 10.0
#: /proc/meminfo thresholds, MemAvailable as a share of MemTotal.
MEMINFO_CRITICAL: Final = 0.05
MEMINFO_WARNING: Final = 0.15


@dataclass(frozen=True, slots=True)
class Psi:
    """``avg10`` of the ``some`` and ``full`` lines of a PSI file, in percent."""

    some_avg10: float
    full_avg10: float


def parse_psi(text: str | None) -> Psi | None:
    """``/proc/pressure/memory``: ``some avg10=… avg60=…`` and ``full avg10=…`` lines."""
    values: dict[str, float] = {}
    for line in (text or "").splitlines():
        kind, _, rest = line.partition(" ")
        match = re.search(r"\bavg10=([0-9.]+)", rest)
        if kind in ("some", "full") and match:
            try:
                values[kind] = float(match.group(1))
            except ValueError:
                return None
    if "some" not in values:
        return None
    return Psi(values["some"], values.get("full", 0.0))


def pressure_from_psi(psi: Psi) -> MemoryPressure:
    """Critical when ``full avg10 >= 10`` or ``some avg10 >= 40``; warning when
    ``some avg10 >= 10``; else normal."""
    if psi.full_avg10 >= PSI_CRITICAL_FULL or psi.some_avg10 >= PSI_CRITICAL_SOME:
        return "critical"
    if psi.some_avg10 >= PSI_WARNING_SOME:
        return "warning"
    return "normal"


def pressure_from_meminfo(text: str | None) -> MemoryPressure | None:
    """From ``/proc/meminfo``'s MemAvailable over MemTotal: under 5 % critical,
    under 15 % warning."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            try:
                values[key] = int(rest.split()[0])
            except (ValueError, IndexError):
                return None
    total, available = values.get("MemTotal", 0), values.get("MemAvailable")
    if total <= 0 or available is None:
        return None
    share = available / total
    if share < MEMINFO_CRITICAL:
        return "critical"
    if share < MEMINFO_WARNING:
        return "warning"
    return "normal"


def read_linux_memory_pressure(proc: Path) -> MemoryPressure | None:
    """PSI when the kernel has it, else meminfo."""
    psi = parse_psi(_read(proc / "pressure" / "memory"))
    if psi is not None:
        return pressure_from_psi(psi)
    return pressure_from_meminfo(_read(proc / "meminfo"))


# --------------------------------------------------------------------------
# Thermal state


def thermal_from_ns_level(level: int | None) -> ThermalState | None:
    """``NSProcessInfoThermalState`` 0..3 to its name."""
    if level is None or not 0 <= level < len(THERMAL_LEVELS):
        return None
    return THERMAL_LEVELS[level]


def ns_thermal_level() -> int | None:
    """``[[NSProcessInfo processInfo] thermalState]``, or ``None`` off macOS or on error.

    Through ``objc_msgSend`` with an exact prototype per call, which is what
    arm64 requires (a variadic call would pass arguments on the stack).
    """
    try:
        objc = ctypes.CDLL(ctypes.util.find_library("objc") or "/usr/lib/libobjc.A.dylib")
        ctypes.CDLL("/System/Library/Frameworks/Foundation.framework/Foundation")
        objc.objc_getClass.restype = ctypes.c_void_p
        objc.objc_getClass.argtypes = [ctypes.c_char_p]
        objc.sel_registerName.restype = ctypes.c_void_p
        objc.sel_registerName.argtypes = [ctypes.c_char_p]
        send_id = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
            ("objc_msgSend", objc)
        )
        send_long = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)(
            ("objc_msgSend", objc)
        )
        cls = objc.objc_getClass(b"NSProcessInfo")
        if not cls:
            return None
        info = send_id(cls, objc.sel_registerName(b"processInfo"))
        if not info:
            return None
        return int(send_long(info, objc.sel_registerName(b"thermalState")))
    except (OSError, AttributeError, TypeError, ValueError):
        return None


def parse_pmset_therm(text: str | None) -> ThermalState | None:
    """``pmset -g therm``: the thermal warning level and the CPU speed limit.

    A recorded thermal warning level of 10 or more (crisis) is critical, 1 to
    9 (danger) serious; a CPU speed limit under 80 % is serious, under 100 %
    fair; with neither recorded the state is nominal. ``None`` for text that
    is not ``pmset``'s.
    """
    if not text or ("thermal" not in text.lower() and "CPU_Speed_Limit" not in text):
        return None
    level = 0
    if match := re.search(r"thermal warning level set to (\d+)", text, re.IGNORECASE):
        level = int(match.group(1))
    speed = 100
    if match := re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", text):
        speed = int(match.group(1))
    if 10 <= level < 255:
        return "critical"
    if 0 < level < 10 or speed < 80:
        return "serious"
    if speed < 100:
        return "fair"
    return "nominal"


#: Below a passive trip point by less than this (m°C), a zone is "fair".
FAIR_MARGIN_MC: Final = 10_000


@dataclass(frozen=True, slots=True)
class Zone:
    """A thermal zone: its temperature and trip points ``(type, temp)``, in m°C."""

    temp: int
    trips: tuple[tuple[str, int], ...] = field(default=())


def thermal_from_zone(zone: Zone) -> ThermalState | None:
    """One zone against its own trip points.

    At or above a ``critical`` or ``hot`` trip: critical; at or above a
    ``passive`` trip (the kernel is throttling): serious; at or above an
    ``active`` trip (fans) or within 10 °C of a passive trip: fair; else
    nominal. ``None`` for a zone without trip points.
    """
    trips = [(kind, temp) for kind, temp in zone.trips if temp > 0]
    if not trips:
        return None

    def reached(*kinds: str, margin: int = 0) -> bool:
        return any(kind in kinds and zone.temp >= temp - margin for kind, temp in trips)

    if reached("critical", "hot"):
        return "critical"
    if reached("passive"):
        return "serious"
    if reached("active") or reached("passive", margin=FAIR_MARGIN_MC):
        return "fair"
    return "nominal"


def read_zones(sys_root: Path) -> list[Zone]:
    """Every ``<sys>/class/thermal/thermal_zone*`` with a readable temperature."""
    zones = []
    for path in sorted((sys_root / "class" / "thermal").glob("thermal_zone*")):
        try:
            temp = int((_read(path / "temp") or "").strip())
        except ValueError:
            continue
        trips = []
        for type_file in sorted(path.glob("trip_point_*_type")):
            kind = (_read(type_file) or "").strip()
            temp_file = path / type_file.name.replace("_type", "_temp")
            try:
                trips.append((kind, int((_read(temp_file) or "").strip())))
            except ValueError:
                continue
        zones.append(Zone(temp, tuple(trips)))
    return zones


def worst_thermal(states: list[ThermalState | None]) -> ThermalState | None:
    known = [s for s in states if s is not None]
    return max(known, key=THERMAL_LEVELS.index) if known else None


# --------------------------------------------------------------------------
# Power source


def parse_pmset_batt(text: str | None) -> PowerSource:
    """``pmset -g batt``'s first line: ``Now drawing from 'AC Power'``."""
    match = re.search(r"drawing from '([^']+)'", text or "")
    if match is None:
        return "unknown"
    source = match.group(1)
    if source in ("AC Power", "UPS Power"):
        return "external"
    if source == "Battery Power":
        return "battery"
    return "unknown"


@dataclass(frozen=True, slots=True)
class Supply:
    """One ``/sys/class/power_supply`` entry."""

    type: str
    online: bool | None = None
    status: str | None = None
    scope: str | None = None


def power_from_supplies(supplies: list[Supply]) -> PowerSource:
    """External when a mains, USB or wireless supply is online; battery when a
    system battery discharges, or when mains supplies exist and none is
    online; external when the system batteries are charging or full; else
    unknown (including no supplies at all: many desktops and servers)."""
    external = [s for s in supplies if s.type in ("Mains", "USB", "Wireless")]
    batteries = [s for s in supplies if s.type == "Battery" and s.scope != "Device"]
    if any(s.online for s in external):
        return "external"
    if any(s.status == "Discharging" for s in batteries):
        return "battery"
    if batteries and external and all(s.online is False for s in external):
        return "battery"
    if batteries and all(s.status in ("Charging", "Full", "Not charging") for s in batteries):
        return "external"
    return "unknown"


def read_supplies(sys_root: Path) -> list[Supply]:
    supplies = []
    for path in sorted((sys_root / "class" / "power_supply").glob("*")):
        kind = (_read(path / "type") or "").strip()
        if not kind:
            continue
        online_text = (_read(path / "online") or "").strip()
        supplies.append(
            Supply(
                type=kind,
                online=None if online_text not in ("0", "1") else online_text == "1",
                status=(_read(path / "status") or "").strip() or None,
                scope=(_read(path / "scope") or "").strip() or None,
            )
        )
    return supplies


# --------------------------------------------------------------------------
# CPU and GPU use


def process_cpu_seconds() -> float:
    """User plus system CPU time of this process (``getrusage(RUSAGE_SELF)``)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """This process's CPU use between two calls, in percent of the whole machine.

    ``(cpu seconds delta) / (wall seconds delta) / cores * 100``, clamped to
    0..100; ``None`` on the first call and when the clock did not move.
    """

    def __init__(
        self,
        cores: int | None = None,
        *,
        cpu_seconds: Callable[[], float] = process_cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = max(1, cores or os.cpu_count() or 1)
        self._cpu_seconds = cpu_seconds
        self._clock = clock
        self._last: tuple[float, float] | None = None

    def percent(self) -> float | None:
        now = (self._cpu_seconds(), self._clock())
        last, self._last = self._last, now
        if last is None or now[1] <= last[1] or now[0] < last[0]:
            return None
        return _clamp_pct((now[0] - last[0]) / (now[1] - last[1]) * 100.0 / self.cores)


def parse_ioreg_gpu_utilization(text: str | None) -> float | None:
    """``"Device Utilization %"=N`` inside the accelerator's ``PerformanceStatistics``."""
    match = re.search(r'"Device Utilization %"\s*=\s*(\d+(?:\.\d+)?)', text or "")
    return _clamp_pct(float(match.group(1))) if match else None


# --------------------------------------------------------------------------
# The reader


class HostReader:
    """Reads :class:`HostSample` s and, once, the hardware facts.

    ``platform`` defaults to :data:`sys.platform`; ``run`` runs a command
    (:func:`~provider.host.hardware.run_command`); ``proc`` and ``sys_root``
    are the roots of ``/proc`` and ``/sys``; ``ns_thermal`` reads macOS's
    thermal state level; ``rss`` the process's RSS; ``clock`` Unix time.
    Not thread-safe: one thread samples.
    """

    def __init__(
        self,
        *,
        platform: str | None = None,
        run: Runner = run_command,
        proc: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
        ns_thermal: Callable[[], int | None] = ns_thermal_level,
        rss: Callable[[], int] = hardware.rss_bytes,
        clock: Callable[[], float] = time.time,
        cpu: CpuMeter | None = None,
    ) -> None:
        self.platform = platform or sys.platform
        self.run = run
        self.proc = proc
        self.sys_root = sys_root
        self.ns_thermal = ns_thermal
        self.rss = rss
        self.clock = clock
        self.cpu = cpu or CpuMeter()
        self._hardware: hardware.HardwareFacts | None = None

    def hardware(self) -> hardware.HardwareFacts:
        """The machine's hardware facts, read on the first call only."""
        if self._hardware is None:
            self._hardware = hardware.read_hardware(self.platform, run=self.run, proc=self.proc)
        return self._hardware

    def sample(self) -> HostSample:
        """One reading now; never raises for a missing source."""
        if self.platform == "darwin":
            pressure, thermal, power, gpu = self._darwin()
        elif self.platform.startswith("linux"):
            pressure = read_linux_memory_pressure(self.proc)
            thermal = worst_thermal([thermal_from_zone(z) for z in read_zones(self.sys_root)])
            power = power_from_supplies(read_supplies(self.sys_root))
            gpu = None
        else:
            pressure, thermal, power, gpu = None, None, "unknown", None
        try:
            rss: int | None = self.rss()
        except OSError:
            rss = None
        return HostSample(
            observed_at=self.clock(),
            memory_pressure=pressure,
            thermal_state=thermal,
            power_source=power,
            cpu_pct=self.cpu.percent(),
            gpu_pct=gpu,
            rss_bytes=rss,
        )

    def _darwin(
        self,
    ) -> tuple[MemoryPressure | None, ThermalState | None, PowerSource, float | None]:
        t = COMMAND_TIMEOUT_S
        pressure = parse_darwin_pressure_level(
            self.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"], t)
        )
        thermal = thermal_from_ns_level(self.ns_thermal())
        if thermal is None:
            thermal = parse_pmset_therm(self.run(["pmset", "-g", "therm"], t))
        power = parse_pmset_batt(self.run(["pmset", "-g", "batt"], t))
        gpu = parse_ioreg_gpu_utilization(
            self.run(["ioreg", "-r", "-d", "1", "-w", "0", "-c", "AGXAccelerator"], t)
        )
        return pressure, thermal, power, gpu
