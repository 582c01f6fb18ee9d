"""What the provider refuses, and why: every preflight reason, requests while
the model loads or while draining, and the request deadline (``provider_timeout``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from coordinator_stub.app import CoordinatorStub

from .conftest import PID, provider_config, running
from .scripted_engine import ScriptedEngine


def chat(content: str, *, stream: bool = False, max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def buy(stub: CoordinatorStub, payload: dict[str, Any]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stub.http_url}/v1/chat/completions", json=payload) as response,
    ):
        return response.status, await response.text()


async def send_request(stub: CoordinatorStub, request_id: str) -> None:
    """An ``inference_request`` the pool would not route now (sealed on the encrypted leg)."""
    await stub.send_request(PID, json.dumps(chat("hi", max_tokens=3)), request_id=request_id)


def is_buyer(frame: Any) -> bool:
    return not frame.message.request_id.startswith("warmup")


async def end_of(stub: CoordinatorStub, request_id: str) -> Any:
    frame = await stub.wait_frame(
        PID, "inference_response_end", where=lambda f: f.message.request_id == request_id
    )
    return frame.message


async def test_every_preflight_reason_then_a_drain_refuses_new_work(
    stub: CoordinatorStub,
) -> None:
    # One slot; the buyer's job runs ~4 s, long enough to look at the provider
    # busy and then draining, short enough for the drain to finish it.
    engine = ScriptedEngine(tokens=400, step_s=0.01, context_limit=4096)
    async with running(provider_config(stub, drain_timeout_s=60), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        ack = await stub.preflight(PID, 4096)
        assert (ack.accepted, ack.reason, ack.max_context_tokens) == (True, "", 4096)
        ack = await stub.preflight(PID, 4097)
        assert (ack.accepted, ack.reason) == (False, "context_exceeds_capacity")

        run.agent.set_degraded("warming_up")
        ack = await stub.preflight(PID, 10)
        assert (ack.accepted, ack.reason) == (False, "unhealthy")
        run.agent.clear_degraded("warming_up")

        job = asyncio.create_task(buy(stub, chat("long job", stream=True, max_tokens=400)))
        await stub.wait_frame(PID, "inference_response_chunk", where=is_buyer)
        ack = await stub.preflight(PID, 10)
        assert (ack.accepted, ack.reason) == (False, "queue_full")

        run.agent.request_drain("test")
        await stub.wait_frame(PID, "drain_status", where=lambda f: f.message.phase == "starting")
        ack = await stub.preflight(PID, 10)
        assert (ack.accepted, ack.reason) == (False, "draining")
        # A request that arrives anyway is refused at once, retryable, not queued.
        await send_request(stub, "late")
        late = await end_of(stub, "late")
        assert (late.status, late.retryable) == ("error_queue_full", True)
        assert late.error == "provider is draining; retry on another provider"
        assert late.usage.completion_tokens == 0

        code, text = await job  # the job in flight still finishes
        assert code == 200 and text.rstrip().endswith("data: [DONE]"), text[-300:]
        assert await asyncio.wait_for(run.task, 30) == 0
    [done] = [f.message for f in stub.frames_received(PID, "inference_response_end")
              if is_buyer(f) and f.message.request_id != "late"]  # fmt: skip
    assert (done.status, done.usage.completion_tokens) == ("complete", 400)
    drains = stub.frames_received(PID, "drain_status")
    assert drains[0].message.phase == "starting"
    assert drains[-1].message.phase == "complete"
    for frame in drains:
        # An int on the wire: the Go coordinator drops a drain_status holding 1.5.
        assert type(json.loads(frame.raw)["estimated_drain_seconds"]) is int, frame.raw
    assert "late" not in engine.started and len(engine.started) == 2  # warm-up + the job


async def test_while_the_model_loads_requests_are_refused(stub: CoordinatorStub) -> None:
    engine = ScriptedEngine(load_s=3.0)
    async with running(provider_config(stub), engine):
        await stub.wait_connected(PID)
        ack = await stub.preflight(PID, 10)
        assert (ack.accepted, ack.reason, ack.max_context_tokens) == (
            False,
            "model_not_loaded",
            0,
        )
        await send_request(stub, "early")
        early = await end_of(stub, "early")
        assert (early.status, early.retryable) == ("error_model_not_loaded", True)
        assert early.error == "model is still loading; retry shortly"
        assert engine.started == []


@pytest.mark.parametrize("stream", [False, True], ids=["non_stream", "stream"])
async def test_request_deadline_ends_provider_timeout(stub: CoordinatorStub, stream: bool) -> None:
    engine = ScriptedEngine(tokens=1_000_000, step_s=0.005)
    config = provider_config(stub, request_timeout_s=0.5)
    async with running(config, engine) as run:
        await stub.wait_provider_state(PID, "ready")
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, text = await buy(stub, chat("endless", stream=stream))
        took = loop.time() - started
        [end] = [f.message for f in stub.frames_received(PID, "inference_response_end")
                 if is_buyer(f)]  # fmt: skip
        assert (end.status, end.retryable) == ("provider_timeout", True)
        assert end.error == "the request ran past request_timeout_s (0.5 s)"
        assert end.usage.completion_tokens > 0
        assert 0.5 <= took < 10
        if stream:
            assert code == 200 and '"provider_timeout"' in text
        else:
            assert code == 504 and json.loads(text)["error"]["code"] == "provider_timeout"
        await stub.wait_provider_state(PID, "ready")
        assert run.agent.state.slots_free == run.agent.state.slots_total
        assert engine.active == 0
        assert run.agent.totals["errors"] == 1 and run.agent.totals["complete"] == 1  # warm-up


async def test_request_deadline_reaches_a_long_prefill(stub: CoordinatorStub) -> None:
    engine = ScriptedEngine(tokens=3, block_s=30.0)
    async with running(provider_config(stub, request_timeout_s=0.5), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        code, text = await buy(stub, chat("[block] a very long prompt"))
        assert code == 504, text
        [end] = [f.message for f in stub.frames_received(PID, "inference_response_end")
                 if is_buyer(f)]  # fmt: skip
        assert (end.status, end.usage.completion_tokens) == ("provider_timeout", 0)
        await stub.wait_provider_state(PID, "ready")
        assert engine.active == 0 and run.agent.state.in_flight == 0
