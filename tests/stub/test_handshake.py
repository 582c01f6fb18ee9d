"""Registration, warm-up gate, provider state rules and close codes."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from coordinator_stub import CoordinatorStub
from coordinator_stub.frames import close_reason
from provider.coordinator.messages import (
    MAX_FRAME_BYTES,
    HelloAck,
    InferenceRequest,
    Nak,
    NakError,
    PreflightAck,
    encode,
    encode_text,
)

from .conftest import ProviderFactory, StubFactory
from .scripted import ScriptedProvider, is_warmup, make_hello


async def _closed(ws: object, timeout: float = 5.0) -> ConnectionClosed:
    """Receive until the connection closes; return the ConnectionClosed."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()  # type: ignore[attr-defined]
    except ConnectionClosed as exc:
        return exc
    raise AssertionError("unreachable")


async def _raw(stub: CoordinatorStub, token: str | None = "tok") -> object:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await connect(stub.ws_url, additional_headers=headers, ping_interval=None, proxy=None)


async def test_hello_ack_then_warmup_gate(stub: CoordinatorStub, make_provider: ProviderFactory):
    provider = await make_provider(stub, answer_warmup=False)
    ack = provider.hello_ack
    assert isinstance(ack, HelloAck)
    # Go assigns a session UUID, not the provider id.
    assert ack.coordinator_version == 1 and uuid.UUID(ack.assigned_id)
    assert (ack.heartbeat_interval_s, ack.tier) == (30, "standard")
    assert ack.assigned_provider_token is None

    # Behind the gate until the stub's own 2-token request completes.
    warmup = await provider.wait_message("inference_request")
    assert isinstance(warmup, InferenceRequest) and is_warmup(warmup)
    assert warmup.stream is False
    assert msgspec.json.decode(warmup.body) == {
        "messages": [{"role": "user", "content": "Reply with ok."}],
        "max_tokens": 2,
        "stream": False,
    }
    await provider.wait_message("hello_ack")
    assert stub.state("p1") == "degraded"
    # A provider claiming ready does not lift the gate.
    await provider.send(provider.state_update("ready"))
    await stub.wait_frame("p1", "state_update")
    assert stub.state("p1") == "degraded"

    provider.release()
    record = await stub.wait_provider_state("p1", "ready")
    assert record.warmed and stub.pool.warmups["passed"] == 1
    assert [f.type for f in stub.frames_sent("p1")][:2] == ["hello_ack", "inference_request"]


async def test_failed_warmup_stays_degraded_and_retries(
    stub: CoordinatorStub, make_provider: ProviderFactory
):
    provider = await make_provider(stub, warmup_tokens=0)
    await stub.wait_for(lambda: stub.pool.warmups["complete"] >= 2, what="two warm-ups")
    assert stub.state("p1") == "degraded"
    provider.warmup_tokens = 2
    await stub.wait_provider_state("p1", "ready")
    assert len([r for r in provider.messages("inference_request") if is_warmup(r)]) >= 3


