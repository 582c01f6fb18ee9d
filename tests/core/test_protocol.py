"""Wire types: every message round-trips, bad frames decode to Invalid naming the field."""

from __future__ import annotations

import json

import msgspec
import pytest

from provider.coordinator import messages as p
from provider.openai.request import BadRequest, decode_chat_request

PROVIDER_MESSAGES: list[msgspec.Struct] = [
    p.Hello(
        provider_id="prov-1",
        hostname="mac.local",
        model_id="m",
        model_params_b=0.03,
        ram_gb=24,
        max_context_tokens=4096,
        max_concurrency=4,
        throughput_tps_estimate=55.5,
        binary_version="0.1.0",
        attestation=None,
        model_hash="ab" * 32,
        model_hash_algorithm="macprovider.snapshot-manifest.v1",
        model_load_time_ms=12,
        supported_models=["m"],
    ),
    p.Heartbeat(
        status="ready",
        model_id="m",
        model_params_b=0.03,
        ram_gb=24,
        max_context_tokens=4096,
        max_concurrency=4,
        slots_free=3,
        slots_total=4,
        throughput_tps_estimate=50.0,
        requests_served_since_last=2,
        avg_latency_ms_since_last=120.5,
        throughput_tps_since_last=48.0,
        loading=False,
        hardware_summary=p.HardwareSummary(chip="M2", cpu_cores_total=8),
        service_instance_id="x",
    ),
    p.StateUpdate(
        state="busy",
        reason="all_slots_busy",
        since="2026-11-21T05:00:00.000+00:00",
        metrics_snapshot=p.MetricsSnapshot(slots_free=0, slots_total=1),
    ),
    p.InferenceResponseChunk(request_id="r1", seq=0, data='data: {"x":1}\n\n'),
    p.InferenceResponseEnd(
        request_id="r1",
        status="complete",
        chunks_sent=3,
        usage=p.EndUsage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        terminal_state_ts_unix_ms=1,
    ),
    p.PreflightAck(request_id="r2", accepted=False, reason="queue_full", max_context_tokens=9),
    p.DrainStatus(phase="in_progress", inflight_requests=2, estimated_drain_seconds=2),
    p.Nak(in_reply_to="bogus", error=p.NakError(code="unknown_message_type", message="?")),
]
COORDINATOR_MESSAGES: list[msgspec.Struct] = [
    p.HelloAck(
        coordinator_version=1,
        assigned_id="a",
        heartbeat_interval_s=30,
        tier="std",
        assigned_provider_token="tok",
    ),
    p.InferenceRequest(request_id="r1", stream=True, body='{"messages":[]}'),
    p.CancelRequest(request_id="r1", reason="buyer_disconnected"),
    p.Drain(),
    p.WarmUp(),
    p.Preflight(request_id="r3", estimated_tokens=100),
]


@pytest.mark.parametrize("msg", PROVIDER_MESSAGES, ids=lambda m: p.message_type(m))
def test_provider_messages_round_trip(msg: msgspec.Struct) -> None:
    data = p.encode(msg)
    assert json.loads(data)["type"] == p.message_type(msg)
    assert p.decode_provider_frame(data) == msg
    assert p.encode(p.decode_provider_frame(data)) == data  # byte-for-byte stable


@pytest.mark.parametrize("msg", COORDINATOR_MESSAGES, ids=lambda m: p.message_type(m))
def test_coordinator_messages_round_trip(msg: msgspec.Struct) -> None:
    data = p.encode(msg)
    assert p.decode_coordinator_frame(data) == msg
    assert p.decode_coordinator_frame(data.decode()) == msg


def test_hello_carries_required_fields_even_at_defaults() -> None:
    hello = json.loads(p.encode(PROVIDER_MESSAGES[0]))
    assert hello["version"] == 1 and hello["tier"] == 1 and hello["attestation"] is None


def test_malformed_frame_names_the_field() -> None:
    bad = b'{"type":"inference_request","request_id":"r","stream":"yes","body":"{}"}'
    got = p.decode_coordinator_frame(bad)
    assert isinstance(got, p.Invalid)
    assert got.code == "malformed_message" and got.type == "inference_request"
    assert "$.stream" in got.message


def test_missing_field_is_named() -> None:
    got = p.decode_coordinator_frame(b'{"type":"cancel_request"}')
    assert isinstance(got, p.Invalid) and "request_id" in got.message


def test_unknown_type_is_nakable_not_an_exception() -> None:
    got = p.decode_coordinator_frame(b'{"type":"teleport","where":"mars"}')
    assert got == p.Invalid("unknown_message_type", "teleport", "unknown message type 'teleport'")


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[]", b"null", b'{"no_type":1}', b"{" * 5000])
def test_garbage_is_malformed(raw: bytes) -> None:
    got = p.decode_coordinator_frame(raw)
    assert isinstance(got, p.Invalid) and got.code == "malformed_message"


def test_byte_limits_count_bytes_not_characters() -> None:
    base = PROVIDER_MESSAGES[0]
    ok = msgspec.structs.replace(base, hostname="é" * 126)  # 252 bytes
    assert p.decode_provider_frame(p.encode(ok)) == ok
    too_long = json.loads(p.encode(base))
    too_long["hostname"] = "é" * 127  # 254 bytes
    got = p.decode_provider_frame(json.dumps(too_long))
    assert isinstance(got, p.Invalid) and "hostname" in got.message


def test_chat_request_limits() -> None:
    ok = decode_chat_request(
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],'
        b'"max_completion_tokens":5,"stop":"x","stream":true,'
        b'"stream_options":{"include_usage":true}}'
    )
    assert ok.messages[0].text() == "hi" and ok.token_limit() == 5
    assert ok.stop_list() == ["x"] and ok.include_usage()
    for body, field in [
        (b'{"messages":[]}', "$.messages"),
        (b'{"messages":[{"role":"user","content":"x"}],"unknown_field":1}', "$.unknown_field"),
        (b'{"messages":[{"role":"user","content":"x"}],"n":2}', "$.n"),
        (b'{"messages":[{"role":"user","content":"x"}],"temperature":3}', "$.temperature"),
        (b'{"messages":[{"role":"robot","content":"x"}]}', "$.messages[0].role"),
        (b'{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}', "$.stop"),
        (b'{"messages":[{"role":"user","content":"x"}],"max_tokens":0}', "$.max_tokens"),
    ]:
        with pytest.raises(BadRequest, match=field.replace("$", r"\$").replace("[", r"\[")):
            decode_chat_request(body)
    with pytest.raises(BadRequest, match="malformed"):  # NaN is not JSON
        decode_chat_request(b'{"messages":[{"role":"user","content":"x"}],"temperature":NaN}')


def test_chat_request_nan_rejected() -> None:
    req = msgspec.json.encode({"messages": [{"role": "user", "content": "x"}], "top_p": 0.5})
    assert decode_chat_request(req).top_p == 0.5
