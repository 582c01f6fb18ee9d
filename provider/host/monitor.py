"""Sampling the machine in the background, so that nothing else waits for it.

:class:`HostMonitor` reads the hardware facts once, then a
:class:`~provider.host.sensors.HostSample` every ``interval_s`` seconds, each
time on its own worker thread (never on the event loop, never on the
heartbeat's path: the heartbeat reads :attr:`HostMonitor.latest`). A read that
raises is logged and skipped; one that outlives ``timeout_s`` is abandoned
(its commands are bounded, so its thread ends soon after) and the next one
waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from provider.host.hardware import HardwareFacts
from provider.host.sensors import HostSample

log = logging.getLogger("mlx_provider.host")
T = TypeVar("T")


class Reader(Protocol):
    """What the monitor samples: :class:`~provider.host.sensors.HostReader`."""

    def hardware(self) -> HardwareFacts: ...
    def sample(self) -> HostSample: ...


class HostMonitor:
    """Samples ``reader`` on a timer; ``on_hardware`` and ``on_sample`` are
    called on the event loop with each result, in order."""

    def __init__(
        self,
        reader: Reader,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 30.0,
        on_hardware: Callable[[HardwareFacts], None] | None = None,
        on_sample: Callable[[HostSample], None] | None = None,
    ) -> None:
        self.reader = reader
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_hardware = on_hardware
        self.on_sample = on_sample
        self.hardware: HardwareFacts | None = None
        self.latest: HostSample | None = None
        self.samples = 0

    async def _off_loop(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T | None:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(pool, fn), self.timeout_s)
        except TimeoutError:
            log.warning("host reading took over %.0f s; skipped", self.timeout_s)
        except Exception:
            log.exception("host reading failed")
        return None

    async def run(self) -> None:
        """Sample until cancelled."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-sensors")
        loop = asyncio.get_running_loop()
        try:
            facts = await self._off_loop(pool, self.reader.hardware)
            if facts is not None:
                self.hardware = facts
                log.info(
                    "hardware",
                    extra={"chip": facts.chip, "cpu_cores": facts.cpu_cores,
                           "gpu_cores": facts.gpu_cores},
                )  # fmt: skip
                if self.on_hardware is not None:
                    self.on_hardware(facts)
            while True:
                started = loop.time()
                sample = await self._off_loop(pool, self.reader.sample)
                if sample is not None:
                    self.latest = sample
                    self.samples += 1
                    if self.on_sample is not None:
                        try:
                            self.on_sample(sample)
                        except Exception:
                            log.exception("acting on a host sample failed")
                await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
        finally:
            # Never wait here for a read in progress: its commands end by themselves.
            pool.shutdown(wait=False, cancel_futures=True)
