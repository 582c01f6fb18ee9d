"""Every integer field of every outbound message is a JSON integer (COORDINATOR.md 10.3).

The coordinator decodes with Go's encoding/json, which refuses ``1.0`` or
``1e3`` in an ``int``: a ``drain_status`` with ``estimated_drain_seconds:
12.346`` is dropped whole. Each message here is built by the code that sends
it (the agent, the session, the relay's end frame, the v2 handshake), encoded
by the real encoder, and walked along the Go types' int fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from provider.agent import Agent
from provider.config import Config
from provider.coordinator import tier2
from provider.coordinator.jobs import Job, Outcome, end_frame
from provider.coordinator.messages import (
    AeadRekeyCommitted,
    AeadRekeyResponse,
    AuthRequestProof,
    EncryptedChunk,
    InferenceResponseChunk,
    Nak,
    NakError,
    Preflight,
    encode,
)
from provider.coordinator.receipts import Settlement
from provider.coordinator.session import Session
from provider.engine import ModelInfo
from tests.session.scripted_engine import ScriptedEngine

#: message -> dotted paths of its Go int / int64 / uint64 fields.
GO_INT_FIELDS: dict[str, list[str]] = {
    "hello": ["version", "tier", "ram_gb", "max_context_tokens", "max_concurrency",
              "model_load_time_ms"],
    "auth_request/initial": ["version", "ram_gb", "max_context_tokens", "max_concurrency",
                             "model_load_time_ms"],
    "auth_request/proof": ["version"],
    "heartbeat": ["ram_gb", "max_context_tokens", "max_concurrency", "slots_free",
                  "slots_total", "requests_served_since_last",
                  "hardware_summary.bandwidth_gb_per_s", "hardware_summary.gpu_cores_total",
                  "hardware_summary.cpu_cores_total"],
    "state_update": ["metrics_snapshot.slots_free", "metrics_snapshot.slots_total"],
    "drain_status": ["inflight_requests", "estimated_drain_seconds"],
    "preflight_ack": ["estimated_wait_ms", "max_context_tokens"],
    "inference_response_chunk": ["seq"],
    "inference_response_end": ["chunks_sent", "terminal_state_ts_unix_ms",
                               "receipt_pending_deadline_seconds", "usage.prompt_tokens",
                               "usage.completion_tokens", "usage.total_tokens"],
    "encrypted": ["enc.seq"],
    "aead_rekey_response": ["version"],
    "aead_rekey_committed": ["version", "enc.seq"],
}  # fmt: skip


def check(kind: str, data: bytes) -> int:
    """Assert every present int field of ``kind`` is an int; returns how many were seen."""
    obj = json.loads(data)
    seen = 0
    for path in GO_INT_FIELDS[kind]:
        value: Any = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        assert type(value) is int, f"{kind}.{path} = {value!r} is not a JSON integer"
        seen += 1
    return seen


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    config = msgspec.convert(
        {
            "coordinator_url": "ws://127.0.0.1:9/ws/provider",
            "provider_id": "prov-int",
            "model": str(tmp_path / "m"),
            "max_concurrency": 3,
        },
        Config,
    )
    engine = ScriptedEngine()
    engine._info = ModelInfo("m", 0.03, 4096, 1234, 55.5)
    return Agent(config, engine)


async def test_registration_and_heartbeat(agent: Agent) -> None:
    await agent._compute_identity()
    assert agent.identity is not None
    assert check("hello", encode(agent.hello_message())) == 6
    initial = agent.auth_initial(tier2.b64url(b"\x01" * 32), bootstrap=False)
    assert check("auth_request/initial", encode(initial)) == 5
    proof = AuthRequestProof(auth_attempt_id="a", provider_id="prov-int")
    assert check("auth_request/proof", encode(proof)) == 1
    assert check("heartbeat", encode(agent.heartbeat_message())) >= 6
    # Floats where Go has float64, whole numbers included.
    beat = json.loads(encode(agent.heartbeat_message()))
    assert isinstance(beat["model_params_b"], float)


def _session(agent: Agent) -> Session:
    session = Session(agent)
    session.sender = SimpleNamespace(post=lambda msg: None)  # type: ignore[assignment]
    return session


async def test_drain_status_estimates_are_whole_seconds(agent: Agent) -> None:
    session = _session(agent)
    job = Job(request_id="r", stream=False)
    job.token_limit, job.completion_tokens = 100, 2  # 98 tokens / 55.5 tok/s = 1.77 s
    session.jobs.add(job)
    status = session._drain_status("in_progress")
    assert check("drain_status", encode(status)) == 2
    assert status.estimated_drain_seconds == 2


async def test_preflight_state_and_relay_frames(agent: Agent) -> None:
    session = _session(agent)
    ack = session._preflight_ack(Preflight(request_id="p", estimated_tokens=10))
    assert check("preflight_ack", encode(ack)) == 2
    agent._publish(agent.state.registered(), force=True)  # no session: nothing sent
    chunk = InferenceResponseChunk(request_id="r", seq=3, data="x")
    assert check("inference_response_chunk", encode(chunk)) == 1
    job = Job(request_id="r", stream=True)
    job.prompt_tokens, job.completion_tokens, job.chunks_sent = 5, 7, 2
    job.settlement = msgspec.convert(
        {
            "account_scope": "a", "request_id": "r", "attempt_n": 0, "provider_id": "p",
            "provider_receipt_key_id": "k", "model_id": "m", "expected_catalog_model_hash": "0",
            "catalog_id": "c", "catalog_body_digest": "d", "route_snapshot_digest": "r",
            "route_snapshot_policy_version": "v", "route_snapshot_mode": "observe",
            "prompt_hash": "h", "output_prefix_start_byte": 0, "pending_deadline_seconds": 90,
        },
        Settlement,
    )  # fmt: skip
    end = end_frame(job, Outcome("complete"), model_hash="f" * 64, receipt="x.y")
    assert check("inference_response_end", encode(end)) == 6


async def test_encrypted_and_rekey_frames() -> None:
    keys = tier2.derive_keys(b"\x01" * 32, "p", "s", b"\x02" * 32, b"\x03" * 32)
    leg = tier2.EncryptedLeg(keys, "p", "s", chunk_envelope=True)
    for _ in range(3):
        enc = leg.seal("inference_response_chunk", "r", True, leg.chunk_plaintext(0, "x"))
    assert check("encrypted", encode(EncryptedChunk(request_id="r", enc=enc))) == 1
    plaintext = json.loads(leg.chunk_plaintext(7, "d"))
    assert type(plaintext["seq"]) is int
    response = AeadRekeyResponse(
        rekey_id="k", assigned_id="s", old_kid="a", new_kid="b", provider_ecdh_public_key="x"
    )
    assert check("aead_rekey_response", encode(response)) == 1
    committed = AeadRekeyCommitted(rekey_id="k", assigned_id="s", old_kid="a", new_kid="b", enc=enc)
    assert check("aead_rekey_committed", encode(committed)) == 2


def test_nak_names_the_request() -> None:
    nak = json.loads(encode(Nak(in_reply_to="req-1", error=NakError(code="x", message="y"))))
    assert nak["in_reply_to"] == "req-1"
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"type":"nak","in_reply_to":"","error":{"code":"x","message":""}}',
                            type=Nak)  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "in_reply_to"),
    [
        (b'{"type":"inference_request","request_id":"req-9","stream":"yes"}', "req-9"),
        (b'{"type":"preflight","request_id":"pf-1"}', "pf-1"),
        (b'{"type":"cancel_request","request_id":7}', "cancel_request"),
        (b'{"type":"drain","extra":1, "x": }', "unknown"),
        (b"not json", "unknown"),
    ],
)
def test_a_nak_replies_to_the_request_id_when_there_is_one(frame: bytes, in_reply_to: str) -> None:
    from provider.coordinator.messages import Invalid, decode_coordinator_frame

    invalid = decode_coordinator_frame(frame)
    assert isinstance(invalid, Invalid) and invalid.code == "malformed_message"
    assert invalid.in_reply_to == in_reply_to
