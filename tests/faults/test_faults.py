"""Fault suite: the provider under the failures the field has shown us.

Every case ends with :func:`assert_sound`: no exception escaped (no ERROR log
from the provider, the agent task still running), no slot leaked, exactly
one end frame per request id the stub saw, and the provider ready again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator_stub.app import CoordinatorStub
from tests.session.conftest import (
    PID,
    Running,
    drain_phase,
    provider_config,
    running,
    stub_config,
)
from tests.session.scripted_engine import ScriptedEngine

from .proxy import BlackholeProxy

ROOT = Path(__file__).parents[2]


def chat(content: str, *, stream: bool = False, max_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": stream}
    if max_tokens:
        out["max_tokens"] = max_tokens
    return out


async def buy(http_url: str, payload: dict[str, Any]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{http_url}/v1/chat/completions", json=payload) as resp,
    ):
        return resp.status, await resp.text()


def request_frame(request_id: str, content: str = "hi", max_tokens: int = 3) -> str:
    body = json.dumps(chat(content, max_tokens=max_tokens))
    return json.dumps(
        {"type": "inference_request", "request_id": request_id, "stream": False, "body": body}
    )


def is_buyer(frame: Any) -> bool:
    return not frame.message.request_id.startswith("warmup")


async def assert_sound(
    stub: CoordinatorStub, run: Running, caplog: pytest.LogCaptureFixture
) -> None:
    await stub.wait_provider_state(PID, "ready", timeout=20)
    await stub.wait_for(lambda: run.agent.state.in_flight == 0, what="no job in flight")
    assert not run.task.done(), "the agent stopped"
    errors = [
        r
        for r in caplog.records
        if r.name.startswith("mlx_provider") and r.levelno >= logging.ERROR
    ]
    assert errors == [], [r.getMessage() for r in errors]
    ends = collections.Counter(
        f.message.request_id for f in stub.frames_received(PID, "inference_response_end")
    )
    assert all(n == 1 for n in ends.values()), {k: n for k, n in ends.items() if n > 1}
    assert run.agent.state.slots_free == run.agent.state.slots_total


async def test_half_open_path_is_detected_and_left_within_20s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with CoordinatorStub(stub_config(heartbeat_interval_s=30)) as stub:
        proxy = BlackholeProxy("127.0.0.1", stub.ws_port)
        await proxy.start()
        url = f"ws://127.0.0.1:{proxy.port}/ws/provider"
        engine = ScriptedEngine(tokens=1_000_000, step_s=0.002, words=("y" * 200,))
        try:
            async with running(provider_config(stub, coordinator_url=url), engine) as run:
                await stub.wait_provider_state(PID, "ready")
                first = stub.session(PID)
                buyer = asyncio.create_task(buy(stub.http_url, chat("stream", stream=True)))
                await stub.wait_frame(PID, "inference_response_chunk", where=is_buyer)
                loop = asyncio.get_running_loop()
                holed_at = loop.time()
                assert proxy.blackhole() == 1
                await stub.wait_for(
                    lambda: stub.session(PID) not in (None, first) and stub.state(PID) == "ready",
                    timeout=20,
                    what="registered again through a healthy path",
                )
                assert loop.time() - holed_at <= 20
                assert proxy.accepted >= 2
                assert run.agent.reconnects[-1]["cause"] in ("send_timeout", "watchdog")
                assert run.agent.totals["cancelled"] == 1  # the in-flight job ended, accounted
                await assert_sound(stub, run, caplog)
                buyer.cancel()
                await asyncio.gather(buyer, return_exceptions=True)
        finally:
            await proxy.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_stub_process(
    ws_port: int, http_port: int
) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator_stub", "--ws-port", str(ws_port),
        "--http-port", str(http_port), "--heartbeat-interval", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith("ready ws="), line
    return proc, line.split()[2].removeprefix("http=")


async def wait_status(http_url: str, predicate: Any, timeout: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{http_url}/v1/status") as resp:
                status = await resp.json()
            if predicate(status):
                return status
            await asyncio.sleep(0.05)  # polling another process's HTTP status


def provider_state(status: dict[str, Any]) -> str | None:
    return next((p["state"] for p in status["providers"] if p["provider_id"] == PID), None)


async def test_coordinator_process_killed_mid_stream_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ws_port, http_port = free_port(), free_port()
    proc, http_url = await start_stub_process(ws_port, http_port)
    config = provider_config(
        f"ws://127.0.0.1:{ws_port}/ws/provider",
        backoff_initial_s=0.1,
        backoff_max_s=1.0,
    )
    engine = ScriptedEngine(tokens=1_000_000, step_s=0.005)
    hooks = JobEvents()
    try:
        async with running(config, engine, hooks=hooks) as run:
            await wait_status(http_url, lambda s: provider_state(s) == "ready")
            hooks.started.clear()  # both were set by the stub's warm-up job
            hooks.finished.clear()
            buyer = asyncio.create_task(buy(http_url, chat("stream", stream=True)))
            await asyncio.wait_for(hooks.started.wait(), 10)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.gather(buyer, return_exceptions=True)  # its coordinator died
            await asyncio.wait_for(hooks.finished.wait(), 10)
            assert run.agent.totals["cancelled"] == 1 and run.agent.state.in_flight == 0
            proc, http_url = await start_stub_process(ws_port, http_port)
            await wait_status(http_url, lambda s: provider_state(s) == "ready")
            code, text = await buy(http_url, chat("after restart", max_tokens=3))
            assert code == 200 and json.loads(text)["usage"]["completion_tokens"] == 3
            assert not run.task.done()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


class JobEvents:
    """Agent hooks as events: a job started, a job finished."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finished = asyncio.Event()

    def job_started(self) -> None:
        self.started.set()

    def job_finished(self) -> None:
        self.finished.set()


