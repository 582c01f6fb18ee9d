"""The real provider agent against the scripted v2 coordinator, over real sockets.

Bootstrap -> persisted token -> reconnect with Bearer; self-mint -> reconnect;
challenge/proof/accept with the identity signature; encrypted requests in,
sealed chunks and end out (streaming, non-streaming, cancelled), with a
receipt when the request carries settlement metadata; a nak for a bad
envelope; in-band rekey; a coordinator drain followed by a reconnect; catalog
admission from the signed feed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider import agent as agent_module
from provider.config import Config
from provider.coordinator import session as session_module
from tests.session.conftest import running
from tests.session.scripted_engine import ScriptedEngine

from .scripted_coordinator import (
    ScriptedCoordinator,
    output_hash_of,
    verify_receipt,
)

BOOTSTRAP_ID = "mp-" + "ab" * 16


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "TOKEN_UPGRADE_GRACE_S", 0.05)
    monkeypatch.setattr(session_module, "REKEY_CHECK_S", 0.05)
    monkeypatch.setattr(agent_module, "COORDINATOR_DRAIN_RECONNECT_S", 0.2)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory the agent can hash (the scripted engine ignores it)."""
    root = tmp_path / "tiny-model"
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return root


def config(coordinator: ScriptedCoordinator, model: Path, **overrides: Any) -> Config:
    base: dict[str, Any] = {
        "coordinator_url": coordinator.ws_url,
        "provider_id": "prov-v2",
        "provider_token": "tok",
        "model": str(model),
        "status_port": 0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "catalog_feed_url": "off",
    }
    return msgspec.convert(base | overrides, Config)


def body(text: str = "hi", *, stream: bool = False, max_tokens: int = 6) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "stream": stream}
    out["max_tokens"] = max_tokens
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def settlement(conn: Any, request_id: str, model_hash: str) -> dict[str, Any]:
    pub = base64.b64decode(conn.initial["provider_receipt_public_key"])
    return {
        "account_scope": "acct-1",
        "request_id": request_id,
        "attempt_n": 0,
        "provider_id": conn.provider_id,
        "provider_receipt_key_id": "ed25519-sha256:" + hashlib.sha256(pub).hexdigest(),
        "model_id": conn.initial["model_id"],
        "expected_catalog_model_hash": model_hash,
        "catalog_id": "catalog-1",
        "catalog_body_digest": "3" * 64,
        "route_snapshot_digest": "4" * 64,
        "route_snapshot_policy_version": "spec022-policy-v1",
        "route_snapshot_mode": "enforce",
        "prompt_hash": "1" * 64,
        "output_prefix_start_byte": 0,
        "pending_deadline_seconds": 90,
    }


def content_of(chunks: list[str], stream: bool) -> str:
    if not stream:
        return json.loads(chunks[0])["choices"][0]["message"]["content"]
    text = ""
    for chunk in chunks:
        for line in chunk.split("\n\n"):
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


async def test_bearer_session_encrypted_requests_and_receipts(model_dir: Path) -> None:
    async with ScriptedCoordinator(tokens={"tok"}, require_identity_signature=True) as coord:
        engine = ScriptedEngine(tokens=6, step_s=0.002)
        async with running(config(coord, model_dir), engine) as run:
            conn = await coord.wait_conn(1)
            assert conn.authorization == "Bearer tok"
            initial = conn.initial
            assert initial["tier2_capabilities"]["response_chunk_plaintext_envelope"] is True
            assert initial["tier2_capabilities"]["in_band_aead_rekey_v1"] is True
            assert initial["model_hash_algorithm"] == "macprovider.snapshot-manifest.v1"
            model_hash = initial["model_hash"]
            assert model_hash == run.agent.model_hash and len(model_hash) == 64
            # The first frame after acceptance is the state_update that commits the key.
            first = await conn.next()
            assert first["type"] == "state_update"
            beat = await conn.next("heartbeat")
            assert beat["model_hash"] == model_hash
            for stream in (False, True):
                rid = f"req-{stream}"
                await conn.send_request(
                    rid, body(stream=stream), stream=stream,
                    settlement=settlement(conn, rid, model_hash),
                )  # fmt: skip
                chunks, end = await conn.collect(rid)
                assert end["status"] == "complete" and end["chunks_sent"] == len(chunks)
                assert end["usage"]["macprovider_model_hash_observed"] == model_hash
                assert end["receipt_pending_deadline_seconds"] == 90
                assert end["late_receipt_settlement"] == "not_settled"
                receipt = verify_receipt(conn, end["receipt"])
                delivered = content_of(chunks, stream)
                digest, stop = output_hash_of(delivered, "length", "normal_done", 0)
                assert receipt["output_hash"] == digest
                assert receipt["output_prefix_end_byte"] == stop
                assert receipt["terminal_state_ts_unix_ms"] == end["terminal_state_ts_unix_ms"]
                assert receipt["usage"]["observed_output_tokens"] == 6
                assert receipt["model_hash"] == model_hash
            assert conn.violations == []
            assert await run.stop() == 0


