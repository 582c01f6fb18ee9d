"""What the session passes to the engine and back: wait estimates, conversation hints."""

from __future__ import annotations

import json

from coordinator_stub.app import CoordinatorStub

from .conftest import PID, provider_config, running
from .scripted_engine import ScriptedEngine


def inference_request(request_id: str, content: str, **extra: object) -> str:
    body = {"model": "scripted", "messages": [{"role": "user", "content": content}]}
    return json.dumps(
        {"type": "inference_request", "request_id": request_id, "stream": True}
        | {"body": json.dumps(body)}
        | extra
    )


def preflight(request_id: str, tokens: int = 100) -> str:
    return json.dumps({"type": "preflight", "request_id": request_id, "estimated_tokens": tokens})


async def test_preflight_ack_carries_the_engines_wait_estimate(stub: CoordinatorStub) -> None:
    engine = ScriptedEngine(tokens=2000, step_s=0.01)
    async with running(provider_config(stub, max_concurrency=2), engine):
        await stub.wait_provider_state(PID, "ready")
        await stub.send_raw(PID, preflight("idle"))
        ack = await stub.wait_frame(
            PID, "preflight_ack", where=lambda f: f.message.request_id == "idle"
        )
        assert ack.message.accepted and ack.message.estimated_wait_ms == 0
        body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}]}
        await stub.send_request(PID, json.dumps(body), stream=True, request_id="long")
        await stub.wait_frame(
            PID, "inference_response_chunk", where=lambda f: f.message.request_id == "long"
        )
        await stub.send_raw(PID, preflight("busy"))
        ack = await stub.wait_frame(
            PID, "preflight_ack", where=lambda f: f.message.request_id == "busy"
        )
        # The scripted engine says: 2000 tokens at 10 ms for the one running.
        assert ack.message.accepted and ack.message.estimated_wait_ms == 20_000
        await stub.send_raw(PID, json.dumps({"type": "cancel_request", "request_id": "long"}))
        await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "long"
        )


async def test_conversation_key_reaches_the_engine_as_a_hint(stub: CoordinatorStub) -> None:
    # On v1, whose requests are plaintext frames this test writes itself: the
    # stub's relay sends no conversation_key, and the field is the same on v2
    # (it travels beside the sealed body, not inside it).
    engine = ScriptedEngine(tokens=2)
    async with running(provider_config(stub, protocol="v1"), engine):
        await stub.wait_provider_state(PID, "ready")
        for rid, extra in (("c1", {"conversation_key": "conv:42"}), ("c2", {})):
            await stub.send_raw(PID, inference_request(rid, "hi", **extra))
            end = await stub.wait_frame(
                PID, "inference_response_end", where=lambda f, r=rid: f.message.request_id == r
            )
            assert end.message.status == "complete"
        assert engine.conversation_keys == ["conv:42"]
