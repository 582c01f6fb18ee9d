"""Facts about this machine and this process: memory, chip, cores, GPU, RSS.

Facts that cannot change while the process runs (the chip, its cores, its
memory bandwidth) are read once by :func:`read_hardware`, off the event loop:
on a Mac from ``sysctl`` and ``ioreg`` (``system_profiler`` as a fallback for
the GPU core count), on Linux from ``/proc/cpuinfo``. Every command is bounded
in time by :func:`run_command`; a fact nobody can tell is ``None``, never a
guess such as ``platform.processor()``'s ``"arm"``.

Memory bandwidth, GPU cores and power come from the chip table of the
official provider (``ProviderHardwareSummary.swift``, COORDINATOR.md 6.4) for
Apple Silicon, by tier (Ultra, Max, Pro, base) and generation; a GPU core
count the machine reports itself wins over the table.

The process's resident set size is read on demand (:func:`rss_bytes`).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: How long one command may run before it is killed and its fact is unknown.
COMMAND_TIMEOUT_S = 5.0
#: ``system_profiler`` is slow on a busy Mac; it runs at most once, at start.
SYSTEM_PROFILER_TIMEOUT_S = 15.0
#: The coordinator's limit on ``hardware_summary.chip``, in bytes.
MAX_CHIP_BYTES = 120

#: ``run(argv, timeout)``: a command's standard output, or ``None``.
Runner = Callable[[Sequence[str], float], "str | None"]


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> str | None:
    """Standard output of ``argv``, or ``None`` when it is missing, fails or times out.

    Never raises. The child is killed at ``timeout``. ``close_fds=False`` lets
    CPython use ``posix_spawn`` on macOS instead of ``fork``, which would copy
    the page tables of a process holding a whole model (our descriptors are
    not inheritable anyway, PEP 446).
    """
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            close_fds=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


# --------------------------------------------------------------------------
# Memory


def total_ram_bytes() -> int:
    """Physical memory in bytes; 0 where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def total_ram_gb() -> int:
    """Physical memory in GiB, rounded; 0 where the OS does not say."""
    return round(total_ram_bytes() / 2**30)


# --------------------------------------------------------------------------
# The chip and its table

_APPLE_CHIP = re.compile(r"\bapple\s+m(\d+)(?:\s+(pro|max|ultra))?\b", re.IGNORECASE)
#: What ``platform`` says when it knows nothing about the chip.
_NOT_A_CHIP = frozenset({"", "arm", "arm64", "aarch64", "i386", "x86_64", "amd64", "unknown"})


@dataclass(frozen=True, slots=True)
class ChipSpecs:
    """Table figures for one Apple Silicon chip."""

    bandwidth_gb_per_s: int
    network_power_kw: float
    gpu_cores: int


def apple_chip_specs(chip: str) -> ChipSpecs | None:
    """Bandwidth, power and GPU cores for an ``"Apple M<n>[ Pro|Max|Ultra]"`` chip.

    The official provider's table: Ultra 819 GB/s from M3 (800 before), 0.120
    kW, 80 GPU cores from M3 (60 before); Max 546 GB/s from M4 (400 before),
    0.095 kW, 40 cores from M3 (32 before); Pro 273 GB/s from M4 (200 before),
    0.065 kW, 20 cores from M4 (19 before); base 120 GB/s from M4, 100 for M2
    and M3, 68 for M1, 0.040 kW, 10 cores. ``None`` for anything else.
    """
    match = _APPLE_CHIP.search(chip)
    if match is None:
        return None
    generation = int(match.group(1))
    tier = (match.group(2) or "").lower()
    if tier == "ultra":
        return ChipSpecs(819 if generation >= 3 else 800, 0.120, 80 if generation >= 3 else 60)
    if tier == "max":
        return ChipSpecs(546 if generation >= 4 else 400, 0.095, 40 if generation >= 3 else 32)
    if tier == "pro":
        return ChipSpecs(273 if generation >= 4 else 200, 0.065, 20 if generation >= 4 else 19)
    bandwidth = 120 if generation >= 4 else 100 if generation >= 2 else 68
    return ChipSpecs(bandwidth, 0.040, 10)


def clean_chip_name(raw: str | None) -> str | None:
    """``raw`` as the coordinator takes it: one line, no control characters,
    at most 120 bytes (cut on a character); ``None`` when it names no chip."""
    if raw is None:
        return None
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in raw)
    text = " ".join(text.split())
    if text.lower() in _NOT_A_CHIP:
        return None
    return text.encode()[:MAX_CHIP_BYTES].decode(errors="ignore").rstrip() or None


def _positive_int(text: str | None) -> int | None:
    try:
        value = int((text or "").strip())
    except ValueError:
        return None
    return value if value > 0 else None


def parse_cpuinfo(text: str) -> tuple[str | None, int | None]:
    """The CPU's model name and physical core count from ``/proc/cpuinfo`` text.

    Cores are the distinct ``(physical id, core id)`` pairs; where the kernel
    does not give them (many ARM and virtual machines), the ``processor``
    entries. The model name is ``model name`` (x86) or ``Model``/``Hardware``
    (some ARM boards).
    """
    name = None
    cores: set[tuple[str, str]] = set()
    processors = 0
    physical = core = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            physical = core = None  # a blank line ends one processor's block
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "model", "hardware") and name is None and value:
            name = value if not value.isdigit() else None
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        if physical is not None and core is not None:
            cores.add((physical, core))
    count = len(cores) or processors or None
    return clean_chip_name(name), count


