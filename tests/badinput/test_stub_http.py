"""Hostile bodies at the stub's buyer API: ``POST /v1/chat/completions``.

Bad bodies get 400 with an OpenAI-style error naming the field (``param``),
valid ones are served by a real provider behind the stub, nothing answers
500, and the stub stays responsive throughout.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from coordinator_stub.app import CoordinatorStub
from provider.openai.request import MAX_BODY_BYTES
from tests.session.conftest import PID, provider_config, running
from tests.session.scripted_engine import ScriptedEngine

from .helpers import GOOD_BODY, post_chat
from .strategies import bad_bodies, draw, valid_bodies


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def assert_openai_error(parsed: Any, text: str) -> dict[str, Any]:
    """``{"error": {"message": str, "type": str, "param": ..., "code": ...}}``."""
    assert isinstance(parsed, dict) and set(parsed) == {"error"}, text[:300]
    error = parsed["error"]
    assert isinstance(error.get("message"), str) and error["message"], text[:300]
    assert isinstance(error.get("type"), str) and error["type"], text[:300]
    assert {"param", "code"} <= error.keys(), text[:300]
    return error  # type: ignore[no-any-return]


async def test_hypothesis_bodies_get_400_naming_the_field_or_are_served(
    stub: CoordinatorStub, http: aiohttp.ClientSession
) -> None:
    bad = draw(bad_bodies(), 200)
    good = draw(valid_bodies(), 40)
    engine = ScriptedEngine(tokens=2, step_s=0.0)
    async with running(provider_config(stub, max_concurrency=4), engine) as run:
        await stub.wait_provider_state(PID, "ready")
        for case in bad:
            status, text, parsed = await post_chat(http, stub, case.body)
            assert status == 400, (case.label, status, text[:300])
            error = assert_openai_error(parsed, text)
            assert error["type"] == "invalid_request_error"
            for mention in case.mentions():
                assert mention in error["message"], (case.label, error)
            assert error["param"] == case.param, (case.label, error)
        for body in good:
            status, text, parsed = await post_chat(http, stub, body.body)
            model = json.loads(body.body).get("model")
            if model not in (None, "scripted"):
                # Routed by model: one nobody serves is a 404 naming the served ones.
                assert status == 404, text[:300]
                error = assert_openai_error(parsed, text)
                assert error["code"] == "model_not_found" and "scripted" in error["message"]
            elif body.fits:
                assert status == 200, text[:300]
                if body.stream:
                    assert text.rstrip().endswith("data: [DONE]"), text[-300:]
                else:
                    assert parsed["object"] == "chat.completion", text[:300]
            else:
                assert status == 400, text[:300]
                assert assert_openai_error(parsed, text)["code"] == "context_length_exceeded"
        # Nothing reached the provider but the valid bodies; it is still whole.
        assert stub.drops == [] and stub.in_flight == {}
        await stub.wait_provider_state(PID, "ready")
        assert run.agent.state.in_flight == 0


async def test_explicit_bad_bodies(stub: CoordinatorStub, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[bytes, int, str | None]] = [
        (b"", 400, None),
        (b"not json", 400, None),
        (b"[]", 400, None),
        (b"{}", 400, "messages"),
        (b'{"messages":[]}', 400, "messages"),
        (
            b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1000000000000}',
            400,
            "max_tokens",
        ),
        (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}', 400, "max_tokens"),
        (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":-1}', 400, "max_tokens"),
        (b'{"messages":[{"role":"user","content":"hi"}],"n":2}', 400, "n"),
        (b'{"messages":[{"role":"robot","content":"hi"}]}', 400, "messages[0].role"),
        (b'{"messages":[{"role":"user","content":{"a":1}}]}', 400, "messages[0].content"),
        (b'{"messages":[{"role":"user","content":"\\ud800"}]}', 400, None),
        # Invalid UTF-8 inside a string: refused, though no field can be named.
        (b'{"messages":[{"role":"user","content":"\xff"}]}', 400, None),
        (b"[" * 10_000 + b"]" * 10_000, 400, None),
        (
            json.dumps({"messages": [{"role": "user", "content": "a" * MAX_BODY_BYTES}]}).encode(),
            400,
            None,
        ),
        # Over the server's own body limit: refused before it is read whole.
        (
            b'{"messages":[{"role":"user","content":"' + b"a" * (3 * MAX_BODY_BYTES // 2) + b'"}]}',
            413,
            None,
        ),
    ]
    for body, want, param in cases:
        status, text, parsed = await post_chat(http, stub, body)
        assert status == want, (body[:80], status, text[:300])
        error = assert_openai_error(parsed, text)
        assert error["param"] == param, (body[:80], error)
    # Still responsive.
    async with http.get(stub.http_url + "/v1/status") as response:
        assert response.status == 200
        assert isinstance(await response.json(), dict)


async def test_deeply_nested_field_gets_400(
    stub: CoordinatorStub, http: aiohttp.ClientSession
) -> None:
    body = '{"messages":[{"role":"user","content":"x"}],"x":' + "[" * 10_000 + "]" * 10_000 + "}"
    status, text, parsed = await post_chat(http, stub, body)
    assert status == 400, (status, text[:200])
    assert_openai_error(parsed, text)


async def test_stub_serves_after_bad_bodies(
    stub: CoordinatorStub, http: aiohttp.ClientSession
) -> None:
    async with running(provider_config(stub), ScriptedEngine(tokens=2, step_s=0.0)):
        await stub.wait_provider_state(PID, "ready")
        for body in (b"\x00", b"{", b'{"messages":5}', b"1" + b"0" * 5000):
            status, _, _ = await post_chat(http, stub, body)
            assert status == 400
        status, text, parsed = await post_chat(http, stub, json.dumps(GOOD_BODY))
        assert status == 200, text[:300]
        assert parsed["choices"][0]["message"]["content"]
