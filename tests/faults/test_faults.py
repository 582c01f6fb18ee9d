"""Fault suite: the provider under the failures the field has shown us.

Every case ends with :func:`assert_sound`: no exception escaped (no ERROR log
from the provider, the agent task still running), no slot leaked, exactly
one end frame per request id the stub saw, and the provider ready again.

Protocol v2 (the encrypted leg) throughout; the cases where the protocols
behave differently (a coordinator killed and restarted, duplicated and
out-of-order frames, a drain during warm-up) run on v1 as well.
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
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator_stub.app import CoordinatorStub
from provider import agent as agent_module
from tests.session.conftest import (
    PID,
    Running,
    drain_phase,
    provider_config,
    registrations,
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


async def send_request(stub: CoordinatorStub, request_id: str, content: str = "hi") -> None:
    """An ``inference_request`` outside routing (sealed afresh on the encrypted leg)."""
    await stub.send_request(PID, json.dumps(chat(content, max_tokens=3)), request_id=request_id)


def is_buyer(frame: Any) -> bool:
    return not frame.message.request_id.startswith("warmup")


async def assert_sound(
    stub: CoordinatorStub,
    run: Running,
    caplog: pytest.LogCaptureFixture,
    expected_errors: tuple[str, ...] = (),
) -> None:
    """``expected_errors``: ERROR log lines the fault itself must cause (their start)."""
    await stub.wait_provider_state(PID, "ready", timeout=20)
    await stub.wait_for(lambda: run.agent.state.in_flight == 0, what="no job in flight")
    assert not run.task.done(), "the agent stopped"
    errors = [
        r
        for r in caplog.records
        if r.name.startswith("mlx_provider")
        and r.levelno >= logging.ERROR
        and not r.getMessage().startswith(expected_errors)
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
        # A fast flood (~4 MB/s): the send buffers fill within a second of the
        # black hole, so the bounded send trips 5 s later. A slow one would let
        # TCP_USER_TIMEOUT end the closed window first (15 s, see reliability.md).
        engine = ScriptedEngine(tokens=1_000_000, step_s=0.0005, words=("y" * 2000,))
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
                # The bounded send (5 s) ends it, long before the watchdog (15 s).
                assert loop.time() - holed_at <= 20
                assert proxy.accepted >= 2
                assert run.agent.reconnects[-1]["cause"] == "send_timeout"
                assert run.agent.totals["cancelled"] == 1  # the in-flight job ended, accounted
                await assert_sound(stub, run, caplog)
                buyer.cancel()
                await asyncio.gather(buyer, return_exceptions=True)
        finally:
            await proxy.stop()


@pytest.mark.slow
async def test_watchdog_ends_a_path_that_neither_completes_sends_nor_delivers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only the watchdog is left to end this path: the bounded send is set
    # above the watchdog's 15 s, and TCP_USER_TIMEOUT is turned off on the
    # socket (on Linux it also ends a zero window after the same 15 s, and
    # which of the two fired first would be a race).
    caplog.set_level(logging.INFO)
    async with CoordinatorStub(stub_config(heartbeat_interval_s=1)) as stub:
        proxy = BlackholeProxy("127.0.0.1", stub.ws_port)
        await proxy.start()
        url = f"ws://127.0.0.1:{proxy.port}/ws/provider"
        engine = ScriptedEngine(tokens=1_000_000, step_s=0.0005, words=("w" * 2000,))
        config = provider_config(stub, coordinator_url=url, send_timeout_s=60.0)
        try:
            async with running(config, engine) as run:
                await stub.wait_provider_state(PID, "ready")
                first = stub.session(PID)
                assert run.session is not None
                sock = run.session.ws.transport.get_extra_info("socket")
                user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
                if user_timeout is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, user_timeout, 0)
                buyer = asyncio.create_task(buy(stub.http_url, chat("flood", stream=True)))
                await stub.wait_frame(PID, "inference_response_chunk", where=is_buyer)
                loop = asyncio.get_running_loop()
                holed_at = loop.time()
                assert proxy.blackhole() == 1
                await stub.wait_for(
                    lambda: stub.session(PID) not in (None, first) and stub.state(PID) == "ready",
                    timeout=40,
                    what="registered again through a healthy path",
                )
                took = loop.time() - holed_at
                lost = run.agent.reconnects[-1]
                assert lost["cause"] == "watchdog", lost
                silent = float(lost["detail"].split(" for ")[1].removesuffix(" s"))
                assert 15.0 < silent < 20.0, lost
                assert 15.0 < took < 30.0
                assert run.agent.totals["cancelled"] == 1
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
    caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    ws_port, http_port = free_port(), free_port()
    proc, http_url = await start_stub_process(ws_port, http_port)
    config = provider_config(
        f"ws://127.0.0.1:{ws_port}/ws/provider",
        backoff_initial_s=0.1,
        backoff_max_s=1.0,
        protocol=protocol,
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
    config = provider_config(stub, max_concurrency=3, protocol="v1")
    async with running(config, engine) as run:
        await stub.wait_provider_state(PID, "ready")
        stub.duplicate_frames(True)
        results = await asyncio.gather(*(buy(stub.http_url, chat(f"q{i}")) for i in range(3)))
        # The copy of a request that is running is ignored: a duplicate_request_id
        # nak naming it would make the coordinator fail the request it waits for.
        # A copy arriving after the end is nak'd, which fails nothing.
        assert [code for code, _ in results] == [200, 200, 200]
        ends = stub.frames_received(PID, "inference_response_end")
        assert len(ends) == len({f.message.request_id for f in ends})
        ended_at = {f.message.request_id: f.time for f in ends}
        for nak in stub.frames_received(PID, "nak"):
            assert nak.message.error.code == "duplicate_request_id"
            assert nak.time > ended_at[nak.message.in_reply_to]
        stub.duplicate_frames(False)
        await assert_sound(stub, run, caplog)


async def test_a_request_sent_twice_on_the_encrypted_leg_runs_once(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture
) -> None:
    # The coordinator re-sends a request (sealed again, a new sequence number):
    # the copy that arrives while it runs is ignored, the one after its end
    # is refused by name, which fails nothing.
    engine = ScriptedEngine(tokens=20, step_s=0.02)
    async with running(provider_config(stub, max_concurrency=2), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        await send_request(stub, "twice")
        await send_request(stub, "twice")
        end = await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "twice"
        )
        assert end.message.status == "complete"
        assert stub.frames_received(PID, "nak") == []
        await send_request(stub, "twice")
        nak = await stub.wait_frame(PID, "nak")
        assert (nak.message.in_reply_to, nak.message.error.code) == (
            "twice",
            "duplicate_request_id",
        )
        assert len(engine.started) == 2  # the warm-up and one run of "twice"
        assert stub.drops == []
        await assert_sound(stub, run, caplog)


async def test_a_replayed_frame_closes_the_encrypted_leg_and_the_provider_reconnects(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture
) -> None:
    # The same sealed frame again (same sequence number) is a replay: the
    # provider refuses it by name and never runs it, the coordinator closes
    # the leg as Go does, and the provider comes back with fresh keys.
    engine = ScriptedEngine(tokens=5, step_s=0.001)
    async with running(provider_config(stub), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        first = stub.session(PID)
        code, _ = await buy(stub.http_url, chat("replayed"))
        assert code == 200
        sealed = next(f for f in stub.frames_sent(PID, "inference_request") if is_buyer(f))
        await stub.send_raw(PID, sealed.raw)
        drop = await stub.wait_drop(PID, "tier2_session_closed")
        assert drop.detail == "tier2_aead_decrypt_failed"
        [nak] = stub.frames_received(PID, "nak")
        assert nak.message.error.code == "tier2_aead_decrypt_failed"
        assert nak.message.in_reply_to == sealed.message.request_id
        await stub.wait_for(
            lambda: stub.session(PID) not in (None, first), what="a new session, fresh keys"
        )
        assert engine.started.count("replayed") == 1
        await assert_sound(stub, run, caplog, ("inference_request does not decrypt",))


async def test_out_of_order_cancel_before_request_and_after_end(
    stub: CoordinatorStub, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    async with running(provider_config(stub, protocol=protocol), ScriptedEngine(tokens=3)) as run:
        await stub.wait_provider_state(PID, "ready")
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"early"}')
        await send_request(stub, "early")
        if protocol == "v1":
            # answered once; the late request is then a duplicate
            nak = await stub.wait_frame(PID, "nak")
            assert nak.message.error.code == "duplicate_request_id"
        else:
            # ignored on the encrypted leg (no end for a request the coordinator
            # does not hold); the request then runs
            end = await stub.wait_frame(
                PID, "inference_response_end", where=lambda f: f.message.request_id == "early"
            )
            assert end.message.status == "complete"
        # cancel after end: ignored
        await send_request(stub, "done")
        await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "done"
        )
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"done"}')
        await stub.send_raw(PID, '{"type":"preflight","request_id":"fence","estimated_tokens":1}')
        await stub.wait_frame(PID, "preflight_ack")
        assert stub.drops == []
        await assert_sound(stub, run, caplog)


async def test_drain_during_warm_up_completes(
    stub: CoordinatorStub,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    # A coordinator's drain completes, then the agent comes back (it is not a
    # shutdown); a signal's drain completes and exits 0.
    monkeypatch.setattr(agent_module, "COORDINATOR_DRAIN_RECONNECT_S", 0.3)
    # The coordinator's warm_up runs a tiny generation; make it slow.
    engine = ScriptedEngine(tokens=2, step_s=0.5)

    def warming_up(f: Any) -> bool:
        return f.message.reason == "warming_up"

    def phases() -> list[str]:
        return [drain_phase(f) for f in stub.frames_received(PID, "drain_status")]

    async with running(provider_config(stub, protocol=protocol), engine) as run:
        await stub.wait_provider_state(PID, "ready", timeout=10)
        await stub.warm_up(PID)
        await stub.wait_frame(PID, "state_update", where=warming_up)
        await stub.drain(PID)
        await stub.wait_for(
            lambda: registrations(stub) == 2,
            timeout=15,
            what="a new registration after the coordinator's drain",
        )
        assert phases()[-1] == "complete" and not run.task.done()
        await stub.wait_provider_state(PID, "ready", timeout=10)

        since = time.monotonic()
        await stub.warm_up(PID)
        await stub.wait_frame(PID, "state_update", where=warming_up, since=since)
        run.agent.request_drain("SIGTERM")
        assert await asyncio.wait_for(run.task, 10) == 0
        assert phases()[-1] == "complete"
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
        seen = len(stub.frames_received("prov-sub", "state_update"))
        job = asyncio.create_task(buy(stub.http_url, chat("[block] long prompt")))
        await stub.wait_sent(
            "prov-sub", "inference_request", where=lambda f: "[block]" in f.message.body
        )
        # Sent is not started: a SIGTERM before the provider read the request
        # would refuse it (draining). Its one slot going busy says it started.
        await stub.wait_for(
            lambda: any(
                f.message.state == "busy"
                for f in stub.frames_received("prov-sub", "state_update")[seen:]
            ),
            timeout=20,
            what="the job started",
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
