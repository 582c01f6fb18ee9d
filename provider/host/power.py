"""Keeping the Mac awake while it serves, and noticing when it slept anyway.

:class:`SleepAssertion` holds a no-idle-sleep assertion (``caffeinate -i``)
while jobs run. :class:`WakeDetector` and :func:`watch_for_wake` tell the
session that the machine just woke up, so it reconnects at once instead of
waiting for a ping timeout on a connection the coordinator dropped long ago.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from provider.logs import get_logger

__all__ = ["SleepAssertion", "WakeDetector", "read_clocks", "watch_for_wake"]

log = get_logger("power")


class SleepAssertion:
    """Prevent idle sleep while jobs run, with ``caffeinate -i -w <pid>``.

    Call :meth:`job_started` and :meth:`job_finished` around every job: the
    assertion is taken when the first job starts and released when the last
    one finishes, so overlapping jobs share one ``caffeinate`` process. With
    ``always=True`` it is taken at construction and held until :meth:`close`.
    Methods are synchronous and quick (spawn or terminate one process), so
    they may be called from the event loop.

    ``-w <pid>`` makes ``caffeinate`` exit when this process does, so a crash
    never leaves the Mac unable to sleep. ``-i`` prevents idle sleep only: the
    display may sleep, and closing the lid still sleeps a laptop.

    Where there is no ``caffeinate`` on ``PATH`` or ``platform`` (default
    :data:`sys.platform`) is not ``"darwin"``, every method is a no-op and
    :meth:`start` says so once in the log.
    """

    def __init__(
        self,
        *,
        always: bool = False,
        platform: str | None = None,
        pid: int | None = None,
        stop_timeout: float = 2.0,
    ) -> None:
        self.always = always
        self.platform = platform or sys.platform
        self.pid = pid if pid is not None else os.getpid()
        self.stop_timeout = stop_timeout
        self.jobs = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._explained = False
        if always:
            self._acquire()

    @property
    def held(self) -> bool:
        """Whether a ``caffeinate`` process is running for us now."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def process_id(self) -> int | None:
        """PID of the ``caffeinate`` process, while :attr:`held`."""
        return self._proc.pid if self.held and self._proc else None

    def start(self) -> None:
        """Say in the log whether an assertion is available; with ``always``, make sure it is held.

        Optional: :meth:`job_started` works without it.
        """
        if self.always:
            self._acquire()
        else:
            self._caffeinate()

    def job_started(self) -> None:
        """Count a job in; take the assertion if it is not held."""
        self.jobs += 1
        self._acquire()

    def job_finished(self) -> None:
        """Count a job out; release the assertion when none is left, unless ``always``."""
        self.jobs = max(0, self.jobs - 1)
        if self.jobs == 0 and not self.always:
            self._release()

    def close(self) -> None:
        """Release the assertion whatever the job count. Safe to call twice."""
        self.jobs = 0
        self._release()

    def __enter__(self) -> SleepAssertion:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _caffeinate(self) -> str | None:
        path = shutil.which("caffeinate") if self.platform == "darwin" else None
        if path is None and not self._explained:
            self._explained = True
            if self.platform == "darwin":
                log.warning("caffeinate not found on PATH; the Mac may sleep while serving")
            else:
                log.info("no sleep assertion on %s; nothing keeps the machine awake", self.platform)
        return path

    def _acquire(self) -> None:
        if self.held:
            return
        path = self._caffeinate()
        if path is None:
            return
        # A caffeinate that died (killed by hand?) is replaced, not counted as held.
        self._proc = subprocess.Popen(
            [path, "-i", "-w", str(self.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        log.info("holding sleep assertion", extra={"caffeinate_pid": self._proc.pid})

    def _release(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("released sleep assertion")


class WakeDetector:
    """Detect that the machine slept, from pairs of clock readings.

    Feed it ``(wall, monotonic)`` readings taken together, e.g. with
    :func:`read_clocks`. The monotonic clock does not advance while the machine
    sleeps (``mach_absolute_time`` on macOS, ``CLOCK_MONOTONIC`` on Linux);
    the wall clock does. When, between two readings, the wall clock advanced
    more than the monotonic one by over ``threshold`` seconds (default 10),
    the machine slept (or the wall clock was set forward, which is harmless:
    the caller just reconnects once too often). No I/O.
    """

    def __init__(self, *, threshold: float = 10.0) -> None:
        self.threshold = threshold
        self.last_sleep_s = 0.0
        self._last: tuple[float, float] | None = None

    def observe(self, wall: float, mono: float) -> bool:
        """Record a reading; return whether the machine slept since the previous one.

        When it returns True, :attr:`last_sleep_s` holds the estimated time asleep.
        The first reading only sets the baseline and returns False.
        """
        last, self._last = self._last, (wall, mono)
        if last is None:
            return False
        slept = (wall - last[0]) - (mono - last[1])
        if slept > self.threshold:
            self.last_sleep_s = slept
            return True
        return False


def read_clocks() -> tuple[float, float]:
    """``(time.time(), time.monotonic())``, read back to back."""
    return time.time(), time.monotonic()


async def watch_for_wake(
    on_wake: Callable[[float], object],
    *,
    interval: float = 1.0,
    threshold: float = 10.0,
    clock: Callable[[], tuple[float, float]] = read_clocks,
) -> None:
    """Call ``on_wake(seconds_asleep)`` each time the machine wakes; run until cancelled.

    It reads ``clock()`` (default :func:`read_clocks`) every ``interval``
    seconds and feeds a :class:`WakeDetector` with ``threshold``. ``on_wake``
    may be a plain function or a coroutine function; it is awaited before the
    next reading. Run it as a task next to the connection::

        watcher = asyncio.create_task(watch_for_wake(lambda s: reconnect.set()))
    """
    detector = WakeDetector(threshold=threshold)
    while True:
        if detector.observe(*clock()):
            log.info("woke from sleep", extra={"asleep_s": round(detector.last_sleep_s, 1)})
            result = on_wake(detector.last_sleep_s)
            if inspect.isawaitable(result):
                await result
        await asyncio.sleep(interval)
