"""Hostile frames at one long-lived provider, through the real socket.

Hypothesis draws the batch (:func:`strategies.draw`) before the provider
starts, so one provider takes every example; each frame must get its clear
answer (a ``nak`` naming the problem and, when the frame has a usable
``request_id``, the request; an end frame naming the bad field; a
``preflight_ack``; nothing, for a type the provider does not know), and
afterwards the session is the same one, nothing was dropped, no slot leaked
and the provider is ``ready`` and still serves.

On the v2 encrypted leg the coordinator seals every ``inference_request``:
the requests that decode arrive sealed by the stub (their bodies, bad or
good, are checked after decryption), a cancel for an unknown request is
ignored (no end frame for a request the coordinator does not hold), and a
plaintext request that decodes is not sent at all (it is refused with a
``tier2_*`` nak, on which the coordinator closes the leg, by design).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import aiohttp

from coordinator_stub.app import CoordinatorStub
from provider.coordinator.messages import MAX_FRAME_BYTES
from provider.logs import JsonFormatter
from tests.session.conftest import PID, provider_config, running
from tests.session.scripted_engine import ScriptedEngine

from .helpers import GOOD_BODY, check_end, check_nak, post_chat, send_unchecked, wire_view
from .strategies import RID, FrameCase, dumps, frame_batch, repeat_to

DEEP = "[" * 10_000 + "]" * 10_000
SLOTS = 64


def _request(body: str, ascii_only: bool = True) -> str:
    msg = {"type": "inference_request", "request_id": RID, "stream": False, "body": body}
    return dumps(msg, ascii_only)


def _body(**fields: Any) -> str:
    return dumps({**GOOD_BODY, **fields}, True)


def _bad_body(label: str, body: str, *mentions: str) -> FrameCase:
    frame = _request(body, ascii_only=body.isascii())
    return FrameCase(label, frame, "end", mentions=mentions, statuses=("error_*",))


def _ignored(label: str, frame: str) -> FrameCase:
    """A frame of a type the provider does not know: logged, no answer."""
    return FrameCase(label, frame, "ignored", code="unknown_message_type")


def _nak(
    label: str,
    frame: str | bytes,
    in_reply_to: str = "unknown",
    *mentions: str,
    code: str = "malformed_message",
) -> FrameCase:
    return FrameCase(label, frame, "nak", in_reply_to=in_reply_to, code=code, mentions=mentions)


#: The cases the brief names, so they run whatever hypothesis draws.
EXPLICIT = [
    _bad_body("max_tokens 10**12", _body(max_tokens=10**12), "`$.max_tokens`"),
    _bad_body("max_tokens 0", _body(max_tokens=0), "`$.max_tokens`"),
    _bad_body("max_tokens -1", _body(max_tokens=-1), "`$.max_tokens`"),
    _bad_body("empty messages", dumps({"messages": []}, True), "`$.messages`"),
    _bad_body(
        "wrong role", _body(messages=[{"role": "wizard", "content": "x"}]), "`$.messages[0].role`"
    ),
    _bad_body(
        "content int", _body(messages=[{"role": "user", "content": 5}]), "`$.messages[0].content`"
    ),
    _bad_body("n=2", _body(n=2), "`$.n`"),
    _bad_body("not JSON", "this is not json"),
    _bad_body("empty body", ""),
    _bad_body(
        "2 MiB + 1 of ASCII",
        _body(messages=[{"role": "user", "content": "a" * (2 * 1024 * 1024)}]),
        "request body is",
    ),
    _bad_body(
        "over 2 MiB only in bytes",
        dumps({"messages": [{"role": "user", "content": "\u20ac" * 700_000}]}, False),
        "request body is",
    ),
    _nak("empty object", "{}", "unknown", "missing required field `type`"),
    _nak("10,000 nested arrays", DEEP, "unknown", "Expected `object`"),
    _nak("huge number", "1" + "0" * 5000),
    _nak(
        "huge estimated_tokens literal",
        f'{{"type":"preflight","request_id":"{RID}","estimated_tokens":1e400}}',
        RID,  # the nak names the request
        "`$.estimated_tokens`",
    ),
    _nak("lone surrogate escaped", '{"type":"cancel_request","request_id":"\\ud800"}'),
    _nak("lone low surrogate escaped", '{"type":"\\udfff"}'),
    _ignored("NUL in type", dumps({"type": "\x00"}, True)),
    _ignored("RTL type", dumps({"type": "\u202edrain"}, False)),
    _ignored("emoji type", dumps({"type": "\U0001f600"}, True)),
    _ignored("1 MiB type", dumps({"type": "t" * 2**20}, True)),
    _ignored(
        "unknown type with a request id",
        dumps({"type": "future_feature", "request_id": RID, "x": 1}, True),
    ),
    _nak(
        "body missing (plain session)",
        f'{{"type":"inference_request","request_id":"{RID}","stream":false}}',
        RID,
        "missing required field `body`",
    ),
    _nak(
        "request_id 300k",
        dumps(
            {
                "type": "preflight",
                "request_id": repeat_to("\U0001f600", 1_200_000),
                "estimated_tokens": 1,
            },
            False,
        ),
        "preflight",
        "`$.request_id`",
    ),
    _nak(
        "body not a string",
        dumps(
            {
                "type": "inference_request",
                "request_id": "x",
                "stream": False,
                "body": {"messages": []},
            },
            True,
        ),
        "x",  # the nak names the request
        "`$.body`",
    ),
    _nak("binary garbage", b"\x00\xff\xfe garbage"),
    FrameCase(
        "preflight 10**400",
        dumps({"type": "preflight", "request_id": RID, "estimated_tokens": 10**400}, True),
        "ack",
        too_big=True,
    ),
]


#: A body this large cannot travel sealed (base64, in JSON) in one frame.
SEALABLE_BODY_BYTES = (MAX_FRAME_BYTES - 16 * 1024) * 3 // 4


async def send_case(
    stub: CoordinatorStub, case: FrameCase, index: int, protocol: str
) -> tuple[FrameCase, str] | None:
    """Send ``case`` as the coordinator would on ``protocol``: the case and request id
    to expect an answer for, or None when it cannot travel there."""
    frame, rid = case.render(index)
    assert len(frame.encode() if isinstance(frame, str) else frame) < MAX_FRAME_BYTES
    if protocol == "v2" and case.label == "body missing (plain session)":
        return None
    if protocol == "v2" and case.answer == "end":
        msg = json.loads(frame)
        if msg["type"] == "cancel_request":
            await stub.send_raw(PID, frame)
            return dataclasses.replace(case, answer="none"), rid
        body = msg["body"]
        if len(body.encode(errors="surrogatepass")) > SEALABLE_BODY_BYTES:
            return None
        # The coordinator names its own requests (no control characters).
        rid = f"sealed-{index}"
        await stub.send_request(PID, body, stream=msg["stream"], request_id=rid)
        return case, rid
    await stub.send_raw(PID, frame)
    return case, rid


async def test_hypothesis_frames_all_answered_session_survives(
    stub: CoordinatorStub, protocol: str
) -> None:
    cases = EXPLICIT + frame_batch(600)
    engine = ScriptedEngine(tokens=2, step_s=0.0)
    config = provider_config(stub, max_concurrency=SLOTS, protocol=protocol)
    async with running(config, engine) as run:
        await stub.wait_provider_state(PID, "ready")
        session = run.session
        start = time.monotonic()
        sent: list[tuple[FrameCase, str]] = []
        for i, case in enumerate(cases):
            if (done := await send_case(stub, case, i, protocol)) is not None:
                sent.append(done)
        if protocol == "v2":
            assert sum(rid.startswith("sealed-") for _, rid in sent) > 100
        # Frames are handled in order: once this is answered, every nak is out.
        sentinel = await stub.preflight(PID, 1, request_id="sentinel", timeout=30)
        assert sentinel.accepted, sentinel

        naks = [f for f in stub.frames_received(PID, "nak") if f.time >= start]
        expected_naks = [(case, rid) for case, rid in sent if case.answer == "nak"]
        assert len(naks) == len(expected_naks)
        for (case, rid), frame in zip(expected_naks, naks, strict=True):
            check_nak(case, frame, rid)

        by_rid = {rid: case for case, rid in sent if rid and case.answer in ("end", "ack")}

        def answers() -> dict[str, Any] | None:
            got = {
                wire_view(f).request_id: f
                for kind in ("inference_response_end", "preflight_ack")
                for f in stub.frames_received(PID, kind)
                if f.time >= start
            }
            return got if by_rid.keys() <= got.keys() else None

        got = await stub.wait_for(answers, timeout=30, what="every request answered")
        for rid, case in by_rid.items():
            frame = got[rid]
            if case.answer == "end":
                assert frame.type == "inference_response_end", case.label
                check_end(case, frame)
            else:
                ack = wire_view(frame)
                assert frame.type == "preflight_ack", case.label
                if case.too_big:
                    assert not ack.accepted and ack.reason == "context_exceeds_capacity"
                else:
                    # Go's PreflightAck.Reason is a string: null reads as "".
                    assert ack.reason in (None, "", "queue_full"), (case.label, ack)
        ends = [f for f in stub.frames_received(PID, "inference_response_end") if f.time >= start]
        assert len(ends) == len({wire_view(f).request_id for f in ends}), "one end per request"

        # Same session, nothing dropped, no slot leaked, ready, and still serving.
        await stub.wait_provider_state(PID, "ready")
        assert stub.drops == [] and run.agent.session is session and not run.task.done()
        assert session.jobs.running == {}
        assert run.agent.state.in_flight == 0 and run.agent.state.slots_free == SLOTS
        assert run.agent.state.state == "ready"
        # Unknown types are ignored, never nak'd unknown_message_type: the real
        # coordinator would take the session off WebSocket routing for good.
        record = stub.provider(PID)
        assert record is not None and not record.http_forwarding_only
        stub.ws.session(PID).http_only = False
        async with aiohttp.ClientSession() as http:
            status, text, _ = await post_chat(http, stub, json.dumps(GOOD_BODY))
        assert status == 200, text


# --------------------------------------------------------------------------
# Known bugs: each frame should get a nak (or an end frame); today it ends the session.


async def _answered_in_place(
    stub: CoordinatorStub,
    frame: str | bytes,
    answer: str,
    *,
    unchecked: bool = False,
    protocol: str = "v2",
) -> None:
    """Send ``frame``; assert it gets ``answer`` and the session survives."""
    config = provider_config(stub, protocol=protocol)
    async with running(config, ScriptedEngine(tokens=2, step_s=0.0)) as run:
        await stub.wait_provider_state(PID, "ready")
        start = time.monotonic()
        if unchecked:
            await send_unchecked(stub, PID, frame)
        else:
            await stub.send_raw(PID, frame)

        def settled() -> bool:
            got = [f for f in stub.frames_received(PID, answer) if f.time >= start]
            return bool(got or stub.drops or run.task.done())

        await stub.wait_for(settled, timeout=10, what=f"{answer} or a drop")
        assert stub.drops == [], stub.drops
        assert not run.task.done()
        await asyncio.wait_for(stub.preflight(PID, 1), 5)


async def test_deeply_nested_field_gets_a_nak(stub: CoordinatorStub) -> None:
    frame = '{"type":"preflight","request_id":"a","estimated_tokens":1,"x":' + DEEP + "}"
    await _answered_in_place(stub, frame, "nak", unchecked=True)


async def test_binary_frame_with_invalid_utf8_string_gets_a_nak(stub: CoordinatorStub) -> None:
    await _answered_in_place(stub, b'{"type":"\xff"}', "nak")


async def test_deeply_nested_body_gets_an_end_frame(stub: CoordinatorStub) -> None:
    body = '{"messages":[{"role":"user","content":"x"}],"x":' + DEEP + "}"
    frame = dumps(
        {"type": "inference_request", "request_id": "deep", "stream": False, "body": body}, True
    )
    await _answered_in_place(stub, frame, "inference_response_end", protocol="v1")


async def test_deeply_nested_body_sealed_gets_an_end_frame(stub: CoordinatorStub) -> None:
    body = '{"messages":[{"role":"user","content":"x"}],"x":' + DEEP + "}"
    async with running(provider_config(stub), ScriptedEngine(tokens=2, step_s=0.0)) as run:
        await stub.wait_provider_state(PID, "ready")
        await stub.send_request(PID, body, request_id="deep")
        end = await stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == "deep"
        )
        assert end.message.status == "error_internal" and end.message.error
        assert stub.drops == [] and not run.task.done()
        await asyncio.wait_for(stub.preflight(PID, 1), 5)


async def test_unknown_type_near_the_frame_limit_is_ignored(stub: CoordinatorStub) -> None:
    # No nak: the coordinator stops routing to a session that naks
    # unknown_message_type, and an unknown type is an optional feature.
    frame = dumps({"type": "t" * (MAX_FRAME_BYTES - 64)}, True)
    async with running(provider_config(stub), ScriptedEngine(tokens=2, step_s=0.0)) as run:
        await stub.wait_provider_state(PID, "ready")
        start = time.monotonic()
        await stub.send_raw(PID, frame)
        # Frames are handled in order: once this is answered, the other was handled.
        await asyncio.wait_for(stub.preflight(PID, 1), 10)
        assert [f for f in stub.frames_received(PID, "nak") if f.time >= start] == []
        assert stub.drops == [] and not run.task.done()


class _Lines(logging.Handler):
    """The ``mlx_provider`` records, formatted as the agent writes them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_nak_log_line_is_bounded(stub: CoordinatorStub) -> None:
    logger = logging.getLogger("mlx_provider")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async with running(provider_config(stub), ScriptedEngine(tokens=2, step_s=0.0)):
            await stub.wait_provider_state(PID, "ready")
            await stub.send_raw(PID, dumps({"type": "t" * 2**20}, True))
            huge = {"type": "preflight", "request_id": "t" * 2**20, "estimated_tokens": "t" * 2**20}
            await stub.send_raw(PID, dumps(huge, True))
            await stub.wait_frame(PID, "nak")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    naks = [line for line in handler.lines if '"msg": "nak ' in line]
    ignored = [line for line in handler.lines if "ignoring unknown message type" in line]
    assert naks and ignored
    assert max(len(line) for line in naks + ignored) < 16 * 1024
