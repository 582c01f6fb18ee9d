"""The provider session against the coordinator stub with its hostile timers on."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator_stub.app import CoordinatorStub
from provider import agent as agent_module
from provider.config import load_config
from provider.coordinator.messages import Preflight
from provider.coordinator.session import Session

from .conftest import (
    PID,
    drain_phase,
    provider_config,
    registration,
    registrations,
    running,
    stub_config,
)
from .scripted_engine import ScriptedEngine


def body(content: str = "hi", *, stream: bool = False, max_tokens: int | None = None) -> dict:
    out: dict[str, Any] = {"model": "scripted", "messages": [{"role": "user", "content": content}]}
    out["stream"] = stream
    if max_tokens:
        out["max_tokens"] = max_tokens
    return out


async def buy(stub: CoordinatorStub, payload: dict) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stub.http_url}/v1/chat/completions", json=payload) as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if not payload.get("stream") else text)


def not_warm_up(frame: Any) -> bool:
    return not frame.message.request_id.startswith("warmup")


async def until(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` (for agent-side facts the stub is not told about)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the agent has no event for these facts
            await asyncio.sleep(0.02)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def heartbeat_times(stub: CoordinatorStub, since: float = 0.0) -> list[float]:
    return [f.time for f in stub.frames_received(PID, "heartbeat") if f.time >= since]


async def test_registers_and_passes_the_warm_up_gate(stub: CoordinatorStub, protocol: str) -> None:
    async with running(provider_config(stub, protocol=protocol)):
        await stub.wait_provider_state(PID, "ready")
        hello = registration(stub)
        assert hello.provider_id == PID and hello.max_concurrency == 1
        assert hello.type == {"v1": "hello", "v2": "auth_request"}[protocol]
        assert stub.provider(PID).protocol == int(protocol[1])  # type: ignore[union-attr]
        warm = stub.frames_sent(PID, "inference_request")[0].message
        assert "Reply with ok." in warm.body
        update = await stub.wait_frame(
            PID, "state_update", where=lambda f: f.message.state == "ready"
        )
        assert update.message.metrics_snapshot.slots_total == 1
        status, completion = await buy(stub, body("hello"))
        assert status == 200 and completion["choices"][0]["message"]["content"]


async def test_stays_ready_with_zero_drops_scaled_60s() -> None:
    # 60 s of the real timers shrunk by 5: write deadline 10 -> 2 s, inactivity
    # 90 -> 18 s; the heartbeat tick cannot go below 1 s, so it is 1 s.
    async with (
        CoordinatorStub(stub_config(write_deadline_s=2.0, inactivity_s=18.0)) as stub,
        running(provider_config(stub)),
    ):
        await stub.wait_provider_state(PID, "ready")
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await stub.wait_drop(PID, timeout=12.0)
        assert stub.drops == [] and stub.state(PID) == "ready"
        beats = heartbeat_times(stub, start)
        assert len(beats) >= 11
        assert max(gaps(beats)) <= 1.0 + 1.0


async def test_heartbeats_keep_cadence_while_a_job_blocks_its_engine_thread_30s(
    stub: CoordinatorStub,
) -> None:
    engine = ScriptedEngine(tokens=2, block_s=30.0)
    async with running(provider_config(stub), engine):
        await stub.wait_provider_state(PID, "ready")
        job = asyncio.create_task(buy(stub, body("[block] think hard")))
        sent = await stub.wait_sent(
            PID, "inference_request", where=lambda f: "[block]" in f.message.body
        )
        status, completion = await asyncio.wait_for(job, 60)
        beats = heartbeat_times(stub, sent.time)
        assert status == 200 and completion["usage"]["completion_tokens"] == 2
        assert beats[-1] - beats[0] >= 28  # heartbeats all through the 30 s block
        assert max(gaps(beats)) <= 1.0 + 1.0, gaps(beats)


async def test_cancel_during_a_long_prefill_ends_within_one_slice(stub: CoordinatorStub) -> None:
    engine = ScriptedEngine(tokens=2, block_s=30.0, slice_s=0.25)
    async with running(provider_config(stub), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        job = asyncio.create_task(buy(stub, body("[block] a long prompt")))
        assert await asyncio.to_thread(engine.prefilling.wait, 10)
        request_id = next(r for r, f in stub.in_flight.items() if f.kind == "buyer")
        sent = time.monotonic()
        assert await stub.cancel(request_id, "buyer_disconnected")
        end = await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == request_id
        )
        assert end.message.status == "cancelled"
        assert end.message.usage.completion_tokens == 0
        # The slice running when the cancel arrived was the last: the 30 s
        # prefill ends within one slice (plus a margin for a loaded machine).
        assert len([t for t in engine.slice_ends if t > sent]) <= 1
        assert end.time - sent < engine.slice_s + 1.0
        status, _ = await job
        assert status != 200
        await stub.wait_for(lambda: run.agent.state.in_flight == 0)


async def test_blocked_handler_does_not_delay_receive(
    stub: CoordinatorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = asyncio.Event()
    dispatch = Session.dispatch

    async def slow_dispatch(self: Session, msg: Any) -> None:
        if isinstance(msg, Preflight) and msg.request_id == "slow":
            await asyncio.sleep(20)  # a handler stuck on something for 20 s
            released.set()
        await dispatch(self, msg)

    monkeypatch.setattr(Session, "dispatch", slow_dispatch)
    async with running(provider_config(stub)) as run:
        await stub.wait_provider_state(PID, "ready")
        session = run.session
        before = session.frames_received
        t_sent = time.monotonic()
        await stub.send_raw(PID, '{"type":"preflight","request_id":"slow","estimated_tokens":1}')
        for i in range(5):
            await stub.send_raw(
                PID, json.dumps({"type": "preflight", "request_id": f"u{i}", "estimated_tokens": 1})
            )
        # A heartbeat sent after the frames proves time passed on the provider.
        await stub.wait_frame(PID, "heartbeat", since=t_sent + 1.0)
        assert not released.is_set()
        assert session.frames_received == before + 6  # all received while the handler waits
        last = await stub.wait_frame(
            PID,
            "preflight_ack",
            where=lambda f: f.message.request_id == "u4",
            timeout=30,
        )
        assert last.time - t_sent >= 19.5  # handled in order, after the block
        assert session.max_queue_wait_s >= 19.5  # ... because they waited on the queue
        assert max(gaps(heartbeat_times(stub, t_sent))) <= 2.0
        assert stub.drops == []


async def test_reregisters_within_3s_of_a_coordinator_restart() -> None:
    stub = CoordinatorStub(stub_config())
    await stub.start()
    port = stub.ws_port
    config = provider_config(stub, backoff_initial_s=1.0, backoff_max_s=60.0)
    async with running(config) as run:
        await stub.wait_provider_state(PID, "ready")
        await stub.stop()
        await asyncio.sleep(5.0)  # the coordinator is down for 5 s: that is the scenario
        again = CoordinatorStub(stub_config(ws_port=port))
        await again.start()
        back = time.monotonic()
        try:
            await again.wait_connected(PID, timeout=10)
            assert time.monotonic() - back <= 3.0
            assert run.agent.reconnects[-1]["cause"] in ("closed", "refused")
        finally:
            await again.stop()


async def test_backoff_after_20_refusals_grows_caps_and_jitters(stub: CoordinatorStub) -> None:
    stub.refuse_connections(60)
    config = provider_config(stub, backoff_initial_s=0.02, backoff_max_s=0.16, backoff_jitter=0.5)
    async with running(config):
        await stub.wait_for(lambda: len(stub.rejections) >= 20, timeout=20, what="20 refusals")
        stub.refuse_connections(0)
        await stub.wait_connected(PID)
        times = [r.time for r in stub.rejections[:20]]
        d = gaps(times)
        assert d[0] < d[2] < d[4], d  # growth: 0.02, 0.04 ... 0.16
        at_cap = d[6:]
        assert all(0.16 <= x <= 0.16 * 1.5 + 0.1 for x in at_cap), at_cap  # cap (+ jitter)
        assert statistics.pstdev(at_cap) > 0.005, at_cap  # jitter at the cap


async def test_accept_then_close_loop_is_backed_off(stub: CoordinatorStub) -> None:
    stub.accept_then_close(True)
    config = provider_config(stub, backoff_initial_s=0.05, backoff_max_s=0.4)
    async with running(config):
        await stub.wait_for(lambda: len(stub.rejections) >= 8, timeout=10, what="8 closes")
        d = gaps([r.time for r in stub.rejections[:8]])
        assert d[0] < d[3] and min(d[4:]) >= 0.35, d
        attempts_per_s = 8 / (stub.rejections[7].time - stub.rejections[0].time)
        assert attempts_per_s < 10
        stub.accept_then_close(False)
        await stub.wait_provider_state(PID, "ready")


async def test_stalled_reads_are_detected_and_reconnected() -> None:
    async with CoordinatorStub(stub_config(so_rcvbuf=4096)) as stub:
        engine = ScriptedEngine(tokens=100_000, step_s=0.0005, words=("x" * 4000,))
        config = provider_config(stub, send_timeout_s=1.0)
        async with running(config, engine) as run:
            await stub.wait_provider_state(PID, "ready")
            first = stub.session(PID)
            buyer = asyncio.create_task(buy(stub, body("flood", stream=True)))
            await stub.wait_frame(PID, "inference_response_chunk", where=not_warm_up)
            stub.stall_reads(PID)
            await stub.wait_for(
                lambda: stub.session(PID) not in (None, first) and stub.state(PID) == "ready",
                timeout=30,
                what="a new registered session",
            )
            assert run.agent.reconnects[-1]["cause"] in ("send_timeout", "watchdog")
            assert run.agent.state.in_flight == 0  # the flooding job was cancelled, slot freed
            buyer.cancel()
            await asyncio.gather(buyer, return_exceptions=True)


async def test_coordinator_drain_finishes_jobs_then_reconnects(
    stub: CoordinatorStub, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    # A coordinator drain is not a shutdown: drain, close, come back after a pause.
    monkeypatch.setattr(agent_module, "COORDINATOR_DRAIN_RECONNECT_S", 0.3)
    engine = ScriptedEngine(tokens=40, step_s=0.025)
    config = provider_config(stub, max_concurrency=2, protocol=protocol)
    async with running(config, engine) as run:
        await stub.wait_provider_state(PID, "ready")
        jobs = [asyncio.create_task(buy(stub, body(f"job {i}"))) for i in range(2)]
        await stub.wait_for(lambda: run.agent.state.in_flight == 2, what="two jobs running")
        await stub.drain(PID)
        results = await asyncio.gather(*jobs)
        assert [status for status, _ in results] == [200, 200]
        assert all(c["usage"]["completion_tokens"] == 40 for _, c in results)
        phases = [drain_phase(f) for f in stub.frames_received(PID, "drain_status")]
        assert phases[0] == "starting" and phases[-1] == "complete"
        await stub.wait_for(lambda: registrations(stub) == 2, what="a new registration")
        await stub.wait_provider_state(PID, "ready")
        assert not run.task.done() and run.agent.state.state == "ready"
        assert await run.stop() == 0  # a signal's drain is what ends the process


async def test_drain_status_passes_the_coordinator_rules(stub: CoordinatorStub) -> None:
    async with running(provider_config(stub), ScriptedEngine(tokens=2)):
        await stub.wait_provider_state(PID, "ready")
        await stub.drain(PID)
        await stub.wait_for(
            lambda: (
                [drain_phase(f) for f in stub.frames_received(PID, "drain_status")][-1:]
                == ["complete"]
            ),
            what="the drain completed",
        )
        frames = stub.frames_received(PID, "drain_status")
        assert frames and [f.error for f in frames] == [None] * len(frames)


async def test_heartbeat_passes_the_coordinator_rules(stub: CoordinatorStub) -> None:
    async with running(provider_config(stub), ScriptedEngine()):
        await stub.wait_provider_state(PID, "ready")
        frame = await stub.wait_frame(PID, "heartbeat", timeout=10)
        assert frame.error is None


async def test_tokenless_upgrade_has_no_authorization_header(stub: CoordinatorStub) -> None:
    async with running(provider_config(stub, provider_token=None), ScriptedEngine()):
        await stub.wait_provider_state(PID, "ready")
        session = stub.session(PID)
        assert session is not None
        header = session.conn.request.headers.get("Authorization")
        assert header is None or (header.startswith("Bearer ") and header[7:].strip())


async def test_drain_timeout_cancels_what_is_left(
    stub: CoordinatorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "COORDINATOR_DRAIN_RECONNECT_S", 30.0)
    engine = ScriptedEngine(tokens=100_000, step_s=0.01)
    async with running(provider_config(stub, drain_timeout_s=0.5), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        job = asyncio.create_task(buy(stub, body("long")))
        await stub.wait_for(lambda: run.agent.state.in_flight == 1, what="job running")
        await stub.drain(PID)
        await stub.wait_for(
            lambda: (
                [drain_phase(f) for f in stub.frames_received(PID, "drain_status")][-1:]
                == ["timeout_skipped"]
            ),
            what="the drain timed out",
        )
        await until(lambda: run.agent.session is None, timeout=15, what="the session closed")
        ends = stub.frames_received(PID, "inference_response_end")
        assert ends[-1].message.status == "cancelled"
        assert ends[-1].message.usage.completion_tokens > 0  # partial usage
        # Waiting out the pause before reconnecting; a signal ends it at once.
        assert not run.task.done()
        assert await run.stop() == 0
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def test_sigterm_drains_in_flight_job_and_exits_0(stub: CoordinatorStub) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.session.scripted_provider", stub.ws_url, "60", "0.02",
        cwd=Path(__file__).parents[2], stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await stub.wait_provider_state("prov-sub", "ready", timeout=20)
        job = asyncio.create_task(buy(stub, body("before the signal")))
        await stub.wait_frame("prov-sub", "inference_response_chunk", where=not_warm_up, timeout=10)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        status, completion = await job
        assert code == 0
        assert status == 200 and completion["usage"]["completion_tokens"] == 60
        phases = [drain_phase(f) for f in stub.frames_received("prov-sub", "drain_status")]
        assert phases[-1] == "complete"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cancel_for_unknown_request_is_ignored_on_the_encrypted_leg(
    stub: CoordinatorStub,
) -> None:
    # An end frame for a request the coordinator does not hold would close
    # the tier-2 session (Go's closeProviderForTier2AEADFailure).
    async with running(provider_config(stub)):
        await stub.wait_provider_state(PID, "ready")
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"ghost","reason":"x"}')
        await stub.send_raw(PID, '{"type":"preflight","request_id":"mark","estimated_tokens":1}')
        await stub.wait_frame(PID, "preflight_ack")
        ends = stub.frames_received(PID, "inference_response_end")
        assert [f for f in ends if f.message.request_id == "ghost"] == []
        assert stub.drops == [] and stub.state(PID) == "ready"


async def test_cancel_for_unknown_request_gets_one_cancelled_end(stub: CoordinatorStub) -> None:
    async with running(provider_config(stub, protocol="v1")):
        await stub.wait_provider_state(PID, "ready")
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"ghost","reason":"x"}')
        end = await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "ghost"
        )
        assert end.message.status == "cancelled"
        assert (end.message.usage.prompt_tokens, end.message.usage.completion_tokens) == (0, 0)
        # A second cancel for the same id is not answered again.
        await stub.send_raw(PID, '{"type":"cancel_request","request_id":"ghost"}')
        await stub.send_raw(PID, '{"type":"preflight","request_id":"mark","estimated_tokens":1}')
        await stub.wait_frame(PID, "preflight_ack")
        ghosts = [
            f
            for f in stub.frames_received(PID, "inference_response_end")
            if f.message.request_id == "ghost"
        ]
        assert len(ghosts) == 1


async def test_cancel_mid_stream_frees_slot_with_partial_usage(
    stub: CoordinatorStub, protocol: str
) -> None:
    engine = ScriptedEngine(tokens=100_000, step_s=0.005)
    async with running(provider_config(stub, protocol=protocol), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        buyer = asyncio.create_task(buy(stub, body("stream", stream=True)))
        chunk = await stub.wait_frame(PID, "inference_response_chunk", where=not_warm_up)
        request_id = chunk.message.request_id
        assert await stub.cancel(request_id, "buyer_disconnected")
        end = await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == request_id
        )
        assert end.message.status == "cancelled" and end.message.usage.completion_tokens > 0
        assert end.message.chunks_sent >= 1
        await stub.wait_provider_state(PID, "ready")
        assert run.agent.state.in_flight == 0
        buyer.cancel()
        await asyncio.gather(buyer, return_exceptions=True)


async def test_duplicate_request_id_is_nakked(stub: CoordinatorStub, protocol: str) -> None:
    engine = ScriptedEngine(tokens=200, step_s=0.01)
    async with running(provider_config(stub, max_concurrency=2, protocol=protocol), engine):
        await stub.wait_provider_state(PID, "ready")
        request = json.dumps(body("x", max_tokens=3))
        await stub.send_request(PID, request, request_id="dup")
        await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "dup"
        )
        # The same id again after its end: refused by name, nothing runs twice.
        await stub.send_request(PID, request, request_id="dup")
        nak = await stub.wait_frame(PID, "nak")
        assert nak.message.error.code == "duplicate_request_id"
        assert nak.message.in_reply_to == "dup"
        ends = [
            f
            for f in stub.frames_received(PID, "inference_response_end")
            if f.message.request_id == "dup"
        ]
        assert len(ends) == 1 and ends[0].message.status == "complete"


async def test_full_provider_answers_queue_full(stub: CoordinatorStub, protocol: str) -> None:
    engine = ScriptedEngine(tokens=100_000, step_s=0.01)
    async with running(provider_config(stub, protocol=protocol), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        long = asyncio.create_task(buy(stub, body("long")))
        await stub.wait_for(lambda: run.agent.state.in_flight == 1, what="job running")
        await stub.send_request(PID, json.dumps(body("x")), request_id="extra")
        end = await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "extra"
        )
        assert end.message.status == "error_queue_full" and end.message.retryable
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)


def write_config(path: Path, **values: str) -> Path:
    path.write_text("".join(f'{key} = "{value}"\n' for key, value in values.items()))
    os.chmod(path, 0o600)
    return path


async def test_assigned_token_is_persisted_before_use(tmp_path: Path, protocol: str) -> None:
    first_token = "ptok_first_0123456789"
    async with CoordinatorStub(
        stub_config(tokens=(first_token,), issue_provider_token=True)
    ) as stub:
        cfg_file = write_config(
            tmp_path / "config.toml", coordinator_url=stub.ws_url, provider_token=first_token
        )
        config, path = load_config(
            cfg_file,
            overrides={"model": "scripted", "provider_id": PID, "status_port": 0,
                       "protocol": protocol},
        )  # fmt: skip
        async with running(config, config_path=path) as run:
            await stub.wait_provider_state(PID, "ready")
            ack_type = {"v1": "hello_ack", "v2": "auth_response"}[protocol]
            assigned = stub.frames_sent(PID, ack_type)[0].message.assigned_provider_token
            assert assigned and assigned in cfg_file.read_text()
            assert run.agent.token == assigned
            # This session is routable already: the token is for the next one.
            assert registrations(stub) == 1
            first = stub.session(PID)
            stub.drop(PID)
            await stub.wait_for(
                lambda: stub.session(PID) not in (None, first), what="reconnected with new token"
            )
            assert stub.rejections == []


async def test_self_minted_token_is_persisted_then_used_to_reconnect(
    tmp_path: Path, protocol: str
) -> None:
    # Tokenless admission (production allows it): admitted, not routable; the
    # provider persists the minted token and reconnects with it as a Bearer.
    gates = {"require_provider_tokens": True, "allow_tokenless_provisional_bootstrap": True}
    async with CoordinatorStub(stub_config(**gates)) as stub:
        cfg_file = write_config(tmp_path / "config.toml", coordinator_url=stub.ws_url)
        config, path = load_config(
            cfg_file,
            overrides={"model": "scripted", "provider_id": PID, "status_port": 0,
                       "protocol": protocol, "catalog_feed_url": "off"},
        )  # fmt: skip
        async with running(config, config_path=path) as run:
            unrouted = await stub.wait_for(
                lambda: next(
                    (p for p in stub.status()["providers"]
                     if "auth_state:self_minted" in p["not_routable_reasons"]),
                    None,
                ),
                what="the self-minted session, not routable",
            )  # fmt: skip
            assert not unrouted["routable"]
            await stub.wait_for(lambda: registrations(stub) == 2, what="the Bearer session")
            await stub.wait_provider_state(PID, "ready")
            record = stub.provider(PID)
            assert record is not None and record.auth_state == "bearer_validated"
            ack_type = {"v1": "hello_ack", "v2": "auth_response"}[protocol]
            first, second = (f.message for f in stub.frames_sent(PID, ack_type))
            assert first.auth_state == "self_minted" and first.assigned_provider_token
            assert second.auth_state == "bearer_validated"
            assert run.agent.token == first.assigned_provider_token
            assert f'provider_token = "{run.agent.token}"' in cfg_file.read_text()
            assert cfg_file.stat().st_mode & 0o777 == 0o600
            header = stub.session(PID).conn.request.headers["Authorization"]  # type: ignore[union-attr]
            assert header == f"Bearer {run.agent.token}"
            status, completion = await buy(stub, body("after the upgrade"))
            assert status == 200 and completion["choices"][0]["message"]["content"]
            assert stub.rejections == []


async def test_an_assigned_token_too_short_to_redact_is_not_adopted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from provider.agent import Agent

    cfg_file = tmp_path / "config.toml"
    agent = Agent(provider_config("ws://127.0.0.1:9/ws/provider"), ScriptedEngine(),
                  config_path=cfg_file)  # fmt: skip
    agent.adopt_token("short")
    assert agent.token == "tok" and not cfg_file.exists()
    assert "ignoring the provider token assigned by the coordinator: 5 characters" in caplog.text
    assert "short" not in caplog.text.replace("too short", "")
    agent.adopt_token("ptok_" + "a" * 32)
    assert agent.token == "ptok_" + "a" * 32 and agent.token in cfg_file.read_text()


async def test_fatal_close_code_stops_the_agent() -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def banned(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.close(4009, "banned for testing")

    async with serve(banned, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config, _ = load_config(
            None,
            overrides={"coordinator_url": f"ws://127.0.0.1:{port}/ws/provider", "model": "m",
                       "provider_id": PID, "status_port": 0},
        )  # fmt: skip
        async with running(config) as run:
            assert await asyncio.wait_for(run.task, 30) == 0
            assert "4009" in run.agent.exit_reason and "banned" in run.agent.exit_reason


async def test_connects_while_loading_and_passes_the_gate_once_loaded() -> None:
    # The stub's warm-up arrives while the model loads and fails with
    # error_model_not_loaded; the provider's "ready" must bring the retry,
    # not the stub's 10 s pause.
    async with CoordinatorStub(stub_config(warmup_retry_s=10.0)) as stub:
        async with running(provider_config(stub), ScriptedEngine(load_s=0.5)):
            await stub.wait_connected(PID)
            hello = registration(stub)
            assert hello.model_params_b == 0 and hello.throughput_tps_estimate == 0
            beat = await stub.wait_frame(PID, "heartbeat")
            assert beat.message.loading is True and beat.message.status == "degraded"
            t0 = time.monotonic()
            await stub.wait_provider_state(PID, "ready", timeout=5)
            assert time.monotonic() - t0 < 3
            ends = stub.frames_received(PID, "inference_response_end")
            assert ends[0].message.status == "error_model_not_loaded" and ends[0].message.retryable
            later = await stub.wait_frame(PID, "heartbeat", where=lambda f: not f.message.loading)
            assert later.message.throughput_tps_estimate > 0


async def test_a_bug_in_a_session_costs_a_reconnect_not_the_process(
    stub: CoordinatorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provider.agent import Agent

    real = Agent.heartbeat_message
    calls = {"n": 0}

    def flaky(self: Agent) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("bug in heartbeat building")
        return real(self)

    monkeypatch.setattr(Agent, "heartbeat_message", flaky)
    async with running(provider_config(stub)) as run:
        await stub.wait_for(lambda: registrations(stub) >= 2, what="a second registration")
        await stub.wait_provider_state(PID, "ready")
        assert not run.task.done()
        assert run.agent.reconnects[0]["cause"] == "internal_error"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_slot_is_freed_before_the_end_frame(stub: CoordinatorStub, stream: bool) -> None:
    # The coordinator routes on the slots_free we report and answers the buyer
    # when it reads the end frame: a buyer who asks again at once must find
    # the one slot free, so the state_update comes first.
    async with running(provider_config(stub, max_concurrency=1), ScriptedEngine(tokens=3)):
        await stub.wait_provider_state(PID, "ready")
        for n in range(3):
            status, _ = await buy(stub, body(f"turn {n}", stream=stream))
            assert status == 200
        frames = [
            f
            for f in stub.frames_received(PID)
            if f.type in ("state_update", "inference_response_end")
            and (f.type == "state_update" or not_warm_up(f))
        ]
        ends = [i for i, f in enumerate(frames) if f.type == "inference_response_end"]
        assert len(ends) == 3
        for i in ends:
            before = frames[i - 1]
            assert before.type == "state_update", [f.type for f in frames]
            assert before.message.state == "ready"
            assert before.message.metrics_snapshot.slots_free == 1
