"""Buyer API: OpenAI client round trips, errors, keepalives, cancels, deadlines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from coordinator_stub import CoordinatorStub
from coordinator_stub.buyer_api import error_param

from .conftest import ProviderFactory, StubFactory
from .scripted import ScriptedProvider

MESSAGES = [{"role": "user", "content": "hi"}]


def _client(stub: CoordinatorStub) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stub.http_url + "/v1", api_key="x", max_retries=0, timeout=10
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def _body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": MESSAGES, "stream": stream, **extra}


async def test_openai_non_streaming(stub: CoordinatorStub, ready_provider: ScriptedProvider):
    async with _client(stub) as client:
        completion = await client.chat.completions.create(model="test-model", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello world"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    request = await ready_provider.wait_buyer_request()
    assert request.stream is False
    assert json.loads(request.body)["messages"] == MESSAGES
    assert stub.pool.requests_finished["complete"] == 1
    assert stub.provider("p1").requests_served == 1  # type: ignore[union-attr]


async def test_openai_streaming(stub: CoordinatorStub, ready_provider: ScriptedProvider):
    text, usage = "", None
    async with _client(stub) as client:
        stream = await client.chat.completions.create(
            model="test-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
    assert text == "Hello world"
    assert usage is not None and usage.total_tokens == 7
    request = await ready_provider.wait_buyer_request()
    assert request.stream is True
    assert json.loads(request.body)["stream_options"] == {"include_usage": True}


async def test_no_provider_is_503_openai_error(stub: CoordinatorStub, http: aiohttp.ClientSession):
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body()) as resp:
        assert resp.status == 503
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["code"] == "no_provider_available" and error["message"]
    async with _client(stub) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="test-model", messages=MESSAGES)
    assert info.value.status_code == 503


async def test_degraded_provider_gets_no_buyer_traffic(
    stub: CoordinatorStub, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    await make_provider(stub, answer_warmup=False)
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body()) as resp:
        assert resp.status == 503


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_body(temperature=5), "temperature"),
        ({"model": "m"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        (_body(n=2), "n"),
    ],
)
async def test_bad_body_is_400_naming_the_field(
    stub: CoordinatorStub, http: aiohttp.ClientSession, body: dict[str, Any], param: str
):
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split("[")[0] in error["message"]


async def test_non_json_body_is_400(stub: CoordinatorStub, http: aiohttp.ClientSession):
    async with http.post(f"{stub.http_url}/v1/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


def test_error_param_extraction():
    assert error_param("Expected `float` <= 2.0 - at `$.temperature`") == "temperature"
    assert error_param("Object missing required field `messages`") == "messages"
    assert (
        error_param("Object missing required field `role` - at `$.messages[0]`")
        == "messages[0].role"
    )
    assert error_param("request body is larger than 2 bytes") is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "http_status", "code"),
    [
        ("error_context_exceeded", 400, "context_length_exceeded"),
        ("error_queue_full", 503, "queue_full"),
        ("error_model_not_loaded", 503, "model_not_loaded"),
        ("error_internal", 500, "internal_error"),
    ],
)
async def test_error_end_before_commit_is_an_http_error(
    stub: CoordinatorStub,
    make_provider: ProviderFactory,
    http: aiohttp.ClientSession,
    stream: bool,
    status: str,
    http_status: int,
    code: str,
):
    await make_provider(stub, error_status=status)
    await stub.wait_provider_state("p1", "ready")
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body(stream)) as resp:
        assert resp.status == http_status
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["code"] == code
    assert stub.pool.requests_finished[status] == 1


async def _read_until(resp: aiohttp.ClientResponse, marker: bytes, seen: bytearray) -> None:
    while marker not in seen:
        chunk = await resp.content.read(1024)
        assert chunk, f"stream ended before {marker!r}: {bytes(seen)!r}"
        seen.extend(chunk)


async def test_keepalives_on_a_stalled_stream(
    make_stub: StubFactory, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    stub = await make_stub(keepalive_s=0.1)
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body(True)) as resp:
        # The first keepalive commits 200 and the SSE headers.
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        seen = bytearray()
        await _read_until(resp, b": keepalive\n\n: keepalive\n\n", seen)
        assert b"data:" not in seen
        provider.release()
        seen.extend(await resp.content.read())
    text = seen.decode()
    assert text.startswith(": keepalive\n\n")
    assert '"content":"Hello"' in text
    assert text.endswith("data: [DONE]\n\n")


async def test_no_keepalive_bytes_on_non_streaming(
    make_stub: StubFactory, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    stub = await make_stub(keepalive_s=0.05)
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")

    async def call() -> tuple[int, str, bytes]:
        async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body()) as resp:
            return resp.status, resp.content_type, await resp.read()

    task = asyncio.create_task(call())
    await provider.wait_buyer_request()
    await asyncio.sleep(0.4)  # eight keepalive periods
    provider.release()
    status, content_type, raw = await task
    assert (status, content_type) == (200, "application/json")
    assert raw == ScriptedProvider.completion_json("Hello world").encode()


async def test_error_after_commit_is_an_sse_error_event(
    make_stub: StubFactory, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    stub = await make_stub(keepalive_s=0.05)
    provider = await make_provider(stub, hold=True, error_status="error_internal")
    await stub.wait_provider_state("p1", "ready")
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body(True)) as resp:
        assert resp.status == 200
        seen = bytearray()
        await _read_until(resp, b": keepalive\n\n", seen)
        provider.release()
        seen.extend(await resp.content.read())
    events = [e for e in seen.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "internal_error" and error["message"] == "scripted failure"


async def test_openai_client_raises_on_in_band_error(
    make_stub: StubFactory, make_provider: ProviderFactory
):
    stub = await make_stub(keepalive_s=0.05)
    provider = await make_provider(stub, hold=True, error_status="error_internal")
    await stub.wait_provider_state("p1", "ready")
    async with _client(stub) as client:
        stream = await client.chat.completions.create(
            model="test-model", messages=MESSAGES, stream=True
        )
        provider.release()
        with pytest.raises(openai.APIError, match="scripted failure"):
            async for _ in stream:
                pass


@pytest.mark.parametrize("stream", [False, True])
async def test_buyer_disconnect_sends_cancel(
    stub: CoordinatorStub, make_provider: ProviderFactory, stream: bool
):
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")

    async def call() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{stub.http_url}/v1/chat/completions", json=_body(stream)
            ) as resp:
                await resp.read()

    task = asyncio.create_task(call())
    request = await provider.wait_buyer_request()
    task.cancel()
    cancel = await provider.wait_message("cancel_request")
    assert (cancel.request_id, cancel.reason) == (request.request_id, "buyer_disconnected")
    # The provider's cancelled end frame frees the slot.
    await stub.wait_for(lambda: stub.pool.requests_finished["cancelled"] == 1)
    assert stub.provider("p1").in_flight == {}  # type: ignore[union-attr]
    assert stub.pool.cancels_sent["buyer_disconnected"] == 1


@pytest.mark.parametrize("keepalive", [None, 0.05])
async def test_request_deadline_cancels_and_504(
    make_stub: StubFactory,
    make_provider: ProviderFactory,
    http: aiohttp.ClientSession,
    keepalive: float | None,
):
    stub = await make_stub(request_timeout_s=0.3, keepalive_s=keepalive)
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body(True)) as resp:
        raw = await resp.read()
    if keepalive is None:
        assert resp.status == 504
        assert json.loads(raw)["error"]["code"] == "timeout"
    else:
        # Already committed by a keepalive: the 504 travels in-band.
        assert resp.status == 200
        assert b'"code":"timeout"' in raw and raw.endswith(b"data: [DONE]\n\n")
    cancel = await provider.wait_message("cancel_request")
    assert cancel.reason == "timeout"


async def test_non_stream_deadline_is_504(
    make_stub: StubFactory, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    stub = await make_stub(request_timeout_s=0.3)
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body()) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "timeout"
    assert (await provider.wait_message("cancel_request")).reason == "timeout"


async def test_cancel_unanswered_releases_slot(
    make_stub: StubFactory, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    stub = await make_stub(request_timeout_s=0.2, cancel_grace_s=0.2)
    provider = await make_provider(stub, hold=True, answer_cancels=False)
    await stub.wait_provider_state("p1", "ready")
    async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body()) as resp:
        assert resp.status == 504
    await provider.wait_message("cancel_request")
    assert len(stub.provider("p1").in_flight) == 1  # type: ignore[union-attr]
    await stub.wait_for(lambda: stub.pool.requests_finished["cancel_unanswered"] == 1)
    assert stub.provider("p1").in_flight == {}  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_dropped_mid_request(
    make_stub: StubFactory,
    make_provider: ProviderFactory,
    http: aiohttp.ClientSession,
    stream: bool,
):
    stub = await make_stub(keepalive_s=0.05)
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")

    async def call() -> tuple[int, bytes]:
        async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body(stream)) as resp:
            return resp.status, await resp.read()

    task = asyncio.create_task(call())
    await provider.wait_buyer_request()
    if stream:
        await asyncio.sleep(0.1)  # let a keepalive commit the response
    stub.drop("p1")
    status, raw = await asyncio.wait_for(task, 5)
    if stream:
        assert status == 200
        assert b'"code":"provider_dropped"' in raw and raw.endswith(b"data: [DONE]\n\n")
    else:
        assert status == 502
        assert json.loads(raw)["error"]["code"] == "provider_dropped"


async def test_seq_gap_is_counted(stub: CoordinatorStub, make_provider: ProviderFactory, http):
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")

    async def call() -> bytes:
        async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body(True)) as resp:
            return await resp.read()

    task = asyncio.create_task(call())
    request = await provider.wait_buyer_request()
    first, rest = ScriptedProvider.stream_data()
    rid = request.request_id
    await provider.send(ScriptedProvider.chunk(rid, 0, first))
    await provider.send(ScriptedProvider.chunk(rid, 2, rest))
    await provider.send(ScriptedProvider.end(rid, "complete", 3))
    raw = await task
    assert raw.endswith(b"data: [DONE]\n\n")
    assert stub.pool.seq_gaps == 1


async def test_least_loaded_routing(
    stub: CoordinatorStub, make_provider: ProviderFactory, http: aiohttp.ClientSession
):
    a = await make_provider(stub, "a", hold=True)
    b = await make_provider(stub, "b", hold=True)
    await stub.wait_provider_state("a", "ready")
    await stub.wait_provider_state("b", "ready")

    async def call() -> int:
        async with http.post(f"{stub.http_url}/v1/chat/completions", json=_body()) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(call()) for _ in range(4)]
    await stub.wait_for(lambda: stub.pool.requests_routed == 4)
    assert len(stub.provider("a").in_flight) == 2  # type: ignore[union-attr]
    assert len(stub.provider("b").in_flight) == 2  # type: ignore[union-attr]
    for provider in (a, b):
        await provider.wait_for(lambda p=provider: len(p.buyer_requests()) == 2)
    a.release()
    b.release()
    assert await asyncio.gather(*tasks) == [200] * 4


async def test_models_and_status(
    stub: CoordinatorStub, ready_provider: ScriptedProvider, http: aiohttp.ClientSession
):
    async with _client(stub) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["test-model"]
    await ready_provider.send(ready_provider.heartbeat())
    await stub.wait_frame("p1", "heartbeat")
    async with http.get(f"{stub.http_url}/v1/status") as resp:
        status = await resp.json()
    (provider,) = status["providers"]
    assert provider["provider_id"] == "p1" and provider["state"] == "ready"
    assert (provider["slots_free"], provider["slots_total"]) == (4, 4)
    assert provider["in_flight"] == 0 and provider["connected"] is True
    assert provider["model_id"] == "test-model"
    assert 0 <= provider["last_heartbeat_age_s"] < 5
    assert status["counters"]["warmups"]["passed"] == 1
    assert status["drops"] == []
