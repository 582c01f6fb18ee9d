"""Protocol v2 end to end against a scripted v2 client with its own crypto.

The client (:mod:`.v2client`) derives keys, seals, opens, signs and
canonicalises with the ``cryptography`` primitives and ``json`` directly, so
each test checks the stub's implementation against a second one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator_stub import CoordinatorStub

from .conftest import StubFactory
from .v2client import V2Client

MODEL_HASH = "ab" * 32
BOOTSTRAP_ID = "mp-" + "0123456789abcdef" * 2
COMPAT_ID = "macprovider/release:v1.8.123@" + "a" * 40
PROOF_REQUIRED = "bootstrap_identity_proof_required"
BELOW_FLOOR = "version_unsupported: binary_version 0.1.0 below required 1.8.33"

ClientFactory = Callable[..., Awaitable[V2Client]]


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., V2Client]]:
    clients: list[V2Client] = []

    def factory(stub: CoordinatorStub, provider_id: str = "p2", **kw: Any) -> V2Client:
        client = V2Client(stub.ws_url, provider_id, **kw)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


async def catalog_stub(make_stub: StubFactory, **overrides: Any) -> CoordinatorStub:
    """A stub with a catalog row for ``test-model`` (hash :data:`MODEL_HASH`)."""
    config: dict[str, Any] = {
        "warmup_gate": False,
        "catalog_models": {"test-model": MODEL_HASH},
    }
    return await make_stub(**(config | overrides))


def admitted(stub: CoordinatorStub, **kw: Any) -> dict[str, Any]:
    """Client options for a provider the catalog admits with a verified hash."""
    fields = stub.catalog_fields("test-model")
    assert fields is not None
    extra = {**fields, **kw.pop("extra", {})}
    return {"model_hash": MODEL_HASH, "extra": extra, **kw}


async def buy(stub: CoordinatorStub, *, stream: bool, content: str = "hi") -> tuple[int, str]:
    body = {"model": "test-model", "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "stream": stream}  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stub.http_url}/v1/chat/completions", json=body) as response:
            return response.status, await response.text()


def status_of(stub: CoordinatorStub, provider_id: str) -> dict[str, Any]:
    return next(p for p in stub.status()["providers"] if p["provider_id"] == provider_id)


async def committed(stub: CoordinatorStub, provider_id: str) -> None:
    """Await the provider's receipt key being committed (its first state_update)."""
    await stub.wait_for(
        lambda: (
            (record := stub.provider(provider_id)) is not None and not record.receipt_key_pending
        ),
        what=f"{provider_id} receipt key committed",
    )


async def routable(stub: CoordinatorStub, provider_id: str) -> dict[str, Any]:
    return await stub.wait_for(
        lambda: (
            (s := status_of(stub, provider_id) if stub.provider(provider_id) else None)
            and s["routable"]
            and s
        ),
        what=f"{provider_id} routable",
    )


# ---------------------------------------------------------------------------
# Credential bootstrap, self-mint, bearer


async def test_bootstrap_then_reconnect_with_the_minted_token(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub, referral_codes=["ref-1"], require_referral=True)
    receipt_key = Ed25519PrivateKey.generate()
    first = make_client(
        stub, BOOTSTRAP_ID, bootstrap=True, referral_code="ref-1", receipt_key=receipt_key
    )
    response = await first.handshake()
    assert response is not None and response["status"] == "accepted"
    assert response["tier"] == "provisional"
    assert response["identity_admission_mode"] == "signature"
    assert response["identity_generation"] == 1
    assert response["tier2_session"]["encrypted_leg"]["kid"] == first.keys.kid  # type: ignore[union-attr]
    token = response["assigned_provider_token"]
    # The coordinator closes right after the response: TCP close, no close frame.
    await asyncio.wait_for(first.closed.wait(), 5)
    assert first.close_code is None
    assert stub.bootstraps == [BOOTSTRAP_ID] and stub.provider(BOOTSTRAP_ID) is None

    # The receipt key is now the durable admission identity: no signature, 4003.
    unsigned = make_client(stub, BOOTSTRAP_ID, token=token, receipt_key=receipt_key,
                           sign_identity=False, **admitted(stub))  # fmt: skip
    assert (await unsigned.handshake())["error"]["code"] == "identity_signature_required"  # type: ignore[index]
    assert (unsigned.close_code, unsigned.close_reason) == (4003, "identity_signature_required")

    second = make_client(stub, BOOTSTRAP_ID, token=token, receipt_key=receipt_key,
                         sign_identity=True, **admitted(stub))  # fmt: skip
    response = await second.handshake()
    assert response is not None and response["status"] == "accepted"
    assert response["auth_state"] == "bearer_validated"
    assert response["identity_admission_mode"] == "signature"
    assert "assigned_provider_token" not in response
    record = await stub.wait_connected(BOOTSTRAP_ID)
    assert record.protocol == 2 and record.encrypted
    # The new receipt key is pending until the first post-auth state_update.
    assert status_of(stub, BOOTSTRAP_ID)["not_routable_reasons"] == ["receipt_key_pending"]
    await second.send(second.state_update("ready"))
    assert (await routable(stub, BOOTSTRAP_ID))["auth_state"] == "bearer_validated"


