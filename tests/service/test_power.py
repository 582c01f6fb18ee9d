from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from provider.host.power import SleepAssertion, WakeDetector, watch_for_wake
from tests.service.helpers import FakeBin, wait_until


@pytest.fixture
def caffeinate_log(fake_bin: FakeBin) -> Path:
    log = fake_bin.path / "caffeinate.log"
    # exec keeps the PID, so the PID we record is the one SleepAssertion kills.
    fake_bin.add("caffeinate", f'#!/bin/sh\necho "$$ $*" >> "{log}"\nexec sleep 600\n')
    return log


def started(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    entries = []
    for line in log.read_text().splitlines():
        pid, args = line.split(" ", 1)
        entries.append((int(pid), args))
    return entries


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def assertion() -> Iterator[SleepAssertion]:
    sa = SleepAssertion(platform="darwin", pid=4242)
    yield sa
    sa.close()


def test_held_from_first_job_to_idle(caffeinate_log: Path, assertion: SleepAssertion) -> None:
    assert not assertion.held
    assertion.start()
    assert not assertion.held  # not until a job starts

    assertion.job_started()
    assert assertion.held
    pid = assertion.process_id
    assert pid is not None
    wait_until(lambda: len(started(caffeinate_log)) == 1)
    assert started(caffeinate_log) == [(pid, "-i -w 4242")]

    assertion.job_finished()
    assert not assertion.held
    assert not alive(pid)


def test_overlapping_jobs_share_one_process(
    caffeinate_log: Path, assertion: SleepAssertion
) -> None:
    assertion.job_started()
    pid = assertion.process_id
    # Let the fake record its start before anything can kill it.
    wait_until(lambda: len(started(caffeinate_log)) == 1)
    assertion.job_started()
    assertion.job_finished()
    assert assertion.held and assertion.process_id == pid
    assertion.job_finished()
    assert not assertion.held
    assert pid is not None and not alive(pid)
    assertion.job_started()  # a new busy period, a new process
    assert assertion.process_id not in (None, pid)
    wait_until(lambda: len(started(caffeinate_log)) == 2)


def test_always_holds_from_construction_until_close(caffeinate_log: Path) -> None:
    sa = SleepAssertion(always=True, platform="darwin")
    pid = sa.process_id
    sa.start()
    assert sa.process_id == pid
    assert pid is not None
    sa.job_started()
    sa.job_finished()
    assert sa.process_id == pid
    wait_until(lambda: len(started(caffeinate_log)) == 1)
    assert started(caffeinate_log)[0][1] == f"-i -w {os.getpid()}"
    sa.close()
    sa.close()
    assert not sa.held and not alive(pid)


def test_dead_caffeinate_is_replaced(caffeinate_log: Path, assertion: SleepAssertion) -> None:
    assertion.job_started()
    first = assertion._proc
    assert first is not None
    first.kill()
    first.wait()
    assert not assertion.held
    assertion.job_started()
    assert assertion.held and assertion.process_id != first.pid


def test_noop_off_macos(
    caffeinate_log: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("mlx_provider"), "propagate", True)
    sa = SleepAssertion(platform="linux")
    with caplog.at_level(logging.INFO, logger="mlx_provider"):
        sa.start()
        sa.job_started()
        sa.job_finished()
    assert not caffeinate_log.exists()
    assert [r.getMessage() for r in caplog.records] == [
        "no sleep assertion on linux; nothing keeps the machine awake"
    ]


def test_noop_without_caffeinate(
    fake_bin: FakeBin, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(fake_bin.path))
    sa = SleepAssertion(platform="darwin")
    with caplog.at_level(logging.INFO, logger="mlx_provider"):
        sa.job_started()
        assert not sa.held
    assert "caffeinate not found" in caplog.text


def test_wake_detector_pure() -> None:
    d = WakeDetector()
    assert d.observe(1000.0, 50.0) is False  # baseline
    assert d.observe(1001.0, 51.0) is False  # both advanced
    assert d.observe(1011.0, 52.0) is False  # 9 s of drift: under the threshold
    assert d.observe(1900.0, 53.0) is True  # 888 s asleep
    assert d.last_sleep_s == pytest.approx(888.0)
    assert d.observe(1850.0, 54.0) is False  # wall clock set back: not a wake
    tight = WakeDetector(threshold=2.0)
    tight.observe(0.0, 0.0)
    assert tight.observe(4.0, 1.0) is True


async def test_watch_for_wake_with_fake_clock() -> None:
    readings = iter([(100.0, 10.0), (101.0, 11.0), (402.0, 12.0)])
    woke: asyncio.Queue[float] = asyncio.Queue()

    def clock() -> tuple[float, float]:
        return next(readings, (403.0, 13.0))

    task = asyncio.create_task(watch_for_wake(woke.put_nowait, interval=0, clock=clock))
    try:
        slept = await asyncio.wait_for(woke.get(), 5)
    finally:
        task.cancel()
    assert slept == pytest.approx(300.0)
    assert woke.empty()


async def test_watch_for_wake_awaits_async_callback() -> None:
    readings = iter([(0.0, 0.0), (60.0, 1.0)])
    done = asyncio.Event()
    seen: list[float] = []

    async def on_wake(slept: float) -> None:
        await asyncio.sleep(0)
        seen.append(slept)
        done.set()

    task = asyncio.create_task(
        watch_for_wake(on_wake, interval=0, threshold=30, clock=lambda: next(readings, (61, 2)))
    )
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
    assert seen == [pytest.approx(59.0)]
