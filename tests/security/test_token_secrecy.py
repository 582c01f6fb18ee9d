"""The provider token never shows: not in logs, status, metrics or exceptions.

The end-to-end test drives a provider through registration, a served
request, an engine failure whose message holds the token, a bad frame, a bad
body, a refused reconnect and a reconnect, with the agent's own logging
(``provider.logs.setup_logging`` with the token as a secret, JSON lines to a
buffer) and websockets' client debug output switched on, so the
``Authorization`` header itself goes through the redactor.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator_stub.app import CoordinatorStub
from provider.logs import LOGGER_NAME, MIN_SECRET_LENGTH, REDACTED, get_logger, setup_logging
from provider.openai.request import ChatCompletionRequest
from provider.ops.status_server import StatusServer
from tests.session.conftest import PID, provider_config, registrations, running, stub_config
from tests.session.scripted_engine import ScriptedEngine

TOKEN = "ptok_Zk3vQ9xW2mN7bR4tY8uJ1hL6"
LOGGERS = (LOGGER_NAME, "websockets", "websockets.client", "aiohttp", "asyncio")


@pytest.fixture
def log_text() -> io.StringIO:
    """The agent's logging, as JSON lines into a buffer, at debug, token as secret."""
    buffer = io.StringIO()
    setup_logging(level="debug", secrets=[TOKEN], stream=buffer, json=True)
    # websockets logs the handshake headers (Authorization included) at debug.
    logging.getLogger("websockets.client").setLevel(logging.DEBUG)
    return buffer


class ExplodingEngine(ScriptedEngine):
    """Fails, with the token in the exception, on prompts containing ``[explode]``."""

    async def generate(  # type: ignore[override]
        self, request: ChatCompletionRequest, cancel: threading.Event, **hints: Any
    ) -> AsyncIterator[Any]:
        if "[explode]" in request.messages[-1].text():
            raise RuntimeError(f"engine exploded; Authorization: Bearer {TOKEN}; token={TOKEN}")
        async for batch in super().generate(request, cancel, **hints):
            yield batch