@pytest.mark.parametrize(
    ("options", "code", "reason", "answered"),
    [
        ({"referral_code": ""}, 4005, "referral_required", False),
        ({"referral_code": "nope"}, 4005, "referral_invalid", False),
        ({"identity_key": Ed25519PrivateKey.generate()}, 4003, PROOF_REQUIRED, True),
    ],
)  # fmt: skip
async def test_bootstrap_refusals(
    make_stub: StubFactory,
    make_client: Callable[..., V2Client],
    options: dict[str, Any],
    code: int,
    reason: str,
    answered: bool,
) -> None:
    stub = await catalog_stub(make_stub, referral_codes=["ref-1"], require_referral=True)
    client = make_client(
        stub, BOOTSTRAP_ID, bootstrap=True, **({"referral_code": "ref-1"} | options)
    )
    response = await client.handshake()
    await asyncio.wait_for(client.closed.wait(), 5)
    assert (client.close_code, client.close_reason) == (code, reason)
    if answered:
        assert response is not None and response["status"] == "rejected"
        assert response["error"]["code"] == reason
    else:
        assert response is None  # mint errors close without an auth_response
    assert stub.bootstraps == []


async def test_bootstrap_needs_an_mp_id_and_a_receipt_key(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub)
    client = make_client(stub, "p-not-bootstrap", bootstrap=True)
    assert await client.handshake() is None
    assert (client.close_code, client.close_reason) == (4003, "bootstrap_receipt_identity_required")


async def test_self_mint_is_not_routable_and_the_token_is_trust_on_first_use(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(
        make_stub, require_provider_tokens=True, allow_tokenless_provisional_bootstrap=True
    )
    first = make_client(stub, "p3", **admitted(stub))
    response = await first.start()
    assert response["auth_state"] == "self_minted"
    token = response["assigned_provider_token"]
    assert len(token) == 64
    await committed(stub, "p3")
    assert status_of(stub, "p3")["not_routable_reasons"] == ["auth_state:self_minted"]
    status, _ = await buy(stub, stream=False)
    assert status == 503  # nobody routable
    await first.close()

    again = make_client(stub, "p3", **admitted(stub))
    assert await again.handshake() is None
    assert (again.close_code, again.close_reason) == (4005, "invalid_token")

    bearer = make_client(stub, "p3", token=token, **admitted(stub))
    assert (await bearer.start())["auth_state"] == "bearer_validated"
    await routable(stub, "p3")
    other = make_client(stub, "p4", token=token, **admitted(stub))
    assert await other.handshake() is None  # a minted token is bound to its provider id
    assert (other.close_code, other.close_reason) == (4005, "invalid_token")


# ---------------------------------------------------------------------------
# The encrypted leg


async def test_encrypted_relays_stream_and_non_stream_with_verified_receipts(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub, warmup_gate=True)
    client = make_client(stub, **admitted(stub))
    await client.start()
    warmup = await client.wait_request(warmup=True)
    assert warmup.settlement is None  # the warm-up is not billed
    await routable(stub, "p2")

    status, text = await buy(stub, stream=False, content="secret question")
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] == "Hello world"
    status, text = await buy(stub, stream=True)
    assert status == 200
    deltas = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in deltas) == "Hello world"
    assert text.rstrip().endswith("data: [DONE]")

    # The c2p counter followed the write order; the wire never carried a body.
    assert client.c2p_seqs == [0, 1, 2]
    sent = stub.frames_sent("p2", "inference_request")
    assert all("body" not in json.loads(f.raw) and json.loads(f.raw)["encrypted"] for f in sent)
    buyer_frame = sent[1]
    assert json.loads(buyer_frame.message.body)["messages"][0]["content"] == "secret question"
    request = client.requests[buyer_frame.message.request_id]
    assert request.body["messages"][0]["content"] == "secret question"
    assert request.request_id.startswith("req-")
    meta = request.settlement
    assert meta is not None and list(meta) == [
        "account_scope", "request_id", "attempt_n", "provider_id", "provider_receipt_key_id",
        "model_id", "expected_catalog_model_hash", "catalog_id", "catalog_body_digest",
        "route_snapshot_digest", "route_snapshot_policy_version", "route_snapshot_mode",
        "prompt_hash", "output_prefix_start_byte", "pending_deadline_seconds",
    ]  # fmt: skip
    assert (meta["request_id"], meta["route_snapshot_mode"]) == (request.request_id, "observe")
    assert meta["expected_catalog_model_hash"] == MODEL_HASH

    receipts = status_of(stub, "p2")["receipts"]
    assert receipts == {"verified": 2, "failed": 0, "missing": 0, "last_failure_reason": None}
    ends = stub.frames_received("p2", "inference_response_end")
    assert all(f.message.encrypted and f.error is None for f in ends)