async def test_gate_disabled_is_ready_at_once(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(warmup_gate=False, heartbeat_interval_s=5, tier="gold")
    provider = await make_provider(stub)
    assert stub.state("p1") == "ready"
    assert provider.hello_ack is not None
    assert (provider.hello_ack.heartbeat_interval_s, provider.hello_ack.tier) == (5, "gold")
    assert provider.messages("inference_request") == []


async def test_provider_states_and_no_way_back_from_unavailable(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
):
    await ready_provider.send(ready_provider.state_update("busy"))
    await stub.wait_provider_state("p1", "busy")
    await ready_provider.send(ready_provider.state_update("draining"))
    await stub.wait_provider_state("p1", "draining")
    await ready_provider.send(ready_provider.state_update("ready"))
    await stub.wait_provider_state("p1", "ready")
    await ready_provider.send(ready_provider.state_update("unavailable"))
    await stub.wait_provider_state("p1", "unavailable")
    await ready_provider.send(ready_provider.state_update("ready"))
    record = await stub.wait_for(
        lambda: (r := stub.provider("p1")) is not None and r.refused_state_updates == 1 and r,
        what="refused state update",
    )
    assert record.state == "unavailable"


async def test_reconnect_replaces_session(stub: CoordinatorStub, make_provider: ProviderFactory):
    first = await make_provider(stub)
    await stub.wait_provider_state("p1", "ready")
    second = await make_provider(stub)
    drop = await stub.wait_drop("p1", "replaced")
    assert drop.session_id == 1
    await asyncio.wait_for(first.closed.wait(), 5)
    record = await stub.wait_provider_state("p1", "ready")
    assert record.session_id == 2 and record.connected
    assert second.hello_ack is not None


async def test_grace_then_removal_and_reregistration(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(grace_s=0.3)
    provider = await make_provider(stub)
    await stub.wait_provider_state("p1", "ready")
    await provider.close()
    drop = await stub.wait_drop("p1")
    assert drop.cause == "provider_closed" and "code=1000" in drop.detail
    assert stub.state("p1") == "unavailable"
    removal = await stub.wait_removed("p1")
    assert removal.cause == "grace_expired"
    assert removal.time - drop.time >= 0.29
    assert stub.provider("p1") is None

    # Within grace, reconnecting re-registers (and re-runs the gate).
    again = await make_provider(stub)
    await stub.wait_provider_state("p1", "ready")
    assert stub.drop("p1")
    await stub.wait_provider_state("p1", "unavailable")
    await again.close()
    third = await make_provider(stub)
    await stub.wait_provider_state("p1", "ready")
    await asyncio.sleep(0.4)  # longer than the grace of the dropped session
    assert stub.provider("p1") is not None and stub.state("p1") == "ready"
    assert third.hello_ack is not None


async def test_bad_token_closes_4005(make_stub: StubFactory):
    stub = await make_stub(tokens=["good"])
    ws = await _raw(stub, token="bad")
    closed = await _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 4005
    assert closed.rcvd.reason
    ws = await _raw(stub, token=None)
    assert (await _closed(ws)).rcvd.code == 4005  # type: ignore[union-attr]
    assert [r.code for r in stub.rejections] == [4005, 4005]


async def test_issued_token_is_accepted(make_stub: StubFactory, make_provider: ProviderFactory):
    stub = await make_stub(tokens=["good"], issue_provider_token=True)
    first = await make_provider(stub, token="good")
    assert first.hello_ack is not None
    token = first.hello_ack.assigned_provider_token
    assert token and token.startswith("ptok_")
    await first.close()
    second = await make_provider(stub, "p2", token=token)
    assert second.hello_ack is not None


async def test_malformed_hello_closes_4001_with_reason(stub: CoordinatorStub):
    ws = await _raw(stub)
    await ws.send('{"type": "hello", "version": 1, "tier": 1, "provider_id": "p1"}')  # type: ignore[attr-defined]
    closed = await _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 4001
    # Go's reason: invalid_hello and the first bad field, in its parse order.
    assert closed.rcvd.reason == "invalid_hello: missing hostname"
    assert len(closed.rcvd.reason.encode()) <= 123


async def test_hello_without_version_closes_4000(stub: CoordinatorStub):
    # Go dispatches the first message on (type, version): without a version
    # it is no hello at all, "unrecognized auth message" (4000).
    raw = msgspec.json.decode(encode(make_hello()))
    del raw["version"]
    ws = await _raw(stub)
    await ws.send(msgspec.json.encode(raw).decode())  # type: ignore[attr-defined]
    closed = await _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 4000
    assert closed.rcvd.reason == "unrecognized auth message"


async def test_hello_field_limit_closes_4001(stub: CoordinatorStub):
    raw = msgspec.json.decode(encode(make_hello()))
    raw["hostname"] = "h" * 300  # over the 253-byte limit
    ws = await _raw(stub)
    await ws.send(msgspec.json.encode(raw).decode())  # type: ignore[attr-defined]
    closed = await _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 4001
    assert "hostname" in closed.rcvd.reason


def test_close_reason_fits_a_close_frame():
    reason = close_reason("é" * 100)  # 200 bytes
    assert len(reason.encode()) <= 123 and reason == "é" * 61
    assert close_reason("short") == "short"


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ('{"type": "heartbeat"}', 4000),
        ("not json", 4000),
        (b"\x00binary", 4000),
        # Go routes only hello+1 and auth_request+2; hello version 2 is 4000.
        (encode_text(make_hello(version=2)), 4000),
    ],
)
async def test_first_frame_rules(stub: CoordinatorStub, first: str | bytes, code: int):
    ws = await _raw(stub)
    await ws.send(first)  # type: ignore[attr-defined]
    closed = await _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == code
    assert stub.rejections[-1].code == code


