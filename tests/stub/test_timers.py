"""The real coordinator's hostile timers, shrunk: write deadline, liveness, probe."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .conftest import ProviderFactory, StubFactory
from .scripted import small_rcvbuf_socket


async def test_ping_after_write_deadline_is_dropped(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(write_deadline_s=0.5, warmup_gate=False)
    provider = await make_provider(stub, heartbeat_s=None)
    assert provider.ws is not None
    # Within the deadline a ping is answered.
    pong = await provider.ws.ping()
    await asyncio.wait_for(pong, 2)
    last_write = stub.frames_sent("p1")[-1].time
    await asyncio.sleep(0.6 - (time.monotonic() - last_write))
    await provider.ws.ping()
    drop = await stub.wait_drop("p1", timeout=3)
    assert drop.cause == "write_deadline_pong"
    assert drop.time - last_write > 0.5
    await asyncio.wait_for(provider.closed.wait(), 3)
    # Aborted, not closed: the provider never got a close frame.
    assert provider.ws.close_code in (None, 1006)
    assert stub.state("p1") == "unavailable"


async def test_text_write_rearms_the_deadline(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(write_deadline_s=0.5, warmup_gate=False)
    provider = await make_provider(stub, heartbeat_s=None)
    assert provider.ws is not None
    await asyncio.sleep(0.4)
    await stub.warm_up("p1")  # a text write: deadline now +0.5 s
    await asyncio.sleep(0.3)  # 0.7 s after hello_ack, 0.3 s after warm_up
    await asyncio.wait_for(await provider.ws.ping(), 2)
    assert stub.drops == []


async def test_write_deadline_can_be_disabled(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(write_deadline_s=None, warmup_gate=False)
    provider = await make_provider(stub, heartbeat_s=None)
    assert provider.ws is not None
    await asyncio.sleep(0.1)
    stub.provider("p1")  # nothing to wait for: the deadline is off
    await asyncio.wait_for(await provider.ws.ping(), 2)
    assert stub.session("p1").conn.write_deadline is None  # type: ignore[union-attr]
    assert stub.drops == []


async def test_heartbeat_only_provider_survives_many_deadlines(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    # Proportional to 60 s against the real 10 s deadline / 90 s inactivity.
    stub = await make_stub(write_deadline_s=0.5, inactivity_s=1.5)
    provider = await make_provider(stub, heartbeat_s=0.25)
    await stub.wait_provider_state("p1", "ready")
    start = time.monotonic()
    await asyncio.sleep(3.0)
    assert stub.drops == []
    record = stub.provider("p1")
    assert record is not None and record.connected and record.state == "ready"
    assert len(stub.frames_received("p1", "heartbeat")) >= 10
    # The stub wrote nothing for most of that time: the deadline had long passed.
    session = stub.session("p1")
    assert session is not None and session.conn.write_deadline is not None
    assert session.conn.write_deadline < start + 1.0
    assert not provider.closed.is_set()


async def test_only_text_frames_count_as_liveness(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(inactivity_s=0.6, write_deadline_s=None, warmup_gate=False)
    provider = await make_provider(stub, heartbeat_s=None)
    assert provider.ws is not None
    ws = provider.ws

    async def chatter() -> None:
        while True:
            await ws.send(b'{"type": "heartbeat"}')  # binary: not liveness
            await ws.ping()  # control: not liveness
            await ws.send("not json")  # malformed text: not liveness
            await asyncio.sleep(0.05)

    task = asyncio.create_task(chatter())
    try:
        drop = await stub.wait_drop("p1", timeout=3)
    finally:
        task.cancel()
    assert drop.cause == "inactivity"
    assert len(stub.frames_received("p1", "<binary>")) >= 5
    assert len(stub.frames_received("p1", "<invalid>")) >= 5


async def test_inactivity_drop_then_grace_removal(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(inactivity_s=0.3, grace_s=0.2)
    await make_provider(stub, heartbeat_s=None)
    drop = await stub.wait_drop("p1", timeout=3)
    assert drop.cause == "inactivity"
    removal = await stub.wait_removed("p1", timeout=3)
    assert removal.cause == "grace_expired"
    causes = [(d.provider_id, d.cause) for d in stub.drops]
    assert causes == [("p1", "inactivity")]


async def test_write_probe_failure_drops_session(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(probe_timeout_s=0.3, warmup_gate=False, so_sndbuf=8192)
    provider = await make_provider(stub, sock=small_rcvbuf_socket(stub.ws_port))
    assert provider.ws is not None
    # A provider that stops reading: the stub's write of a large request
    # cannot finish.
    provider.ws.transport.pause_reading()
    body = {
        "model": "test-model",
        "messages": [{"role": "user", "content": "x" * 1_500_000}],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stub.http_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert error["code"] == "probe_failed"
    drop = await stub.wait_drop("p1")
    assert drop.cause == "probe_failed"
    assert stub.pool.requests_finished["probe_failed"] == 1
