"""Where the token travels: only in the upgrade's ``Authorization`` header, never
along a redirect.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from coordinator_stub.app import CoordinatorStub
from coordinator_stub.config import WS_PATH
from tests.session.conftest import PID, provider_config, running, stub_config
from tests.session.scripted_engine import ScriptedEngine

TOKEN = "ptok_transport_8Hq2Lx0Vw5Zc"
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 0.5


@pytest.fixture
async def auth_stub() -> AsyncIterator[CoordinatorStub]:
    """A stub that accepts only :data:`TOKEN`."""
    async with CoordinatorStub(stub_config(tokens=(TOKEN,))) as stub:
        yield stub


async def test_token_only_in_the_authorization_header(auth_stub: CoordinatorStub) -> None:
    stub = auth_stub
    config = provider_config(stub, provider_token=TOKEN)
    assert TOKEN not in (config.coordinator_url or "")
    async with running(config, ScriptedEngine(tokens=2, step_s=0.0)), aiohttp.ClientSession() as h:
        await stub.wait_provider_state(PID, "ready")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with h.post(stub.http_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
        await stub.wait_frame(PID, "heartbeat")
        session = stub.session(PID)
        assert session is not None
        request = session.conn.request
        assert request is not None
        assert TOKEN not in request.path and "?" not in request.path
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        others = [(k, v) for k, v in request.headers.raw_items() if k.lower() != "authorization"]
        assert all(TOKEN not in k and TOKEN not in v for k, v in others), others
        frames = stub.frames_received(PID)
        assert {f.type for f in frames} >= {"auth_request", "heartbeat", "inference_response_end"}
        for frame in frames:
            raw = frame.raw if isinstance(frame.raw, str) else frame.raw.decode(errors="replace")
            assert TOKEN not in raw, frame.type


async def test_wrong_token_is_refused_at_the_upgrade(auth_stub: CoordinatorStub) -> None:
    # The header is what authenticates: another token does not get a session.
    config = provider_config(auth_stub, provider_token="not-the-token")
    async with running(config, ScriptedEngine()):
        rejection = await auth_stub.wait_rejection(4005, timeout=10)
        assert rejection.reason == "invalid_token"  # the real coordinator's reason
        assert auth_stub.providers() == {}


# --------------------------------------------------------------------------
# Redirects


@dataclass
class Redirector:
    """An HTTP server answering every WebSocket upgrade with a redirect."""

    status: int
    location: str = ""
    #: Monotonic time and headers of each upgrade attempt on the redirecting path.
    attempts: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    #: Requests that reached the redirect target on this server (same origin).
    followed: list[str] = field(default_factory=list)
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    wanted: int = 4
    port: int = 0

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        self.attempts.append((time.monotonic(), dict(request.headers)))
        if len(self.attempts) >= self.wanted:
            self.enough.set()
        location = self.location or f"ws://127.0.0.1:{self.port}/elsewhere"
        return web.Response(status=self.status, headers={"Location": location})

    async def target(self, request: web.Request) -> web.StreamResponse:
        self.followed.append(request.headers.get("Authorization", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{WS_PATH}"


async def start(redirector: Redirector) -> web.AppRunner:
    app = web.Application()
    app.router.add_get(WS_PATH, redirector.redirect)
    app.router.add_get("/elsewhere", redirector.target)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    redirector.port = runner.addresses[0][1]
    return runner


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def agent_log() -> Iterator[Records]:
    """Records of the ``mlx_provider`` logger, whatever its propagation."""
    logger = logging.getLogger("mlx_provider")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def _refused_and_backed_off(redirector: Redirector, agent_log: Records) -> None:
    runner = await start(redirector)
    try:
        config = provider_config(
            redirector.url,
            provider_token=TOKEN,
            backoff_initial_s=BACKOFF_INITIAL,
            backoff_max_s=BACKOFF_MAX,
            backoff_jitter=0.0,
        )
        async with running(config, ScriptedEngine()) as run:
            await asyncio.wait_for(redirector.enough.wait(), 10)
            assert not run.task.done()
            lost = list(run.agent.reconnects)
    finally:
        await runner.cleanup()
    assert len(lost) >= redirector.wanted - 1
    for entry in lost:
        assert entry["cause"] == "refused" and "redirect" in entry["detail"], entry
    warnings = [r.getMessage() for r in agent_log.records if r.levelno >= logging.WARNING]
    assert any("redirects are refused" in m for m in warnings), warnings
    # It kept trying, each wait at least the backoff's (no jitter: exact lower bounds).
    times = [t for t, _ in redirector.attempts]
    for k, (earlier, later) in enumerate(itertools.pairwise(times), start=1):
        floor = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (k - 1))
        assert later - earlier >= floor * 0.99, (k, later - earlier, floor)
    # The first hop got the token (it is the configured coordinator), nothing else did.
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for _, h in redirector.attempts)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_to_another_server_not_followed(
    stub: CoordinatorStub, agent_log: Records, status: int
) -> None:
    redirector = Redirector(status, location=stub.ws_url)
    await _refused_and_backed_off(redirector, agent_log)
    # The stub, where the redirect pointed, never saw the provider.
    assert stub.frames_received() == [] and stub.rejections == []
    assert stub.providers() == {} and stub.drops == []


async def test_same_origin_redirect_not_followed(agent_log: Records) -> None:
    # websockets keeps Authorization on a same-origin redirect: it must not be followed.
    redirector = Redirector(302)
    await _refused_and_backed_off(redirector, agent_log)
    assert redirector.followed == []