async def test_forged_receipt_counts_failed_with_the_reason(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub)
    client = make_client(stub, **admitted(stub))
    await client.start()
    await routable(stub, "p2")
    original = client.receipt

    def forged(*args: Any, **kw: Any) -> str:
        return original(*args, key=Ed25519PrivateKey.generate(), **kw)

    client.receipt = forged  # type: ignore[method-assign]
    assert (await buy(stub, stream=False))[0] == 200  # the buyer is served anyway
    client.receipt = lambda *a, **kw: original(*a, output_hash="0" * 64, **kw)  # type: ignore[method-assign]
    assert (await buy(stub, stream=True))[0] == 200
    receipts = status_of(stub, "p2")["receipts"]
    assert receipts["failed"] == 2 and receipts["verified"] == 0
    assert receipts["last_failure_reason"] == "output_hash_mismatch"
    flights = [f for f in stub.frames_received("p2", "inference_response_end")]
    assert len(flights) == 2


async def test_cancel_on_the_encrypted_leg(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub)
    client = make_client(stub, hold=True, **admitted(stub))
    await client.start()
    await routable(stub, "p2")
    buyer = asyncio.create_task(buy(stub, stream=True))
    request = await client.wait_request()
    assert await stub.cancel(request.request_id, "buyer_disconnected")
    await client.wait_for(lambda: client.messages("cancel_request"))
    status, _ = await buyer
    assert status == 503  # the provider's cancelled end, before anything was committed
    await stub.wait_for(lambda: not stub.in_flight, what="request finished")
    assert stub.pool.requests_finished["cancelled"] == 1
    assert status_of(stub, "p2")["receipts"]["verified"] == 1  # a zero settlement