def parse_ioreg_gpu_cores(text: str | None) -> int | None:
    """``"gpu-core-count" = N`` from ``ioreg -r -d 1 -c AGXAccelerator``."""
    match = re.search(r'"gpu-core-count"\s*=\s*(\d+)', text or "")
    return _positive_int(match.group(1)) if match else None


def parse_system_profiler_gpu_cores(text: str | None) -> int | None:
    """``sppci_cores`` of the first GPU in ``system_profiler SPDisplaysDataType -json``."""
    try:
        gpus = json.loads(text or "")["SPDisplaysDataType"]
    except (ValueError, KeyError, TypeError):
        return None
    for gpu in gpus if isinstance(gpus, list) else []:
        if isinstance(gpu, dict):
            cores = _positive_int(str(gpu.get("sppci_cores", "")))
            if cores is not None:
                return cores
    return None


@dataclass(frozen=True, slots=True)
class HardwareFacts:
    """What ``hardware_summary`` says; ``None`` where the machine does not tell."""

    chip: str | None = None
    cpu_cores: int | None = None
    gpu_cores: int | None = None
    bandwidth_gb_per_s: int | None = None
    network_power_kw: float | None = None


def _with_table(chip: str | None, cpu_cores: int | None, gpu_cores: int | None) -> HardwareFacts:
    specs = apple_chip_specs(chip) if chip else None
    if specs is None:
        return HardwareFacts(chip, cpu_cores, gpu_cores)
    return HardwareFacts(
        chip,
        cpu_cores,
        gpu_cores or specs.gpu_cores,
        specs.bandwidth_gb_per_s,
        specs.network_power_kw,
    )


def read_darwin_hardware(run: Runner = run_command) -> HardwareFacts:
    """The Mac's chip (``machdep.cpu.brand_string``), performance and efficiency
    cores (``hw.physicalcpu``) and GPU cores (``ioreg``, else ``system_profiler``)."""
    chip = clean_chip_name(run(["sysctl", "-n", "machdep.cpu.brand_string"], COMMAND_TIMEOUT_S))
    cpu_cores = _positive_int(run(["sysctl", "-n", "hw.physicalcpu"], COMMAND_TIMEOUT_S))
    gpu_cores = parse_ioreg_gpu_cores(
        run(["ioreg", "-r", "-d", "1", "-w", "0", "-c", "AGXAccelerator"], COMMAND_TIMEOUT_S)
    )
    if gpu_cores is None:
        gpu_cores = parse_system_profiler_gpu_cores(
            run(["system_profiler", "SPDisplaysDataType", "-json"], SYSTEM_PROFILER_TIMEOUT_S)
        )
    return _with_table(chip, cpu_cores or os.cpu_count(), gpu_cores)


def read_linux_hardware(proc: Path = Path("/proc")) -> HardwareFacts:
    """The CPU model and physical cores from ``<proc>/cpuinfo``; no GPU facts."""
    try:
        chip, cores = parse_cpuinfo((proc / "cpuinfo").read_text(errors="replace"))
    except OSError:
        chip, cores = None, None
    return _with_table(chip, cores or os.cpu_count(), None)


def read_hardware(
    platform: str | None = None, *, run: Runner = run_command, proc: Path = Path("/proc")
) -> HardwareFacts:
    """:class:`HardwareFacts` for this machine; may run commands for seconds:
    call it once, off the event loop."""
    platform = platform or sys.platform
    if platform == "darwin":
        return read_darwin_hardware(run)
    if platform.startswith("linux"):
        return read_linux_hardware(proc)
    return HardwareFacts(cpu_cores=os.cpu_count())


# --------------------------------------------------------------------------
# This process

_PROC_PIDTASKINFO = 4


class _ProcTaskInfo(ctypes.Structure):
    # <sys/proc_info.h> struct proc_taskinfo, filled by proc_pidinfo(PROC_PIDTASKINFO).
    _fields_ = [
        ("pti_virtual_size", ctypes.c_uint64),
        ("pti_resident_size", ctypes.c_uint64),
        ("pti_other_u64", ctypes.c_uint64 * 4),
        ("pti_other_i32", ctypes.c_int32 * 12),
    ]


def _darwin_rss() -> int | None:
    try:
        libproc = ctypes.CDLL("/usr/lib/libproc.dylib", use_errno=True)
        info = _ProcTaskInfo()
        size = ctypes.sizeof(info)
        filled = libproc.proc_pidinfo(
            os.getpid(), _PROC_PIDTASKINFO, ctypes.c_uint64(0), ctypes.byref(info), size
        )
        if filled != size:
            return None
        return int(info.pti_resident_size)
    except (OSError, AttributeError):
        return None


def _linux_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Largest resident set size this process has had, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is bytes on macOS and KiB on Linux.
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes.

    From ``proc_pidinfo`` on macOS and ``/proc/self/statm`` on Linux; where
    neither answers, the peak (:func:`peak_rss_bytes`). Memory MLX allocates
    on the GPU is not necessarily included: see ``mlx.core.get_active_memory``.
    """
    current = _darwin_rss() if sys.platform == "darwin" else _linux_rss()
    return current if current is not None else peak_rss_bytes()


def memory_info() -> dict[str, int]:
    """``{"rss_bytes": ..., "peak_rss_bytes": ...}`` for the status ``memory`` field."""
    return {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
