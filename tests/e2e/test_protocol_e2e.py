"""The whole protocol, end to end: the real agent (keys, handshake, encrypted leg,
receipts, MLX engine on the tiny model) against the real coordinator stub, with
the official ``openai`` client as the buyer.

v2 runs against the stub's ``production`` profile (the gates of the shipped
``dist/coordinator.yaml``: binary floor, tokens with tokenless bootstrap and
referrals, an accepted compatibility set, the signed catalog with
``require_hash_verified``, the encrypted leg, settlement ``enforce``): a
provider with no token bootstraps one, persists it, reconnects with it, is
routed once its first ``state_update`` commits its receipt key, serves
streamed, non-streamed and cancelled requests whose receipts the stub
verifies, rekeys (in band, and by reconnecting), drains when the coordinator
asks and comes back, and stops with 0 on a signal's drain. A provider id that
is not a bootstrap id self-mints instead: admitted, not routed, then upgraded
by reconnecting with its token.

v1 runs against a gated dev stub (v1 has no bootstrap, no receipts, no
encrypted leg; production refuses it with 4013): it self-mints, persists,
reconnects with its token and serves, drains and comes back the same way.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from coordinator_stub.app import CoordinatorStub
from provider import agent as agent_module
from provider.config import load_config
from provider.coordinator.messages import Tier2Capabilities
from provider.engine.mlx import MlxEngine
from tests.session.conftest import Running, registrations, running, stub_config

BOOTSTRAP_ID = "mp-" + "5e" * 16
REFERRAL = "welcome-integ"
COMPAT = "Augustas11/macprovider:v1.8.123@" + "c" * 40
VERSION = "1.8.123"
Q = [{"role": "user", "content": "Tell me about lighthouses."}]


def production_stub(model_dir: Path, **overrides: Any) -> CoordinatorStub:
    """The stub as production is configured, its catalog holding ``model_dir``'s row."""
    return CoordinatorStub(
        stub_config(
            profile="production",
            catalog_models={model_dir.name: str(model_dir)},
            referral_codes=(REFERRAL,),
            accepted_compatibility_set_ids=(COMPAT,),
            **overrides,
        )
    )