async def test_accept_then_close_50_times_is_not_a_hot_loop(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture
) -> None:
    stub.accept_then_close(50)
    config = provider_config(stub, backoff_initial_s=0.01, backoff_max_s=0.08, backoff_jitter=0.1)
    async with running(config) as run:
        await stub.wait_for(lambda: len(stub.rejections) >= 50, timeout=30, what="50 closes")
        times = [r.time for r in stub.rejections[:50]]
        intervals = [b - a for a, b in itertools.pairwise(times)]
        assert min(intervals[4:]) >= 0.08  # at the cap, never faster
        assert 49 / (times[-1] - times[0]) <= 1 / 0.08  # attempts per second bounded
        await assert_sound(stub, run, caplog)


async def test_slow_coordinator_reads_trip_the_bounded_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with CoordinatorStub(stub_config(so_rcvbuf=4096)) as stub:
        engine = ScriptedEngine(tokens=1_000_000, step_s=0.0005, words=("z" * 2000,))
        async with running(provider_config(stub, send_timeout_s=1.0), engine) as run:
            await stub.wait_provider_state(PID, "ready")
            first = stub.session(PID)
            buyer = asyncio.create_task(buy(stub.http_url, chat("flood", stream=True)))
            await stub.wait_frame(PID, "inference_response_chunk", where=is_buyer)
            stub.stall_reads(PID)
            await stub.wait_for(
                lambda: stub.session(PID) not in (None, first), timeout=30, what="reconnect"
            )
            assert run.agent.reconnects[-1]["cause"] == "send_timeout"
            await assert_sound(stub, run, caplog)
            buyer.cancel()
            await asyncio.gather(buyer, return_exceptions=True)


async def test_duplicated_frames_give_one_end_per_request(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine(tokens=5, step_s=0.001)
    async with running(provider_config(stub, max_concurrency=3), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        stub.duplicate_frames(True)
        results = await asyncio.gather(*(buy(stub.http_url, chat(f"q{i}")) for i in range(3)))
        assert [code for code, _ in results] == [200, 200, 200]
        await stub.wait_for(
            lambda: len(stub.frames_received(PID, "nak")) >= 3, what="naks for the duplicates"
        )
        assert {f.message.error.code for f in stub.frames_received(PID, "nak")} == {
            "duplicate_request_id"
        }
        stub.duplicate_frames(False)
        await assert_sound(stub, run, caplog)


async def test_out_of_order_cancel_before_request_and_after_end(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(provider_config(stub), ScriptedEngine(tokens=3)) as run:
        await stub.wait_provider_state(PID, "ready")
        # cancel before its request: answered once; the late request is a duplicate
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"early"}')
        await stub.send_raw(PID, request_frame("early"))
        nak = await stub.wait_frame(PID, "nak")
        assert nak.message.error.code == "duplicate_request_id"
        # cancel after end: ignored
        await stub.send_raw(PID, request_frame("done"))
        await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "done"
        )
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"done"}')
        await stub.send_raw(PID, '{"type":"preflight","request_id":"fence","estimated_tokens":1}')
        await stub.wait_frame(PID, "preflight_ack")
        await assert_sound(stub, run, caplog)


async def test_drain_during_warm_up_exits_0(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture
) -> None:
    # The coordinator's warm_up runs a tiny generation; make it slow.
    engine = ScriptedEngine(tokens=2, step_s=0.5)
    async with running(provider_config(stub), engine) as run:
        await stub.wait_provider_state(PID, "ready", timeout=10)
        await stub.warm_up(PID)
        await stub.wait_frame(PID, "state_update", where=lambda f: f.message.reason == "warming_up")
        await stub.drain(PID)
        assert await asyncio.wait_for(run.task, 10) == 0
        phases = [drain_phase(f) for f in stub.frames_received(PID, "drain_status")]
        assert phases[-1] == "complete"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_sigterm_during_prefill_finishes_the_job_and_exits_0(
    stub: CoordinatorStub,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.session.scripted_provider", stub.ws_url, "5", "0.01",
        "--block", "2.0",
        cwd=ROOT, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await stub.wait_provider_state("prov-sub", "ready", timeout=20)
        job = asyncio.create_task(buy(stub.http_url, chat("[block] long prompt")))
        await stub.wait_sent(
            "prov-sub", "inference_request", where=lambda f: "[block]" in f.message.body
        )
        proc.send_signal(signal.SIGTERM)  # mid-prefill: the engine thread is computing
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        code, text = await job
        assert code == 200 and json.loads(text)["usage"]["completion_tokens"] == 5
        ends = stub.frames_received("prov-sub", "inference_response_end")
        assert len([f for f in ends if is_buyer(f)]) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