async def test_hello_timeout_closes_4001(make_stub: StubFactory):
    # The handshake read deadline is a read error in Go: 4001 "invalid_hello: read".
    stub = await make_stub(hello_timeout_s=0.2)
    ws = await _raw(stub)
    closed = await _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 4001
    assert closed.rcvd.reason == "invalid_hello: read"


async def test_other_paths_get_404(stub: CoordinatorStub):
    with pytest.raises(InvalidStatus) as info:
        await connect(stub.ws_url.replace("/ws/provider", "/ws/other"), proxy=None)
    assert info.value.response.status_code == 404


async def test_frame_over_limit_closes_1009(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
):
    assert ready_provider.ws is not None
    await ready_provider.ws.send("x" * (MAX_FRAME_BYTES + 1))
    await asyncio.wait_for(ready_provider.closed.wait(), 5)
    assert ready_provider.ws.close_code == 1009
    drop = await stub.wait_drop("p1")
    assert drop.cause == "frame_too_big"


async def test_frame_at_limit_is_accepted(stub: CoordinatorStub, ready_provider: ScriptedProvider):
    assert ready_provider.ws is not None
    await ready_provider.ws.send("x" * MAX_FRAME_BYTES)
    await stub.wait_frame("p1", "<invalid>")
    await ready_provider.send(ready_provider.heartbeat())
    await stub.wait_for(lambda: (stub.provider("p1") or False) and stub.provider("p1").heartbeats)
    assert stub.drops == []


async def test_wake_gap_sends_warm_up(make_stub: StubFactory, make_provider: ProviderFactory):
    stub = await make_stub(wake_gap_s=0.3)
    provider = await make_provider(stub, heartbeat_s=None)
    await stub.wait_provider_state("p1", "ready")
    await provider.send(provider.heartbeat())
    await stub.wait_frame("p1", "heartbeat")
    await provider.send(provider.heartbeat())  # short gap: nothing
    await asyncio.sleep(0.35)
    assert provider.messages("warm_up") == []
    await provider.send(provider.heartbeat())
    await provider.wait_message("warm_up")
    assert len(provider.messages("warm_up")) == 1


async def test_drain_preflight_nak_and_invalid_frames(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
):
    provider = ready_provider
    await stub.drain("p1")
    await provider.wait_message("drain")
    # Go's DrainStatus has int fields: the provider Struct's 0.0 would be dropped.
    await provider.send(
        {"type": "drain_status", "phase": "starting", "inflight_requests": 0,
         "estimated_drain_seconds": 0}
    )  # fmt: skip
    await stub.wait_frame("p1", "drain_status")
    assert stub.provider("p1").drain_status[0].phase == "starting"  # type: ignore[union-attr]

    async def answer_preflight() -> None:
        request = await provider.wait_message("preflight")
        await provider.send(
            PreflightAck(request_id=request.request_id, accepted=False, reason="queue_full")
        )

    task = asyncio.create_task(answer_preflight())
    ack = await stub.preflight("p1", estimated_tokens=100)
    await task
    assert (ack.accepted, ack.reason) == (False, "queue_full")
    assert provider.messages("preflight")[0].estimated_tokens == 100

    await provider.send(Nak(in_reply_to="bogus", error=NakError(code="x", message="y")))
    await stub.wait_frame("p1", "nak")
    assert provider.ws is not None
    await provider.ws.send('{"type": "bogus_type"}')
    await provider.ws.send('{"type": "heartbeat", "status": "ready"}')
    await stub.wait_for(lambda: stub.provider("p1").invalid_frames == 2)  # type: ignore[union-attr]
    record = stub.provider("p1")
    assert record is not None and len(record.naks) == 1 and record.connected

    await stub.send_raw("p1", '{"type": "surprise"}')
    await provider.wait_for(
        lambda: any(getattr(m, "type", "") == "surprise" for _, m in provider.received)
    )


async def test_admin_drain_endpoint(stub: CoordinatorStub, ready_provider: ScriptedProvider):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stub.http_url}/admin/providers/p1/drain") as resp:
            assert resp.status == 202
        async with http.post(f"{stub.http_url}/admin/providers/nope/drain") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
    await ready_provider.wait_message("drain")


async def test_frames_are_timestamped(stub: CoordinatorStub, ready_provider: ScriptedProvider):
    before = time.monotonic()
    await ready_provider.send(ready_provider.heartbeat())
    frame = await stub.wait_frame("p1", "heartbeat", since=before)
    assert before <= frame.time <= time.monotonic()
    assert frame.session_id == 1 and frame.direction == "in"