async def test_cancel_bad_envelope_and_bad_settlement(model_dir: Path) -> None:
    async with ScriptedCoordinator(tokens={"tok"}) as coord:
        engine = ScriptedEngine(tokens=10_000, step_s=0.005)
        async with running(config(coord, model_dir), engine) as run:
            conn = await coord.wait_conn(1)
            model_hash = conn.initial["model_hash"]
            await conn.send_request(
                "req-c", body(stream=True, max_tokens=10_000), stream=True,
                settlement=settlement(conn, "req-c", model_hash),
            )  # fmt: skip
            first = await conn.next("inference_response_chunk")
            await conn.send({"type": "cancel_request", "request_id": "req-c",
                             "reason": "buyer_disconnected"})  # fmt: skip
            chunks, end = await conn.collect("req-c")
            chunks.insert(0, first["data"])
            assert end["status"] == "cancelled" and end["usage"]["completion_tokens"] > 0
            receipt = verify_receipt(conn, end["receipt"])
            assert receipt["terminal_state"] == "buyer_cancel"
            prefix = content_of(chunks, True)
            assert receipt["output_hash"] == output_hash_of(prefix, None, "buyer_cancel", 0)[0]
            # A settlement that names another receipt key is refused, by request id.
            bad = settlement(conn, "req-s", model_hash) | {"provider_receipt_key_id": "x"}
            await conn.send_request("req-s", body(), settlement=bad)
            nak = await conn.next("nak")
            assert nak["in_reply_to"] == "req-s"
            assert nak["error"]["code"] == "invalid_settlement_metadata"
            # A request that does not decrypt: nak naming the request (the real
            # coordinator then closes the encrypted session).
            await conn.send_request("req-t", body(), tamper=True)
            nak = await conn.next("nak")
            assert (nak["in_reply_to"], nak["error"]["code"]) == (
                "req-t", "tier2_aead_decrypt_failed",
            )  # fmt: skip
            # An optional message type we do not know is ignored, never nak'd.
            await conn.send({"type": "native_mtp_canary_request", "request_id": "m1"})
            await conn.send_request("req-ok", body())
            _, end = await conn.collect("req-ok")
            assert end["status"] == "complete"
            assert all(f["type"] != "nak" or f["in_reply_to"] != "m1" for f in conn.log)
            assert conn.violations == []
            assert await run.stop() == 0


async def test_in_band_rekey_then_requests_on_the_new_keys(model_dir: Path) -> None:
    async with ScriptedCoordinator(tokens={"tok"}) as coord:
        async with running(config(coord, model_dir), ScriptedEngine(tokens=3)) as run:
            conn = await coord.wait_conn(1)
            await conn.send_request("before", body())
            await conn.collect("before")
            old_kid = conn.keys["kid"]
            await coord.rekey(conn)
            assert conn.keys["kid"] != old_kid == conn.response["tier2_session"][
                "encrypted_leg"]["kid"]  # fmt: skip
            for i in range(3):
                await conn.send_request(f"after-{i}", body(stream=True), stream=True)
                _, end = await conn.collect(f"after-{i}")
                assert end["status"] == "complete"
            assert run.session is not None and run.session.leg.kid == conn.keys["kid"]
            assert conn.violations == []
            assert await run.stop() == 0


async def test_without_in_band_rekey_the_threshold_is_a_reconnect(model_dir: Path) -> None:
    async with ScriptedCoordinator(
        tokens={"tok"}, in_band_rekey=False, rekey_after_requests=2
    ) as coord:
        async with running(config(coord, model_dir), ScriptedEngine(tokens=2)) as run:
            conn = await coord.wait_conn(1)
            for i in range(2):
                await conn.send_request(f"r{i}", body())
                await conn.collect(f"r{i}")
            again = await coord.wait_conn(2)
            assert conn.closed.is_set() and conn.close_code == 1000
            assert again.keys["kid"] != conn.keys["kid"]
            assert await run.stop() == 0


