"""Facts about this machine and this process: memory, cores, chip, RSS.

Read once where they cannot change (total RAM, chip) and on demand where they
can (resident set size). macOS-only calls are guarded: on Linux the same
functions answer from ``/proc`` or fall back.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys


def total_ram_gb() -> int:
    """Physical memory in GiB, rounded; 0 where the OS does not say."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError, AttributeError):
        return 0


def chip_name() -> str:
    """The processor as the platform names it (may run ``uname -p``: call once)."""
    return platform.processor() or platform.machine()


def cpu_cores() -> int | None:
    return os.cpu_count()


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