def chat(content: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


async def test_token_never_in_logs_status_or_metrics(log_text: io.StringIO) -> None:
    async with CoordinatorStub(stub_config(tokens=(TOKEN,))) as stub:
        config = provider_config(stub, provider_token=TOKEN)
        async with (
            running(config, ExplodingEngine(tokens=2, step_s=0.0)) as run,
            aiohttp.ClientSession() as http,
        ):
            await stub.wait_provider_state(PID, "ready")
            url = stub.http_url + "/v1/chat/completions"
            async with http.post(url, json=chat("hello")) as response:
                assert response.status == 200
            async with http.post(url, json=chat("[explode]")) as response:
                assert response.status == 500  # error_internal, retryable
            await stub.send_raw(
                PID, '{"type":"preflight","request_id":"p","estimated_tokens":"x","token":"x"}'
            )
            await stub.wait_frame(PID, "nak")
            await stub.send_request(PID, '{"messages": "nope"}', request_id="bad")
            await stub.wait_frame(
                PID, "inference_response_end", where=lambda f: f.message.request_id == "bad"
            )
            # A reconnect refused (HTTP 503) at least once before it gets through.
            stub.refuse_connections(60)
            assert stub.drop(PID)
            await stub.wait_rejection(503, timeout=10)
            stub.refuse_connections(0)
            await stub.wait_for(lambda: registrations(stub) >= 2, timeout=10, what="reconnect")
            await stub.wait_provider_state(PID, "ready")

            status_server = StatusServer(run.agent.status, run.agent.is_healthy, port=0)
            async with status_server:
                bodies = []
                for path in ("/status", "/metrics", "/healthz"):
                    async with http.get(status_server.url + path) as response:
                        assert response.status == 200
                        bodies.append(await response.text())
            assert json.loads(bodies[0])["connection"] == "connected"
            assert "mlx_provider" in bodies[1] or "# HELP" in bodies[1]

    text = log_text.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    messages = " ".join(r["msg"] for r in records)
    # The paths above were logged...
    assert "job failed" in messages and "exploded" in text
    assert "connection lost" in messages and "refused" in messages
    assert "nak" in messages and "registered" in messages
    # ...the credential went through the redactor (the handshake header)...
    assert f"Bearer {REDACTED}" in text
    assert "engine exploded; Authorization: Bearer ***; token=***" in text
    # ...and it never came out.
    assert TOKEN not in text
    assert TOKEN not in json.dumps(run.agent.status())
    for body in bodies:
        assert TOKEN not in body


async def test_assigned_token_never_in_logs_or_status(log_text: io.StringIO, tmp_path: Any) -> None:
    config_path = tmp_path / "config.toml"
    async with CoordinatorStub(stub_config(issue_provider_token=True, tokens=(TOKEN,))) as stub:
        config = provider_config(stub, provider_token=TOKEN)
        async with running(
            config, ScriptedEngine(tokens=2, step_s=0.0), config_path=config_path
        ) as run:
            await stub.wait_provider_state(PID, "ready")
            assigned = stub.frames_sent(PID, "auth_response")[0].message.assigned_provider_token
            assert assigned and run.agent.token == assigned
            assert stub.drop(PID)
            await stub.wait_for(lambda: registrations(stub) >= 2, timeout=10)
            await stub.wait_provider_state(PID, "ready")
            # It reconnected with the assigned token, which it kept in a private file.
            headers = stub.session(PID).conn.request.headers  # type: ignore[union-attr]
            assert headers["Authorization"] == f"Bearer {assigned}"
            assert config_path.stat().st_mode & 0o777 == 0o600
            status = json.dumps(run.agent.status())
    text = log_text.getvalue()
    assert "adopted the provider token" in text
    for secret in (TOKEN, assigned):
        assert secret not in text and secret not in status


# --------------------------------------------------------------------------
# The redactor, directly


class Opaque:
    """An object whose str() holds the token (rendered by the formatters)."""

    def __str__(self) -> str:
        return f"<Opaque {TOKEN}>"


@pytest.mark.parametrize("as_json", [True, False])
def test_exception_holding_the_token_is_redacted(as_json: bool) -> None:
    out = io.StringIO()
    setup_logging(level="debug", secrets=[TOKEN], stream=out, json=as_json)
    log = get_logger("security")
    try:
        try:
            raise ValueError(f"inner failure with {TOKEN}")
        except ValueError as inner:
            raise RuntimeError(f"request failed: Bearer {TOKEN}") from inner
    except RuntimeError:
        log.exception(
            "while sending %s", TOKEN,
            extra={"token": TOKEN, "nested": {TOKEN: [TOKEN, (TOKEN,)]}, "obj": Opaque()},
        )  # fmt: skip
    log.info("%(who)s", {"who": TOKEN})
    log.warning(Opaque())
    logging.getLogger("websockets.client").warning("header Authorization: Bearer %s", TOKEN)
    logging.getLogger("asyncio").error("task failed", exc_info=RuntimeError(TOKEN))
    text = out.getvalue()
    assert TOKEN not in text
    assert "inner failure with ***" in text and "request failed: Bearer ***" in text
    assert text.count(REDACTED) >= 10


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    token=st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=",
        min_size=MIN_SECRET_LENGTH,
        max_size=64,
    ),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
    as_json=st.booleans(),
)
def test_any_token_embedded_anywhere_is_redacted(
    token: str, before: str, after: str, as_json: bool
) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    out = io.StringIO()
    try:
        setup_logging(level="debug", secrets=[token], stream=out, json=as_json, libraries=())
        log = get_logger("property")
        log.info(before + token + after, extra={"field": f"{before}{token}{after}"})
        log.info("%s|%r", token, [token])
        try:
            raise OSError(before + token + after)
        except OSError:
            log.exception("failed")
    finally:
        for handler in logger.handlers:
            if handler not in saved[0]:
                handler.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    assert token not in out.getvalue()
