"""The background monitor: off the event loop, bounded, never in anyone's way."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from provider.host.hardware import HardwareFacts
from provider.host.monitor import HostMonitor
from provider.host.sensors import HostSample


class Scripted:
    """A reader whose samples run ``behaviours`` in turn (then plain samples)."""

    def __init__(self, *behaviours: Callable[[], None]) -> None:
        self.behaviours = list(behaviours)
        self.threads: list[str] = []
        self.count = 0

    def hardware(self) -> HardwareFacts:
        self.threads.append(threading.current_thread().name)
        return HardwareFacts(chip="Apple M4", cpu_cores=10)

    def sample(self) -> HostSample:
        self.threads.append(threading.current_thread().name)
        self.count += 1
        if self.behaviours:
            self.behaviours.pop(0)()
        return HostSample(observed_at=float(self.count))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_reads_off_the_loop_and_reports_on_it() -> None:
    reader = Scripted()
    loop_thread = threading.current_thread().name
    seen: list[tuple[str, object]] = []
    monitor = HostMonitor(
        reader,
        interval_s=0.01,
        on_hardware=lambda f: seen.append((threading.current_thread().name, f)),
        on_sample=lambda s: seen.append((threading.current_thread().name, s)),
    )
    task = asyncio.create_task(monitor.run())
    await until(lambda: monitor.samples >= 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert all(name.startswith("host-sensors") for name in reader.threads)
    assert all(name == loop_thread for name, _ in seen)
    assert seen[0][1] == HardwareFacts(chip="Apple M4", cpu_cores=10)
    assert monitor.hardware == seen[0][1] and monitor.latest is not None


async def test_a_failing_or_stuck_read_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def fail() -> None:
        raise OSError("sensor gone")

    reader = Scripted(fail, lambda: release.wait(5))
    monitor = HostMonitor(reader, interval_s=0.01, timeout_s=0.2)
    task = asyncio.create_task(monitor.run())
    await until(lambda: reader.count >= 2)  # the stuck read is running
    started = time.monotonic()
    await until(lambda: "took over" in caplog.text)
    assert time.monotonic() - started < 5  # abandoned at its timeout, not waited for
    release.set()
    await until(lambda: monitor.samples >= 2)  # and sampling goes on
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert "host reading failed" in caplog.text


async def test_cancel_does_not_wait_for_a_read_in_progress() -> None:
    release = threading.Event()
    reader = Scripted(lambda: release.wait(10))
    monitor = HostMonitor(reader, interval_s=0.01)
    task = asyncio.create_task(monitor.run())
    await until(lambda: reader.count >= 1)
    started = time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert time.monotonic() - started < 1.0
    release.set()


async def test_a_failing_callback_does_not_stop_sampling(caplog: pytest.LogCaptureFixture) -> None:
    def boom(sample: HostSample) -> None:
        raise RuntimeError("bug")

    monitor = HostMonitor(Scripted(), interval_s=0.01, on_sample=boom)
    task = asyncio.create_task(monitor.run())
    await until(lambda: monitor.samples >= 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert "acting on a host sample failed" in caplog.text
