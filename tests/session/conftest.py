"""Provider agent against the real coordinator stub, in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from coordinator_stub.app import CoordinatorStub
from coordinator_stub.config import StubConfig
from coordinator_stub.observe import FrameRecord
from provider.agent import Agent
from provider.config import Config

from .scripted_engine import ScriptedEngine

PID = "prov-test"


#: The protocols a parametrised test runs on (the ``protocol`` fixture).
PROTOCOLS = ("v1", "v2")


def drain_phase(frame: FrameRecord) -> str:
    """The phase a ``drain_status`` carried, read from the wire.

    The stub parses with the real coordinator's rules, which drop the
    provider's ``drain_status`` today (``estimated_drain_seconds`` goes out
    as a float, Go's field is an int: see
    ``test_drain_status_passes_the_coordinator_rules``).
    """
    return str(msgspec.json.decode(frame.raw)["phase"])


def stub_config(**overrides: Any) -> StubConfig:
    """The stub's hostile timers stay on; only waits that tests sit through shrink."""
    base: dict[str, Any] = {"heartbeat_interval_s": 1, "warmup_retry_s": 0.1, "grace_s": 30.0}
    return StubConfig(**(base | overrides))


def provider_config(stub: CoordinatorStub | str, **overrides: Any) -> Config:
    """Provider settings for tests; ``stub`` is a running stub or its WebSocket URL.

    Protocol v2 (the default). Given a stub, the provider reads the stub's
    signed catalog feed (served on the stub's HTTP port, not on the
    WebSocket origin where a production coordinator serves it) and trusts
    its key; given a URL, it sends no catalog fields.
    """
    base: dict[str, Any] = {
        "coordinator_url": stub if isinstance(stub, str) else stub.ws_url,
        "provider_id": PID,
        "provider_token": "tok",
        "model": "scripted",
        "status_port": 0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "protocol": "v2",
    }
    if isinstance(stub, str):
        base["catalog_feed_url"] = "off"
    else:
        base |= catalog_settings(stub)
    return msgspec.convert(base | overrides, Config)


def catalog_settings(stub: CoordinatorStub) -> dict[str, Any]:
    """The provider settings that make it read and trust ``stub``'s catalog feed."""
    return {
        "catalog_feed_url": stub.catalog_url,
        "catalog_public_keys": {stub.catalog_key_id: stub.catalog_public_key},
    }


def registrations(stub: CoordinatorStub, provider_id: str = PID) -> int:
    """How many times ``provider_id`` registered (``hello_ack`` or accepted ``auth_response``)."""
    return len(stub.frames_sent(provider_id, "hello_ack")) + len(
        stub.frames_sent(provider_id, "auth_response")
    )


def registration(stub: CoordinatorStub, provider_id: str = PID) -> Any:
    """The first registration frame as the stub parsed it: ``hello`` or ``auth_request`` initial."""
    frames = stub.frames_received(provider_id, "hello") + stub.frames_received(
        provider_id, "auth_request"
    )
    return min(frames, key=lambda f: f.time).message


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    """Run the test on each protocol: v2 (the default) and v1 (older coordinators)."""
    return str(request.param)


@pytest.fixture
async def stub() -> AsyncIterator[CoordinatorStub]:
    async with CoordinatorStub(stub_config()) as s:
        yield s


class Running:
    """An agent running in a task; ``await stop()`` drains it and returns the exit code."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task = asyncio.create_task(agent.run(), name="agent")

    @property
    def session(self) -> Any:
        return self.agent.session

    async def stop(self, timeout: float = 10.0) -> int:
        self.agent.request_drain("test")
        return await asyncio.wait_for(self.task, timeout)


@contextlib.asynccontextmanager
async def running(config: Config, engine: Any | None = None, **kw: Any) -> AsyncIterator[Running]:
    run = Running(Agent(config, engine or ScriptedEngine(), **kw))
    try:
        yield run
    finally:
        if not run.task.done():
            run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
