"""The agent with its local companions: wake detection and the status endpoint."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from coordinator_stub.app import CoordinatorStub
from provider.host.power import watch_for_wake
from provider.ops.status_server import StatusServer

from .conftest import PID, provider_config, running


async def test_clock_jump_reconnects_at_once(stub: CoordinatorStub) -> None:
    # Backoff that would take a minute: only the wake path can reconnect fast.
    config = provider_config(stub, backoff_initial_s=30.0, backoff_max_s=60.0)
    wall = [1000.0]
    mono = [50.0]
    readings = [0]
    watching = asyncio.Event()

    async with running(config) as run:
        await stub.wait_provider_state(PID, "ready")
        first = stub.session(PID)
        loop = asyncio.get_running_loop()

        def read() -> tuple[float, float]:
            readings[0] += 1
            if readings[0] == 2:
                watching.set()
            return wall[0], mono[0]

        watcher = asyncio.create_task(
            watch_for_wake(run.agent.wake_detected, interval=0.01, clock=read)
        )
        try:
            await watching.wait()  # the detector has a baseline
            wall[0] += 3600.0  # the lid was closed for an hour: wall moved, monotonic did not
            woke_at = loop.time()
            await stub.wait_for(
                lambda: stub.session(PID) not in (None, first) and stub.state(PID) == "ready",
                timeout=10,
                what="a new session after the wake",
            )
            assert loop.time() - woke_at < 5  # far below the 30 s backoff
            assert run.agent.reconnects[-1]["cause"] == "wake"
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def test_status_endpoint_reflects_the_agent(stub: CoordinatorStub) -> None:
    async with running(provider_config(stub)) as run:
        await stub.wait_provider_state(PID, "ready")
        server = StatusServer(run.agent.status, run.agent.is_healthy, port=0)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{server.url}/healthz") as resp:
                    assert resp.status == 200
                async with http.get(f"{server.url}/status") as resp:
                    status = json.loads(await resp.text())
                assert status["connection"] == "connected" and status["state"] == "ready"
                assert status["provider_id"] == PID and status["totals"]["complete"] >= 1
                # The engine's pace: the warm-up request's tokens were timed.
                assert status["model"]["inter_token_latency_ms"]["samples"] >= 1
                assert status["model"]["prefill_slice"]["budget_ms"] == 100.0
                async with http.get(f"{server.url}/metrics") as resp:
                    metrics = await resp.text()
                assert "mlx_provider_heartbeats_sent_total" in metrics
                assert 'mlx_provider_prefill_slice_budget_seconds{model="scripted"} 0.1' in metrics
                await stub.stop()  # the coordinator goes away
                await stub.wait_for(
                    lambda: run.agent.session is None or run.agent.state.state == "unavailable"
                )
                async with http.get(f"{server.url}/healthz") as resp:
                    assert resp.status == 503
        finally:
            await server.stop()
