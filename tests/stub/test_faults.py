"""Fault knobs: drop, stall_reads, refuse_connections, accept_then_close, delay, duplicate."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.exceptions import InvalidStatus

from coordinator_stub import CoordinatorStub

from .conftest import ProviderFactory, StubFactory
from .scripted import ScriptedProvider


async def test_drop_aborts_without_close_frame(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
):
    assert stub.drop("p1")
    await asyncio.wait_for(ready_provider.closed.wait(), 5)
    assert ready_provider.ws is not None and ready_provider.ws.close_code == 1006
    drop = await stub.wait_drop("p1")
    assert drop.cause == "fault_drop"
    assert stub.state("p1") == "unavailable"
    assert not stub.drop("p1")  # no session any more


async def test_stall_reads_blocks_the_provider_both_ways(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(so_rcvbuf=4096, inactivity_s=0.5)
    provider = await make_provider(stub, heartbeat_s=0.1)
    await stub.wait_provider_state("p1", "ready")
    assert provider.ws is not None
    await stub.wait_frame("p1", "heartbeat")
    stub.stall_reads("p1")
    heartbeats = len(stub.frames_received("p1", "heartbeat"))
    warm_up = asyncio.create_task(stub.warm_up("p1"))  # held by the stall

    # The provider's sends stop completing once the buffers are full.
    blocked = None
    for _ in range(200):
        send = asyncio.create_task(provider.ws.send(b"x" * 65536))
        done, _ = await asyncio.wait({send}, timeout=0.5)
        if not done:
            blocked = send
            break
    assert blocked is not None, "provider sends never blocked"
    # One frame may already have been read off the socket when it stalled.
    assert len(stub.frames_received("p1", "heartbeat")) <= heartbeats + 1
    assert not warm_up.done() and provider.messages("warm_up") == []
    # A hung coordinator does not run its inactivity timer either.
    await asyncio.sleep(0.3)  # the stall now outlasts inactivity_s
    assert stub.drops == []

    stub.stall_reads("p1", False)
    await asyncio.wait_for(blocked, 5)
    await asyncio.wait_for(warm_up, 5)
    await provider.wait_message("warm_up")
    await stub.wait_frame("p1", "heartbeat", since=time.monotonic())
    assert stub.drops == [] and stub.state("p1") == "ready"


async def test_refuse_connections_with_503(stub: CoordinatorStub, ready_provider: ScriptedProvider):
    stub.refuse_connections(0.3)
    start = time.monotonic()
    with pytest.raises(InvalidStatus) as info:
        await ScriptedProvider(stub.ws_url, "p2").connect()
    assert info.value.response.status_code == 503
    assert info.value.response.headers["Retry-After"] == "1"
    assert stub.rejections[-1].code == 503
    await asyncio.sleep(0.3 - (time.monotonic() - start))
    later = ScriptedProvider(stub.ws_url, "p2")
    await later.start()
    await later.close()
    # The open session was not touched.
    assert stub.state("p1") == "ready" and not ready_provider.closed.is_set()


async def test_refuse_connections_by_unlistening(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
):
    stub.refuse_connections(0.3, mode="unlisten")
    assert not stub.ws.listening
    with pytest.raises(ConnectionRefusedError):
        await ScriptedProvider(stub.ws_url, "p2").connect()
    await stub.wait_for(lambda: stub.ws.listening, what="listening again")
    later = ScriptedProvider(stub.ws_url, "p2")
    await later.start()
    await later.close()
    assert stub.state("p1") == "ready" and not ready_provider.closed.is_set()


async def test_accept_then_close(stub: CoordinatorStub, make_provider: ProviderFactory):
    stub.accept_then_close(1)
    first = await make_provider(stub, start=False)
    ws = await first.connect(send_hello=False)  # the handshake itself succeeds
    await asyncio.wait_for(first.closed.wait(), 5)
    assert (ws.close_code, ws.close_reason) == (1013, "try again later")
    assert stub.rejections[-1].code == 1013
    second = await make_provider(stub)  # only one connection was affected
    assert second.hello_ack is not None

    stub.accept_then_close(True, code=4429, reason="pool full")
    for _ in range(2):
        provider = await make_provider(stub, "px", start=False)
        ws = await provider.connect(send_hello=False)
        await asyncio.wait_for(provider.closed.wait(), 5)
        assert ws.close_code == 4429
    assert [r.code for r in stub.rejections] == [1013, 4429, 4429]
    stub.accept_then_close(False)
    assert (await make_provider(stub, "p3")).hello_ack is not None


async def test_delay_frames(stub: CoordinatorStub, make_provider: ProviderFactory):
    stub.delay_frames(0.3)
    provider = await make_provider(stub, start=False)
    start = time.monotonic()
    await provider.start()
    arrived = provider.received[0][0]
    assert arrived - start >= 0.3
    stub.delay_frames(0)
    before = time.monotonic()
    await stub.warm_up("p1")
    assert time.monotonic() - before < 0.2


async def test_duplicate_frames(stub: CoordinatorStub, make_provider: ProviderFactory):
    stub.duplicate_frames(True)
    provider = await make_provider(stub)
    await provider.wait_for(lambda: len(provider.messages("hello_ack")) == 2)
    assert [f.type for f in stub.frames_sent("p1")][:2] == ["hello_ack", "hello_ack"]
    stub.reset_faults()
    assert stub.faults.duplicate is False
