"""Shared helpers of the bad-input suite."""

from __future__ import annotations

import fnmatch
import json
from types import SimpleNamespace
from typing import Any

import aiohttp

from coordinator_stub.app import CoordinatorStub
from coordinator_stub.observe import FrameRecord

from .strategies import FrameCase

GOOD_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def send_unchecked(stub: CoordinatorStub, provider_id: str, data: str | bytes) -> None:
    """:meth:`CoordinatorStub.send_raw` without the stub decoding the frame for its log.

    ``send_raw`` runs ``decode_coordinator_frame`` on TEXT frames, which
    raises on the deeply nested frames some tests send (the bug those tests
    are about), so they write the frame through the session queue directly.
    """
    await stub.ws.session(provider_id)._enqueue(None, data, "<unchecked>", None)


async def post_chat(
    http: aiohttp.ClientSession, stub: CoordinatorStub, body: str | bytes
) -> tuple[int, str, Any]:
    """POST a raw body to the stub's chat completions: (status, text, JSON or None)."""
    async with http.post(
        stub.http_url + "/v1/chat/completions",
        data=body.encode() if isinstance(body, str) else body,
        headers={"Content-Type": "application/json"},
    ) as response:
        text = await response.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return response.status, text, parsed


def wire_view(frame: FrameRecord) -> Any:
    """What the provider sent: the stub's parse, or the raw JSON when the stub's
    Go rules refused the frame (a control character in a request id, say)."""
    if frame.message is not None:
        return frame.message
    return json.loads(frame.raw, object_hook=lambda d: SimpleNamespace(**d))


def check_nak(case: FrameCase, frame: FrameRecord, rid: str = "") -> None:
    """``frame`` is the nak ``case`` (sent with request id ``rid``) must get:
    right type, what it names, code and mention.

    Read from the wire when the stub's Go rules refused the nak (a control
    character in ``in_reply_to`` is refused there, and only logged).
    """
    nak = wire_view(frame)
    where = f"{case.label}: {nak!r}"[:600]
    assert frame.type == "nak", where
    assert nak.in_reply_to == case.reply_to(rid), where
    assert nak.error.code == case.code, where
    assert nak.error.message, where
    for mention in case.mentions:
        assert mention in nak.error.message, where


def check_end(case: FrameCase, frame: FrameRecord) -> None:
    """``frame`` is an end frame whose status and error fit ``case``."""
    end = wire_view(frame)
    where = f"{case.label}: {end!r}"[:600]
    assert any(fnmatch.fnmatch(end.status, s) for s in case.statuses), where
    if end.status != "complete":
        assert end.error, where
    for mention in case.mentions:
        assert mention in (end.error or ""), where
    if case.statuses == ("error_*",):
        # A bad body is the buyer's fault: neither busy nor worth a retry elsewhere.
        assert end.status not in ("error_queue_full", "error_model_not_loaded"), where
        assert end.retryable is False and end.chunks_sent == 0, where