async def test_replayed_frame_closes_the_session(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub)
    client = make_client(stub, hold=True, **admitted(stub))
    await client.start()
    await routable(stub, "p2")
    buyer = asyncio.create_task(buy(stub, stream=True))
    request = await client.wait_request()
    await client.send_chunk(request, 0, 'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    await stub.wait_frame("p2", "inference_response_chunk")
    await client.send(client.sent_frames[-1])  # the same sealed frame again
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code is None  # Go's conn.Close(): no close frame
    drop = await stub.wait_drop("p2")
    assert drop.cause == "tier2_session_closed" and "replayed" in drop.detail
    replay = stub.frames_received("p2", "inference_response_chunk")[-1]
    assert replay.action == "closed" and "replayed" in (replay.error or "")
    status, text = await buyer
    assert status == 200 and "tier2_session_closed" in text  # committed stream, error in band


async def test_plaintext_after_the_tier2_session_closes_it(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub)
    client = make_client(stub, hold=True, **admitted(stub))
    await client.start()
    await routable(stub, "p2")
    buyer = asyncio.create_task(buy(stub, stream=False))
    request = await client.wait_request()
    await client.send({"type": "inference_response_chunk", "request_id": request.request_id,
                       "seq": 0, "data": "plain"})  # fmt: skip
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code is None
    assert (await stub.wait_drop("p2")).cause == "tier2_session_closed"
    frame = stub.frames_received("p2", "inference_response_chunk")[-1]
    assert frame.action == "closed" and frame.error == "plaintext chunk on a tier-2 session"
    assert (await buyer)[0] == 502


async def test_in_band_rekey_by_threshold_and_on_demand(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub, rekey_after_requests=2)
    client = make_client(stub, **admitted(stub))
    await client.start()
    await routable(stub, "p2")
    old_kid = client.keys.kid  # type: ignore[union-attr]
    for _ in range(3):
        assert (await buy(stub, stream=False))[0] == 200
    await client.wait_for(lambda: client.rekeys >= 1)
    assert client.keys.kid != old_kid  # type: ignore[union-attr]
    assert stub.ws.relay.rekeys["committed"] >= 1
    # After the commit both counters restart at 1 on the new keys.
    assert client.c2p_seqs[:2] == [0, 1] and client.c2p_seqs[2] == 1
    assert status_of(stub, "p2")["receipts"]["verified"] == 3
    rekeys = client.rekeys
    assert await stub.rekey("p2")
    assert client.rekeys == rekeys + 1
    assert (await buy(stub, stream=True))[0] == 200
    assert stub.session("p2") is not None and stub.drops == []


async def test_rekey_by_reconnect_without_in_band_support(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await catalog_stub(make_stub, rekey_after_requests=1)
    client = make_client(stub, in_band_rekey=False, **admitted(stub))
    await client.start()
    await routable(stub, "p2")
    assert (await buy(stub, stream=False))[0] == 200
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code is None
    assert (await stub.wait_drop("p2")).cause == "tier2_rekey"
    again = make_client(stub, in_band_rekey=False, **admitted(stub))
    await again.start()
    await routable(stub, "p2")
    assert (await buy(stub, stream=True))[0] == 200


# ---------------------------------------------------------------------------
# The production profile's gates


def production(make_stub: StubFactory, **overrides: Any) -> Awaitable[CoordinatorStub]:
    return make_stub(profile="production", tokens=["tok"],
                     catalog_models={"test-model": MODEL_HASH},
                     referral_codes=["ref-1"], **overrides)  # fmt: skip


async def test_production_admits_routes_and_verifies_receipts(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await production(make_stub)
    assert stub.config.settlement_mode == "enforce" and stub.config.require_encrypted_leg
    client = make_client(stub, token="tok", **admitted(stub))
    response = await client.start()
    assert response["required_binary_version"] == "1.8.33"
    assert response["recommended_binary_version"] == "1.8.123"
    assert response["catalog_compatible"] is True
    assert response["tier2_session"]["model_hash"]["status"] == "verified"
    await routable(stub, "p2")
    assert (await buy(stub, stream=True))[0] == 200
    request = next(r for r in client.requests.values() if not r.warmup)
    assert request.settlement is not None
    assert request.settlement["route_snapshot_mode"] == "enforce"
    assert status_of(stub, "p2")["receipts"]["verified"] == 1


async def test_production_refuses_v1(make_stub: StubFactory) -> None:
    from websockets.asyncio.client import connect

    from .scripted import make_hello

    stub = await production(make_stub)
    from provider.coordinator.messages import encode_text

    async with connect(stub.ws_url, additional_headers={"Authorization": "Bearer tok"},
                       proxy=None) as ws:  # fmt: skip
        await ws.send(encode_text(make_hello("p1", binary_version="1.8.123")))
        await ws.wait_closed()
        assert (ws.close_code, ws.close_reason) == (4013, "tier2_encrypted_leg_required")


@pytest.mark.parametrize(
    ("options", "code", "reason"),
    [
        ({"binary_version": "0.1.0"}, 4004, BELOW_FLOOR),
        ({"extra": {"catalog_row_identity": "f" * 64}}, 4001, "catalog_incompatible"),
        ({"extra": {"catalog_row_identity": ""}}, 4000, "unrecognized auth message"),
        ({"model_hash": "not-a-hash"}, 4000, "unrecognized auth message"),
    ],
)  # fmt: skip
async def test_production_admission_refusals(
    make_stub: StubFactory,
    make_client: Callable[..., V2Client],
    options: dict[str, Any],
    code: int,
    reason: str,
) -> None:
    stub = await production(make_stub)
    extra = options.pop("extra", {})
    client = make_client(stub, token="tok", **admitted(stub, extra=extra, **options))
    assert await client.handshake() is None
    assert (client.close_code, client.close_reason) == (code, reason)
    assert stub.rejections[-1].code == code


async def test_production_compatibility_sets(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await production(make_stub, accepted_compatibility_set_ids=[COMPAT_ID])
    cases = [
        ({}, "compatibility_set_required"),
        ({"compatibility_set_id": "not valid"}, "compatibility_set_invalid"),
        ({"compatibility_set_id": COMPAT_ID[:-40] + "b" * 40}, "compatibility_set_unaccepted"),
    ]  # fmt: skip
    for extra, code in cases:
        client = make_client(stub, token="tok", **admitted(stub, extra=extra))
        response = await client.handshake()
        assert response is not None and response["error"]["code"] == code
        assert (client.close_code, client.close_reason) == (4001, code)
    client = make_client(
        stub, token="tok", **admitted(stub, extra={"compatibility_set_id": COMPAT_ID})
    )
    response = await client.start()
    assert response["compatibility_policy"] == "configured"
    assert response["accepted_compatibility_set_id"] == COMPAT_ID
    await routable(stub, "p2")


@pytest.mark.parametrize(
    ("options", "reasons"),
    [
        ({"extra": {}}, ["catalog:legacy"]),
        ({"model_hash": "cd" * 32}, ["hash:mismatch"]),
        ({"model_hash": None}, ["hash:uncatalogued"]),
    ],
)  # fmt: skip
async def test_production_connected_but_not_routable(
    make_stub: StubFactory,
    make_client: Callable[..., V2Client],
    options: dict[str, Any],
    reasons: list[str],
) -> None:
    stub = await production(make_stub)
    client = make_client(stub, token="tok", **(admitted(stub) | options))
    await client.start()
    await committed(stub, "p2")
    assert status_of(stub, "p2")["not_routable_reasons"] == reasons
    assert (await buy(stub, stream=False))[0] == 503


async def test_production_bootstrap_needs_a_referral(
    make_stub: StubFactory, make_client: Callable[..., V2Client]
) -> None:
    stub = await production(make_stub)
    client = make_client(stub, BOOTSTRAP_ID, bootstrap=True)
    assert await client.handshake() is None
    assert (client.close_code, client.close_reason) == (4005, "referral_required")
    client = make_client(stub, BOOTSTRAP_ID, bootstrap=True, referral_code="ref-1")
    assert (await client.handshake())["assigned_provider_token"]  # type: ignore[index]


# ---------------------------------------------------------------------------
# The signed catalog feed


async def test_catalog_feed_is_signed_and_matches_the_handshake_values(
    make_stub: StubFactory, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.bin").write_bytes(b"\x01\x02")
    manifest = "".join(
        f"{name}\n{len(data)}\n{hashlib.sha256(data).hexdigest()}\n"
        for name, data in (("config.json", b"{}"), ("weights.bin", b"\x01\x02"))
    )
    expected_hash = hashlib.sha256(manifest.encode()).hexdigest()
    stub = await make_stub(catalog_models={"org/My-Model": str(tmp_path)})
    async with aiohttp.ClientSession() as http:
        async with http.get(stub.catalog_url) as response:
            assert response.status == 200
            raw = await response.read()
        async with http.get(stub.catalog_url + ".sig") as response:
            sidecar = json.loads(await response.read())
        async with http.get(f"{stub.http_url}/v1/status") as response:
            status = await response.json()
    assert sidecar["alg"] == "ed25519" and sidecar["key_id"] == stub.catalog_key_id
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(stub.catalog_public_key))
    public.verify(base64.b64decode(sidecar["signature"]), raw)
    with pytest.raises(InvalidSignature):
        public.verify(base64.b64decode(sidecar["signature"]), raw + b" ")
    feed = json.loads(raw)
    assert feed["source"] == "operator_curated_autotune_candidate_catalog"
    row = feed["rows"]["org/my-model"]
    assert (row["model_id"], row["model_sha256"]) == ("org/My-Model", expected_hash)
    fields = stub.catalog_fields("org/My-Model")
    assert fields is not None
    assert fields["catalog_candidate_sha256"] == hashlib.sha256(raw).hexdigest()
    assert fields["catalog_release_id"] == feed["version"]
    assert fields["catalog_signer_key_id"] == stub.catalog_key_id
    framed = "|".join(
        f"{len(v.encode())}:{v}"
        for v in (
            feed["policy_version"], "org/my-model", row["model_id"], row["model_revision"],
            row["model_sha256"], str(row["min_ram_gb"]), row["min_bandwidth_tier"],
            f"{row['bench_gate']['min_sustained_tps']:.6f}",
            str(row["bench_gate"]["max_4k_ttft_ms"]),
            row["runtime_status"],
        )
    )  # fmt: skip
    assert fields["catalog_row_identity"] == hashlib.sha256(framed.encode()).hexdigest()
    assert status["catalog"]["key_id"] == stub.catalog_key_id
    assert status["catalog"]["public_key"] == stub.catalog_public_key


async def test_no_catalog_serves_404(stub: CoordinatorStub) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stub.catalog_url) as response:
            assert response.status == 404