def write_config(path: Path, stub: CoordinatorStub, model_dir: Path, **settings: Any) -> Path:
    """A config file as an owner writes it for this coordinator (mode 0600)."""
    values: dict[str, Any] = {
        "coordinator_url": stub.ws_url,
        "model": str(model_dir),
        "status_port": 0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "catalog_feed_url": stub.catalog_url,
        **settings,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    lines += ["[catalog_public_keys]", f"{json.dumps(stub.catalog_key_id)} = "
              f"{json.dumps(stub.catalog_public_key)}"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def production_settings(**settings: Any) -> dict[str, Any]:
    return {
        "advertised_binary_version": VERSION,
        "compatibility_set_id": COMPAT,
        **settings,
    }


@contextlib.asynccontextmanager
async def agent(config_file: Path, model_dir: Path, **engine: Any) -> AsyncIterator[Running]:
    config, path = load_config(config_file)
    async with running(config, MlxEngine(model_dir, **engine), config_path=path) as run:
        yield run


def status_of(stub: CoordinatorStub, provider_id: str) -> dict[str, Any] | None:
    return next((p for p in stub.status()["providers"] if p["provider_id"] == provider_id), None)


async def routable(stub: CoordinatorStub, provider_id: str, timeout: float = 60) -> dict[str, Any]:
    return await stub.wait_for(
        lambda: (s := status_of(stub, provider_id)) is not None and s["routable"] and s,
        timeout,
        f"{provider_id} routable",
    )


async def receipts(stub: CoordinatorStub, provider_id: str, verified: int) -> dict[str, Any]:
    """Await ``verified`` receipts verified for ``provider_id``; its receipt counts."""

    def counts() -> dict[str, Any] | None:
        # The pool keeps them across sessions, and after the provider left.
        stats = stub.pool.receipts.get(provider_id)
        got = stats.to_json() if stats is not None else None
        return got if got and got["verified"] >= verified else None

    return await stub.wait_for(counts, 30, f"{verified} receipts verified")


def buyer(stub: CoordinatorStub) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stub.http_url}/v1", api_key="buyer", max_retries=0)


async def serve_three_ways(
    stub: CoordinatorStub, client: openai.AsyncOpenAI, model: str, provider_id: str
) -> None:
    """A non-streamed, a streamed and a cancelled request, each checked."""
    whole = await client.chat.completions.create(model=model, messages=Q, max_tokens=12)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    stream = await client.chat.completions.create(
        model=model, messages=Q, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens, streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    long = await client.chat.completions.create(
        model=model, messages=Q, max_tokens=3000, stream=True
    )
    async for chunk in long:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await long.close()  # the buyer goes away: the stub sends cancel_request
    end = await stub.wait_frame(
        provider_id,
        "inference_response_end",
        where=lambda f: f.message is not None and f.message.status == "cancelled",
        timeout=30,
    )
    assert 0 < end.message.usage.completion_tokens < 3000


async def test_v2_bootstrap_serve_receipts_rekey_drain_in_production(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "COORDINATOR_DRAIN_RECONNECT_S", 0.3)
    async with production_stub(model_dir) as stub:
        cfg = write_config(
            tmp_path / "config.toml", stub, model_dir,
            **production_settings(provider_id=BOOTSTRAP_ID, referral_code=REFERRAL),
        )  # fmt: skip
        async with agent(cfg, model_dir, ignore_eos=True) as run:
            # Credential bootstrap: tokenless, a token minted and persisted
            # (0600) before the Bearer connection that uses it.
            status = await routable(stub, BOOTSTRAP_ID)
            assert stub.bootstraps == [BOOTSTRAP_ID]
            token = run.agent.token
            assert token and f'provider_token = "{token}"' in cfg.read_text()
            assert cfg.stat().st_mode & 0o777 == 0o600
            session = stub.session(BOOTSTRAP_ID)
            assert session is not None
            assert session.conn.request.headers["Authorization"] == f"Bearer {token}"
            assert (status["protocol"], status["auth_state"]) == (2, "bearer_validated")
            assert status["encrypted_leg"] and status["hash_status"] == "verified"
            assert status["catalog_mode"] == "compatible"
            # Routed only once the first state_update committed the receipt key.
            record = stub.provider(BOOTSTRAP_ID)
            assert record is not None and not record.receipt_key_pending
            first_update = stub.frames_received(BOOTSTRAP_ID, "state_update")[0]
            assert first_update.time >= stub.frames_sent(BOOTSTRAP_ID, "auth_response")[0].time

            client = buyer(stub)
            try:
                await serve_three_ways(stub, client, model_dir.name, BOOTSTRAP_ID)
                counts = await receipts(stub, BOOTSTRAP_ID, verified=3)
                assert (counts["failed"], counts["missing"]) == (0, 0), counts
                # Every request of this session went sealed and carried settlement.
                requests = [f for f in stub.frames_sent(BOOTSTRAP_ID, "inference_request")]
                assert requests and all('"encrypted":true' in f.raw for f in requests)

                # In-band rekey: new keys, then served on them.
                assert run.session is not None and run.session.leg is not None
                old_kid = run.session.leg.kid
                assert await stub.rekey(BOOTSTRAP_ID)
                assert run.session.leg.kid != old_kid
                assert stub.status()["rekeys"]["committed"] == 1
                again = await client.chat.completions.create(
                    model=model_dir.name, messages=Q, max_tokens=4
                )
                assert again.usage is not None and again.usage.completion_tokens == 4
                await receipts(stub, BOOTSTRAP_ID, verified=4)

                # The coordinator drains us: drain, close, come back, serve.
                await stub.drain(BOOTSTRAP_ID)
                await stub.wait_for(
                    lambda: registrations(stub, BOOTSTRAP_ID) == 2, 30, "registered again"
                )
                drains = stub.frames_received(BOOTSTRAP_ID, "drain_status")
                phases = [f.message.phase for f in drains]
                assert phases[0] == "starting" and phases[-1] == "complete"
                await routable(stub, BOOTSTRAP_ID)
                after = await client.chat.completions.create(
                    model=model_dir.name, messages=Q, max_tokens=4
                )
                assert after.usage is not None and after.usage.completion_tokens == 4
                counts = await receipts(stub, BOOTSTRAP_ID, verified=5)
                assert counts["failed"] == 0, counts
            finally:
                await client.close()
            assert stub.bootstraps == [BOOTSTRAP_ID]  # the token was reused, not re-minted
            assert await run.stop(30) == 0  # a signal's drain ends the process


async def test_v2_self_mint_is_not_routed_until_it_reconnects_with_its_token(
    model_dir: Path, tmp_path: Path
) -> None:
    pid = "prov-selfmint"
    async with production_stub(model_dir) as stub:
        cfg = write_config(
            tmp_path / "config.toml", stub, model_dir, **production_settings(provider_id=pid)
        )
        async with agent(cfg, model_dir, ignore_eos=True) as run:
            unrouted = await stub.wait_for(
                lambda: (
                    (s := status_of(stub, pid)) is not None
                    and "auth_state:self_minted" in s["not_routable_reasons"]
                    and s
                ),
                30,
                "the self-minted session",
            )
            assert not unrouted["routable"]
            status = await routable(stub, pid)
            assert status["auth_state"] == "bearer_validated"
            await stub.wait_for(lambda: registrations(stub, pid) == 2, what="two registrations")
            assert f'provider_token = "{run.agent.token}"' in cfg.read_text()
            client = buyer(stub)
            try:
                done = await client.chat.completions.create(
                    model=model_dir.name, messages=Q, max_tokens=6
                )
                assert done.usage is not None and done.usage.completion_tokens == 6
            finally:
                await client.close()
            await receipts(stub, pid, verified=1)
            assert stub.bootstraps == [] and await run.stop(30) == 0


async def test_v2_rekey_by_reconnect_without_in_band_rekey(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A provider that does not offer in-band rekey gets fresh keys by
    # reconnecting when its key epoch is spent (here after 2 requests).
    monkeypatch.setattr(
        agent_module,
        "Tier2Capabilities",
        functools.partial(Tier2Capabilities, in_band_aead_rekey_v1=False),
    )
    token = "ptok_rekey_0123456789"
    async with production_stub(model_dir, rekey_after_requests=2, tokens=(token,)) as stub:
        cfg = write_config(
            tmp_path / "config.toml", stub, model_dir,
            **production_settings(provider_id="prov-rekey", provider_token=token),
        )  # fmt: skip
        async with agent(cfg, model_dir, ignore_eos=True) as run:
            await routable(stub, "prov-rekey")
            first_kid = run.session.leg.kid  # type: ignore[union-attr]
            client = buyer(stub)
            try:
                for i in range(3):
                    done = await client.chat.completions.create(
                        model=model_dir.name, messages=Q, max_tokens=3
                    )
                    assert done.usage is not None and done.usage.completion_tokens == 3, i
                    if i == 1:
                        await stub.wait_for(
                            lambda: registrations(stub, "prov-rekey") == 2, 30, "a new session"
                        )
                        await routable(stub, "prov-rekey")
            finally:
                await client.close()
            assert run.session is not None and run.session.leg is not None
            assert run.session.leg.kid != first_kid
            assert not run.session.leg.in_band_rekey
            assert stub.status()["rekeys"]["committed"] == 0
            await receipts(stub, "prov-rekey", verified=3)
            assert await run.stop(30) == 0


async def test_v1_self_mint_serve_drain_and_reconnect(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "COORDINATOR_DRAIN_RECONNECT_S", 0.3)
    gates = {"require_provider_tokens": True, "allow_tokenless_provisional_bootstrap": True}
    pid = "prov-v1"
    async with CoordinatorStub(stub_config(warmup_gate=False, **gates)) as stub:
        cfg = write_config(
            tmp_path / "config.toml", stub, model_dir, provider_id=pid, protocol="v1",
            catalog_feed_url="off",
        )  # fmt: skip
        async with agent(cfg, model_dir, ignore_eos=True) as run:
            status = await routable(stub, pid)
            assert (status["protocol"], status["auth_state"]) == (1, "bearer_validated")
            assert not status["encrypted_leg"]
            await stub.wait_for(lambda: registrations(stub, pid) == 2, what="two registrations")
            first = stub.frames_sent(pid, "hello_ack")[0].message
            assert first.auth_state == "self_minted" and first.assigned_provider_token
            token = run.agent.token
            assert token and f'provider_token = "{token}"' in cfg.read_text()
            assert stub.session(pid).conn.request.headers["Authorization"] == f"Bearer {token}"  # type: ignore[union-attr]
            client = buyer(stub)
            try:
                await serve_three_ways(stub, client, model_dir.name, pid)
                assert all('"body"' in f.raw for f in stub.frames_sent(pid, "inference_request"))
                await stub.drain(pid)
                await stub.wait_for(lambda: registrations(stub, pid) == 3, 30, "registered again")
                await routable(stub, pid)
                after = await client.chat.completions.create(
                    model=model_dir.name, messages=Q, max_tokens=4
                )
                assert after.usage is not None and after.usage.completion_tokens == 4
            finally:
                await client.close()
            assert await run.stop(30) == 0