async def test_bootstrap_persists_the_token_then_reconnects_with_bearer(
    model_dir: Path, tmp_path: Path
) -> None:
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text("")
    async with ScriptedCoordinator() as coord:
        cfg = config(coord, model_dir, provider_token=None, provider_id=BOOTSTRAP_ID,
                     referral_code="REF-1")  # fmt: skip
        async with running(cfg, ScriptedEngine(), config_path=cfg_file) as run:
            first = await coord.wait_conn(1)
            assert first.authorization is None  # no token, no header at all
            assert first.initial["credential_bootstrap"] is True
            assert first.initial["referral_code"] == first.proof["referral_code"] == "REF-1"
            assert first.proof["credential_bootstrap"] is True
            second = await coord.wait_conn(2)
            token = coord.minted[0]
            assert second.authorization == f"Bearer {token}"
            assert second.response["auth_state"] == "bearer_validated"
            assert token in cfg_file.read_text()
            assert stat.S_IMODE(os.stat(cfg_file).st_mode) == 0o600
            # The same receipt key on both connections, kept in the config dir, 0600.
            assert (
                first.initial["provider_receipt_public_key"]
                == second.initial["provider_receipt_public_key"]
            )
            key_file = run.agent.keys.directory / "receipt.ed25519"
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert first.violations == second.violations == []
            assert await run.stop() == 0


async def test_self_mint_then_reconnect_with_the_minted_token(model_dir: Path) -> None:
    async with ScriptedCoordinator() as coord:
        cfg = config(coord, model_dir, provider_token=None, provider_id="owner-named")
        async with running(cfg, ScriptedEngine()) as run:
            first = await coord.wait_conn(1)
            assert first.response["auth_state"] == "self_minted"
            assert "credential_bootstrap" not in first.initial
            await first.closed.wait()
            assert first.close_code == 1000  # we closed it, to come back with Bearer
            second = await coord.wait_conn(2)
            assert second.authorization == f"Bearer {coord.minted[0]}"
            assert run.agent.token == coord.minted[0]
            assert await run.stop() == 0


async def test_rejection_is_logged_and_its_close_code_decides(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "version_unsupported: binary_version 0.1.0 below required 1.8.33"
    refusal = ("version_unsupported", 4004, reason)
    async with ScriptedCoordinator(tokens={"tok"}, reject=refusal) as c:
        async with running(config(c, model_dir), ScriptedEngine()) as run:
            assert await asyncio.wait_for(run.task, 10) == 0
        assert "1.8.33" in run.agent.exit_reason
        assert "advertised_binary_version" in run.agent.exit_reason
        assert "auth_response rejected: version_unsupported" in caplog.text
        record = json.loads((run.agent.keys.directory / "last-refusal.json").read_text())
        assert record["close_code"] == 4004 and "1.8.33" in record["reason"]


async def test_coordinator_drain_then_reconnect(model_dir: Path) -> None:
    async with ScriptedCoordinator(tokens={"tok"}) as coord:
        async with running(config(coord, model_dir), ScriptedEngine(tokens=40, step_s=0.01)) as run:
            conn = await coord.wait_conn(1)
            await conn.send_request("busy", body(max_tokens=40))
            await conn.next("inference_response_chunk", "state_update")
            await conn.send({"type": "drain"})
            _, end = await conn.collect("busy")
            assert end["status"] == "complete"  # the job in flight finishes
            await conn.closed.wait()
            phases = [f["phase"] for f in conn.log if f["type"] == "drain_status"]
            assert phases[0] == "starting" and phases[-1] == "complete"
            again = await coord.wait_conn(2)
            await again.next("heartbeat")
            assert not run.task.done() and run.agent.state.state == "ready"
            assert await run.stop() == 0


async def test_catalog_admission_from_the_signed_feed(model_dir: Path) -> None:
    signer = Ed25519PrivateKey.generate()
    public = base64.b64encode(signer.public_key().public_bytes_raw()).decode()
    feed = json.dumps({
        "version": "rel-7", "policy_version": "p1",
        "rows": {"tiny": {"model_id": model_dir.name, "model_sha256": "f" * 64,
                          "min_ram_gb": 1, "min_bandwidth_tier": "C",
                          "bench_gate": {"min_sustained_tps": 1.5, "max_4k_ttft_ms": 9},
                          "runtime_status": "recommendable"}},
    }).encode()  # fmt: skip
    sig = json.dumps(
        {
            "key_id": "k1",
            "alg": "ed25519",
            "signature": base64.b64encode(signer.sign(feed)).decode(),
        }
    ).encode()
    async with ScriptedCoordinator(tokens={"tok"}, feed=(feed, sig)) as coord:
        cfg = config(coord, model_dir, catalog_feed_url=None, catalog_public_keys={"k1": public})
        async with running(cfg, ScriptedEngine()) as run:
            conn = await coord.wait_conn(1)
            fields = {k: v for k, v in conn.initial.items() if k.startswith("catalog_")}
            assert fields["catalog_release_id"] == "rel-7"
            assert fields["catalog_candidate_sha256"] == hashlib.sha256(feed).hexdigest()
            assert fields["catalog_signer_key_id"] == "k1" and len(fields) == 5
            status = run.agent.admission_status()
            assert status["catalog"]["hash_matches"] is False  # our hash is not "fff..."
            assert status["routable_model_hash"] is False
            assert await run.stop() == 0
