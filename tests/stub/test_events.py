"""``/v1/events``: atomic snapshot, bounded lossy subscribers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp

from coordinator_stub.events import EventBus

from .conftest import ProviderFactory, StubFactory


async def _next_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line, "event stream ended"
        if line.startswith(b"data: "):
            return json.loads(line[6:])


async def test_snapshot_first_then_every_event_in_order(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub()
    await make_provider(stub, "p0")
    await stub.wait_provider_state("p0", "ready")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stub.http_url}/v1/events") as resp:
            assert resp.content_type == "text/event-stream"
            snapshot = await _next_event(resp)
            assert snapshot["type"] == "snapshot"
            assert [p["provider_id"] for p in snapshot["pool"]["providers"]] == ["p0"]
            assert snapshot["pool"]["providers"][0]["state"] == "ready"

            await make_provider(stub, "p1")
            events = [await _next_event(resp)]
            while not (events[-1]["type"] == "state_changed" and events[-1]["to"] == "ready"):
                events.append(await _next_event(resp))
    types = [e["type"] for e in events]
    assert types[0] == "provider_joined" and events[0]["provider_id"] == "p1"
    assert "request_routed" in types and "request_finished" in types
    # Nothing fell between the snapshot and the first event.
    assert [e["seq"] for e in events] == list(
        range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(events))
    )


def test_full_subscriber_loses_events_and_gets_a_notice_in_place():
    bus = EventBus(queue_size=3)
    subscriber, snapshot = bus.subscribe(lambda: {"providers": []})
    assert snapshot["seq"] == 0
    for i in range(10):
        bus.publish({"type": "tick", "i": i})
    assert subscriber.queued == 3 and subscriber.dropped_total == 7

    async def drain() -> list[dict[str, Any]]:
        got = []
        for _ in range(4):
            event = await subscriber.get()
            assert event is not None
            got.append(event)
        return got

    got = asyncio.run(drain())
    assert [e.get("i") for e in got[:3]] == [0, 1, 2]
    assert got[3] == {"type": "dropped", "count": 7}
    bus.publish({"type": "tick", "i": 10})
    assert subscriber.queued == 1
    bus.close()
    assert subscriber.closed


def test_notice_precedes_later_events():
    bus = EventBus(queue_size=2)
    subscriber, _ = bus.subscribe(dict)
    for i in range(4):
        bus.publish({"type": "tick", "i": i})

    async def run() -> list[dict[str, Any]]:
        first = await subscriber.get()
        bus.publish({"type": "tick", "i": 4})  # room for the notice only
        bus.publish({"type": "tick", "i": 5})
        rest = [await subscriber.get() for _ in range(2)]
        bus.publish({"type": "tick", "i": 6})
        rest += [await subscriber.get() for _ in range(2)]
        return [first, *rest]  # type: ignore[list-item]

    got = asyncio.run(run())
    assert [e.get("i", e["type"]) for e in got] == [0, 1, "dropped", "dropped", 6]
    assert got[2]["count"] == 2 and got[3]["count"] == 2


async def test_slow_subscriber_does_not_slow_the_stub(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(events_queue_size=16)
    await make_provider(stub)
    await stub.wait_provider_state("p1", "ready")

    # A subscriber that never reads, with a tiny receive buffer.
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", stub.http_port))
    slow.sendall(b"GET /v1/events HTTP/1.1\r\nHost: stub\r\n\r\n")
    try:
        await stub.wait_for(lambda: len(stub.bus.subscribers()) == 1, what="subscriber")
        (subscriber,) = stub.bus.subscribers()
        body = {"model": "test-model", "messages": [{"role": "user", "content": "x" * 400}]}
        latencies: list[float] = []
        async with aiohttp.ClientSession() as http:

            async def call() -> None:
                start = time.monotonic()
                async with http.post(f"{stub.http_url}/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()
                latencies.append(time.monotonic() - start)

            deadline = time.monotonic() + 20
            while subscriber.dropped_total == 0 and time.monotonic() < deadline:
                await asyncio.gather(*(call() for _ in range(4)))  # the slots
        assert subscriber.dropped_total > 0
        assert subscriber.queued <= 16
        assert max(latencies) < 1.0, max(latencies)
        status = stub.status()
        assert status["event_subscribers"][0]["dropped_total"] == subscriber.dropped_total
    finally:
        slow.close()
