"""Fixtures of the coordinator stub suite: a stub factory and scripted providers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from coordinator_stub import CoordinatorStub

from .scripted import ScriptedProvider

#: Test defaults: fast warm-up retries, no other timer changed.
FAST = {"warmup_retry_s": 0.05, "cancel_grace_s": 1.0}

StubFactory = Callable[..., Awaitable[CoordinatorStub]]
ProviderFactory = Callable[..., Awaitable[ScriptedProvider]]


@pytest.fixture
async def make_stub() -> AsyncIterator[StubFactory]:
    """``await make_stub(**config_overrides)``: a started stub, stopped after the test."""
    stubs: list[CoordinatorStub] = []

    async def factory(**overrides: Any) -> CoordinatorStub:
        stub = CoordinatorStub(**{**FAST, **overrides})
        await stub.start()
        stubs.append(stub)
        return stub

    yield factory
    for stub in reversed(stubs):
        await stub.stop()


@pytest.fixture
async def stub(make_stub: StubFactory) -> CoordinatorStub:
    return await make_stub()


@pytest.fixture
async def make_provider() -> AsyncIterator[ProviderFactory]:
    """``await make_provider(stub, pid, **knobs)``: a started scripted provider."""
    providers: list[ScriptedProvider] = []

    async def factory(
        stub: CoordinatorStub, provider_id: str = "p1", *, start: bool = True, **knobs: Any
    ) -> ScriptedProvider:
        provider = ScriptedProvider(stub.ws_url, provider_id, **knobs)
        providers.append(provider)
        if start:
            await provider.start()
        return provider

    yield factory
    for provider in providers:
        await provider.close()


@pytest.fixture
async def ready_provider(stub: CoordinatorStub, make_provider: ProviderFactory) -> ScriptedProvider:
    """Provider ``p1`` registered with ``stub`` and past the warm-up gate."""
    provider = await make_provider(stub)
    await stub.wait_provider_state("p1", "ready")
    return provider
