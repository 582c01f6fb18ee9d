"""The host telemetry on the wire and the owner-first policy, with a real agent,
a real host reader (over a /proc and /sys tree the test rewrites) and the stub."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from coordinator_stub.app import CoordinatorStub
from provider.agent import Agent
from provider.host.hardware import HardwareFacts
from provider.host.sensors import HostReader, HostSample

from ..host import fixtures as fx
from ..host.wire_rules import (
    check_diagnostic_status,
    check_hardware_summary,
    check_heartbeat_ints,
    check_safety_telemetry,
)
from .conftest import PID, provider_config, running
from .scripted_engine import ScriptedEngine

FAST = {"host_sample_interval_s": 0.05, "host_recover_s": 0.5}


async def buy(stub: CoordinatorStub, content: str) -> tuple[int, Any]:
    payload = {"model": "scripted", "messages": [{"role": "user", "content": content}]}
    # Bounded: a request that never ends fails here, not after aiohttp's 300 s.
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(f"{stub.http_url}/v1/chat/completions", json=payload) as resp,
    ):
        return resp.status, await resp.json()


def linux_tree(root: Path) -> tuple[Path, Path]:
    proc = fx.write_tree(root / "proc", {"pressure/memory": fx.PSI_IDLE})
    sys_root = fx.write_tree(root / "sys", {"class/power_supply/AC/type": "Mains\n",
                                            "class/power_supply/AC/online": "1\n"})  # fmt: skip
    return proc, sys_root


def reader_over(proc: Path, sys_root: Path) -> HostReader:
    _, run = fx.runner({})
    return HostReader(platform="linux", run=run, proc=proc, sys_root=sys_root)  # type: ignore[arg-type]


async def test_heartbeats_carry_valid_telemetry_of_this_machine(stub: CoordinatorStub) -> None:
    async with running(provider_config(stub, **FAST)) as run:
        await stub.wait_provider_state(PID, "ready")
        await stub.wait_frame(
            PID,
            "heartbeat",
            where=lambda f: (
                f.message.safety_telemetry is not None
                and f.message.hardware_summary is not None
                and f.message.safety_telemetry["model_loaded"]
            ),
        )
        beats = [json.loads(f.raw) for f in stub.frames_received(PID, "heartbeat")]
        with_telemetry = [b for b in beats if b["safety_telemetry"] is not None]
        assert with_telemetry
        for beat in beats:
            assert check_heartbeat_ints(beat) == []
            assert check_safety_telemetry(beat) == [], beat["safety_telemetry"]
            assert check_hardware_summary(beat) == []
        last = with_telemetry[-1]["safety_telemetry"]
        # v2 needs the outer model hash, the compatibility set and the binary version.
        assert last["schema_version"] == 1
        assert last["provider_id"] == PID and last["coordinator_connected"] is True
        assert last["memory_rss_mb"] > 0 and last["uptime_s"] >= 0
        summary = with_telemetry[-1]["hardware_summary"]
        assert type(summary["cpu_cores_total"]) is int and summary.get("chip") != "arm"
        host = run.agent.status()["host"]
        assert host["memory_pressure"] in ("normal", "warning", "critical", None)
        assert host["chip"] == summary.get("chip") and host["cpu_cores"] >= 1


async def test_critical_memory_pressure_pauses_and_recovers_without_failing_a_job(
    stub: CoordinatorStub, tmp_path: Path
) -> None:
    proc, sys_root = linux_tree(tmp_path)
    # 4 s per request: long enough to go critical while one runs, on a loaded machine.
    engine = ScriptedEngine(tokens=40, step_s=0.1)
    config = provider_config(stub, max_concurrency=2, **FAST)
    async with running(config, engine, host_reader=reader_over(proc, sys_root)) as run:
        await stub.wait_provider_state(PID, "ready", timeout=10)
        job = asyncio.create_task(buy(stub, "in flight"))
        await stub.wait_sent(
            PID, "inference_request", where=lambda f: "in flight" in f.message.body
        )

        (proc / "pressure" / "memory").write_text(fx.PSI_CRITICAL)
        await stub.wait_provider_state(PID, "degraded")
        update = await stub.wait_frame(
            PID, "state_update", where=lambda f: f.message.state == "degraded"
        )
        assert update.message.reason == "memory_pressure_critical"
        assert update.message.metrics_snapshot.slots_free == 0
        assert not job.done()
        assert run.agent.state.in_flight == 1 and run.agent.state.slots_free == 0
        holding = run.agent.status()["host"]["holding_back"]
        assert holding == [{"reason": "memory_pressure_critical", "slot_limit": 0}]
        diagnostic = await stub.wait_frame(
            PID,
            "diagnostic_status",
            where=lambda f: "memory_pressure_critical" in f.message.optional.get("reason", ""),
        )
        assert check_diagnostic_status(diagnostic.raw) == []
        assert json.loads(diagnostic.raw)["memory_pressure"] == "critical"
        refused, body = await buy(stub, "while paused")
        assert refused == 503 and body["error"]["code"] == "no_provider_available"

        status, completion = await asyncio.wait_for(job, 60)
        assert status == 200 and completion["usage"]["completion_tokens"] == 40

        (proc / "pressure" / "memory").write_text(fx.PSI_IDLE)
        await stub.wait_provider_state(PID, "ready", timeout=10)
        assert run.agent.status()["host"]["holding_back"] == []
        status, completion = await buy(stub, "after")
        assert status == 200 and completion["usage"]["completion_tokens"] == 40
        ends = [f.message for f in stub.frames_received(PID, "inference_response_end")]
        assert all(e.status == "complete" for e in ends), [e.status for e in ends]


async def test_serious_heat_offers_one_slot(stub: CoordinatorStub, tmp_path: Path) -> None:
    proc, sys_root = linux_tree(tmp_path)
    zone = sys_root / "class" / "thermal" / "thermal_zone0"
    fx.write_tree(zone, {"temp": "50000\n", "trip_point_0_type": "passive\n",
                         "trip_point_0_temp": "90000\n"})  # fmt: skip
    config = provider_config(stub, max_concurrency=3, **FAST)
    async with running(config, host_reader=reader_over(proc, sys_root)) as run:
        await stub.wait_provider_state(PID, "ready", timeout=10)
        (zone / "temp").write_text("92000\n")
        beat = await stub.wait_frame(PID, "heartbeat", where=lambda f: f.message.slots_free == 1)
        assert beat.message.status == "ready" and beat.message.slots_total == 3
        telemetry = json.loads(beat.raw)["safety_telemetry"]
        assert telemetry["thermal_state"] == "serious" and telemetry["thermally_throttled"]
        assert run.agent.state.slots_offered == 1
        (zone / "temp").write_text("40000\n")
        await stub.wait_frame(PID, "heartbeat", where=lambda f: f.message.slots_free == 3)


async def test_battery_pauses_only_when_configured(stub: CoordinatorStub, tmp_path: Path) -> None:
    proc, sys_root = linux_tree(tmp_path)
    (sys_root / "class" / "power_supply" / "AC" / "online").write_text("0\n")
    fx.write_tree(sys_root, {"class/power_supply/BAT0/type": "Battery\n",
                             "class/power_supply/BAT0/status": "Discharging\n"})  # fmt: skip
    reader = reader_over(proc, sys_root)
    async with running(provider_config(stub, **FAST), host_reader=reader) as run:
        update = await stub.wait_frame(
            PID, "state_update", where=lambda f: f.message.reason == "on_battery"
        )
        assert update.message.state == "degraded"
        assert run.agent.status()["host"]["power_source"] == "battery"
    config = provider_config(stub, pause_on_battery=False, **FAST)
    async with running(config, host_reader=reader_over(proc, sys_root)) as run:
        await stub.wait_provider_state(PID, "ready", timeout=10)
        await stub.wait_frame(
            PID, "heartbeat", where=lambda f: f.message.safety_telemetry is not None
            and run.agent.host.samples >= 3,
        )  # fmt: skip
        assert run.agent.state.state == "ready" and run.agent.holds.active == {}


def test_restart_count_persists_next_to_the_config(tmp_path: Path) -> None:
    config = provider_config("ws://127.0.0.1:9/ws/provider")
    path = tmp_path / "config.toml"
    counts = [Agent(config, ScriptedEngine(), config_path=path).restart_count for _ in range(3)]
    assert counts == [0, 1, 2]
    assert Agent(config, ScriptedEngine()).restart_count == 0  # no config file: not counted


async def test_heartbeats_never_wait_for_a_stuck_host_reading(stub: CoordinatorStub) -> None:
    release = threading.Event()

    class Stuck:
        def hardware(self) -> HardwareFacts:
            return HardwareFacts(cpu_cores=2)

        def sample(self) -> HostSample:
            release.wait(30)  # e.g. a command that hangs until its timeout
            return HostSample(observed_at=time.time())

    try:
        async with running(provider_config(stub, **FAST), host_reader=Stuck()) as run:
            await stub.wait_provider_state(PID, "ready", timeout=10)
            start = time.monotonic()
            await asyncio.sleep(4)
            beats = [f for f in stub.frames_received(PID, "heartbeat") if f.time >= start]
            assert len(beats) >= 3
            gaps = [b.time - a.time for a, b in itertools.pairwise(beats)]
            assert max(gaps) <= 2.0, gaps
            # No reading yet: telemetry still goes out, with the unknowns as the wire wants.
            telemetry = json.loads(beats[-1].raw)["safety_telemetry"]
            assert check_safety_telemetry(json.loads(beats[-1].raw)) == []
            assert telemetry["memory_pressure"] == "normal" and run.agent.host.latest is None
    finally:
        release.set()
