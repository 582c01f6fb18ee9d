"""Provider frames under the coordinator's Go rules, and what the stub does with each failure.

The parsers (:mod:`coordinator_stub.frames`) are checked field by field for
Go's integer strictness; the endpoint is checked for Go's reaction to a bad
frame, which differs per message (drop, fence, close, fail a request).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from coordinator_stub import CoordinatorStub, frames
from coordinator_stub.frames import FrameError

from .conftest import ProviderFactory
from .scripted import ScriptedProvider

HELLO: dict[str, Any] = {
    "type": "hello", "version": 1, "tier": 1, "provider_id": "p1", "hostname": "h",
    "model_id": "m", "model_params_b": 1.5, "ram_gb": 16, "max_context_tokens": 4096,
    "max_concurrency": 4, "throughput_tps_estimate": 10, "binary_version": "1.8.123",
    "model_load_time_ms": 5,
}  # fmt: skip
AUTH: dict[str, Any] = {
    **{k: v for k, v in HELLO.items() if k not in ("type", "version", "tier")},
    "type": "auth_request", "version": 2, "stage": "initial",
    "provider_ecdh_public_key": "A" * 43,
    "tier2_capabilities": {"encrypted_leg": True, "aead_suites": ["A256GCM"]},
}  # fmt: skip
HEARTBEAT: dict[str, Any] = {
    "type": "heartbeat", "status": "ready", "model_id": "m", "model_params_b": 1,
    "ram_gb": 16, "max_context_tokens": 4096, "max_concurrency": 4, "slots_free": 4,
    "slots_total": 4, "throughput_tps_estimate": 1, "requests_served_since_last": 0,
    "avg_latency_ms_since_last": 0, "throughput_tps_since_last": 0,
}  # fmt: skip
TELEMETRY: dict[str, Any] = {
    "schema_version": 1, "provider_id": "p1", "model_id": "m", "model_loaded": True,
    "runtime_state": "ready", "hardware_tier": "m2", "requests_in_flight": 0,
    "requests_queued": 0, "memory_rss_mb": 1, "memory_capacity_mb": 2,
    "memory_pressure": "normal", "thermal_state": "nominal", "thermally_throttled": False,
    "restart_count": 0, "uptime_s": 1, "coordinator_connected": True,
    "observation_id": "o", "observed_at": "2026-01-01T00:00:00Z", "valid_for_ms": 1000,
}  # fmt: skip
ENC: dict[str, Any] = {"alg": "A256GCM", "seq": 0, "nonce": "", "aad": "", "ciphertext": "",
                       "tag": "", "kid": ""}  # fmt: skip

#: (parser, valid message, path of each Go ``int``/``int64`` field).
INT_FIELDS: list[tuple[Callable[[str], Any], dict[str, Any], list[tuple[str, ...]]]] = [
    (frames.parse_hello, HELLO, [("version",), ("tier",), ("ram_gb",), ("max_context_tokens",),
                                 ("max_concurrency",), ("model_load_time_ms",)]),
    (frames.parse_auth_request, AUTH, [("ram_gb",), ("max_context_tokens",),
                                       ("max_concurrency",), ("model_load_time_ms",)]),
    (frames.parse_heartbeat, HEARTBEAT, [("ram_gb",), ("max_context_tokens",),
                                         ("max_concurrency",), ("slots_free",), ("slots_total",),
                                         ("requests_served_since_last",)]),
    (frames.parse_heartbeat, {**HEARTBEAT, "safety_telemetry": TELEMETRY},
     [("safety_telemetry", name) for name in ("schema_version", "requests_in_flight",
      "requests_queued", "memory_rss_mb", "memory_capacity_mb", "restart_count", "uptime_s",
      "valid_for_ms")]),
    (frames.parse_state_update, {"type": "state_update", "state": "ready",
                                 "metrics_snapshot": {"slots_free": 1, "slots_total": 2}},
     [("metrics_snapshot", "slots_free"), ("metrics_snapshot", "slots_total")]),
    (frames.parse_preflight_ack, {"type": "preflight_ack", "request_id": "r", "accepted": True,
                                  "estimated_wait_ms": 1, "max_context_tokens": 2},
     [("estimated_wait_ms",), ("max_context_tokens",)]),
    (frames.parse_drain_status, {"type": "drain_status", "phase": "starting",
                                 "inflight_requests": 1, "estimated_drain_seconds": 2},
     [("inflight_requests",), ("estimated_drain_seconds",)]),
    (frames.parse_chunk, {"type": "inference_response_chunk", "request_id": "r", "seq": 0,
                          "data": "x"}, [("seq",)]),
    (frames.parse_end, {"type": "inference_response_end", "request_id": "r",
                        "status": "complete", "chunks_sent": 1,
                        "terminal_state_ts_unix_ms": 1, "receipt_pending_deadline_seconds": 2},
     [("chunks_sent",), ("terminal_state_ts_unix_ms",), ("receipt_pending_deadline_seconds",)]),
    (frames.parse_diagnostic_status, {"type": "diagnostic_status", "schema_version": 1,
                                      "provider_id": "p1", "assigned_id": "a", "status": "ready",
                                      "model_id": "m", "model_loaded": True},
     [("schema_version",)]),
    (frames.parse_rekey_response, {"type": "aead_rekey_response", "version": 1}, [("version",)]),
    (frames.parse_rekey_confirmation, {"type": "aead_rekey_committed", "version": 1,
                                       "enc": ENC}, [("version",)]),
]  # fmt: skip

CASES = [(parser, message, path) for parser, message, paths in INT_FIELDS for path in paths]


def _with(message: dict[str, Any], path: tuple[str, ...], literal: str) -> str:
    """``message`` as JSON with the value at ``path`` replaced by the raw ``literal``."""
    marker = "__INT_UNDER_TEST__"
    copied = copy.deepcopy(message)
    target = copied
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return json.dumps(copied).replace(f'"{marker}"', literal)


@pytest.mark.parametrize(("parser", "message", "path"), CASES)
def test_int_fields_take_integer_literals_only(
    parser: Callable[[str], Any], message: dict[str, Any], path: tuple[str, ...]
) -> None:
    value: Any = message
    for key in path:
        value = value[key]
    parser(_with(message, path, json.dumps(value)))
    for literal in (f"{value}.0", f"{value}e0", "2.5", "9223372036854775808", f'"{value}"', "true"):
        with pytest.raises(FrameError):
            parser(_with(message, path, literal))


def test_int_is_go_int64() -> None:
    huge = frames.parse_hello(_with(HELLO, ("ram_gb",), "9223372036854775807"))
    assert huge.ram_gb == 2**63 - 1
    assert frames.parse_hello(_with(HELLO, ("ram_gb",), "-9223372036854775808")).ram_gb == -(2**63)


def test_uint64_sequence_numbers() -> None:
    def envelope(seq: str) -> str:
        return _with({"type": "inference_response_chunk", "request_id": "r", "encrypted": True,
                      "enc": ENC}, ("enc", "seq"), seq)  # fmt: skip

    assert (
        frames.parse_response_envelope(envelope("18446744073709551615"), "x").enc.seq == 2**64 - 1
    )
    for bad in ("-1", "18446744073709551616", "1.0"):
        with pytest.raises(FrameError):
            frames.parse_response_envelope(envelope(bad), "x")


def test_float_fields_take_integers_and_finite_numbers() -> None:
    assert frames.parse_hello(_with(HELLO, ("model_params_b",), "2")).model_params_b == 2.0
    assert frames.parse_hello(_with(HELLO, ("model_params_b",), "1e2")).model_params_b == 100.0
    with pytest.raises(FrameError):
        frames.parse_hello(_with(HELLO, ("model_params_b",), "1e400"))
    with pytest.raises(FrameError):
        frames.parse_hello(_with(HELLO, ("model_params_b",), "NaN"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ram_gb": "1.0"}, "ram_gb"),
        ({"hostname": '"' + "h" * 254 + '"'}, "hostname"),
        ({"provider_id": '"bad id"'}, "provider_id"),
        ({"model_id": '"m\\u0085"'}, "model_id"),  # a C1 control character
        ({"binary_version": '"' + "1" * 33 + '"'}, "binary_version"),
        ({"credential_bootstrap": "null"}, "credential_bootstrap"),
        ({"catalog_release_id": '" "'}, "catalog_release_id"),
    ],
)
def test_hello_failures_name_the_field_like_go(change: dict[str, str], field: str) -> None:
    ((name, literal),) = change.items()
    with pytest.raises(FrameError) as info:
        frames.parse_hello(_with(HELLO, (name,), literal))
    assert info.value.field == field


def test_version_may_be_a_numeric_string_only_in_the_auth_handshake() -> None:
    assert frames.parse_first('{"type":"auth_request","version":"2"}') == ("auth_request", 2)
    for bad in ('"2.0"', '"two"', '""', "2.0"):
        with pytest.raises(FrameError):
            frames.parse_first(f'{{"type":"auth_request","version":{bad}}}')
    with pytest.raises(FrameError):
        frames.parse_hello(_with(HELLO, ("version",), '"1"'))


def test_heartbeat_drops_invalid_hardware_summary_silently() -> None:
    hb = frames.parse_heartbeat(
        json.dumps({**HEARTBEAT, "hardware_summary": {"chip": "M2", "bandwidth_gb_per_s": 1.5}})
    )
    assert hb.hardware_summary is None
    hb = frames.parse_heartbeat(
        json.dumps({**HEARTBEAT, "hardware_summary": {"chip": " M2 ", "gpu_cores_total": 10}})
    )
    assert hb.hardware_summary is not None and hb.hardware_summary.chip == "M2"


# ---------------------------------------------------------------------------
# What the endpoint does with each failure


async def _send(provider: ScriptedProvider, message: dict[str, Any] | str) -> None:
    assert provider.ws is not None
    await provider.ws.send(message if isinstance(message, str) else json.dumps(message))


async def test_bad_heartbeat_is_dropped_and_recorded(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
) -> None:
    await ready_provider.send(ready_provider.heartbeat())
    await stub.wait_for(lambda: stub.provider("p1").heartbeats == 1)  # type: ignore[union-attr]
    await ready_provider.send(ready_provider.heartbeat(loading=None))
    frame = await stub.wait_frame("p1", "heartbeat", where=lambda f: f.error is not None)
    assert frame.message is None and frame.action == "dropped"
    assert "loading" in (frame.error or "")
    await ready_provider.send(ready_provider.heartbeat(slots_free=1.0))
    await stub.wait_for(lambda: stub.provider("p1").invalid_frames == 2)  # type: ignore[union-attr]
    record = stub.provider("p1")
    assert record is not None and record.heartbeats == 1 and record.slots_free == 4


async def test_bad_model_hash_in_a_heartbeat_fences_the_session(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
) -> None:
    await ready_provider.send(
        ready_provider.heartbeat(
            model_hash="NOT-A-DIGEST", model_hash_algorithm="macprovider.snapshot-manifest.v1"
        )
    )
    await asyncio.wait_for(ready_provider.closed.wait(), 5)
    assert ready_provider.ws is not None
    assert (ready_provider.ws.close_code, ready_provider.ws.close_reason) == (
        4001,
        "invalid_model_hash_identity",
    )
    assert (await stub.wait_drop("p1")).cause == "fenced"


async def test_undecodable_frames_are_not_liveness(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
) -> None:
    session = stub.session("p1")
    assert session is not None
    before = session.last_liveness
    await _send(ready_provider, "[1, 2]")
    frame = await stub.wait_frame("p1", "<invalid>")
    assert frame.error is not None and session.last_liveness == before
    await _send(ready_provider, {"type": "no_such_message"})
    await stub.wait_frame("p1", "no_such_message")
    assert session.last_liveness > before  # well-formed: a sign of life


async def test_state_update_outside_the_enum_is_dropped(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
) -> None:
    await _send(ready_provider, {"type": "state_update", "state": "sleeping"})
    frame = await stub.wait_frame("p1", "state_update")
    assert frame.action == "dropped" and stub.state("p1") == "ready"


async def _hold_one_request(
    stub: CoordinatorStub, make_provider: ProviderFactory
) -> tuple[ScriptedProvider, asyncio.Task[tuple[int, str]], str]:
    provider = await make_provider(stub, hold=True)
    await stub.wait_provider_state("p1", "ready")

    async def buy() -> tuple[int, str]:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stub.http_url}/v1/chat/completions", json=body) as r:
                return r.status, await r.text()

    task = asyncio.create_task(buy())
    request = await provider.wait_buyer_request()
    return provider, task, request.request_id


async def test_nak_duplicate_request_id_fails_that_request(
    stub: CoordinatorStub, make_provider: ProviderFactory
) -> None:
    provider, buyer, rid = await _hold_one_request(stub, make_provider)
    error = {"code": "duplicate_request_id", "message": "seen"}
    await _send(provider, {"type": "nak", "in_reply_to": rid, "error": error})
    status, text = await buyer
    assert status == 502 and "nak_duplicate_request_id" in text
    assert stub.state("p1") == "ready" and stub.pool.routable(stub.provider("p1"))  # type: ignore[arg-type]


async def test_nak_unknown_message_type_takes_the_session_off_websocket_routing(
    stub: CoordinatorStub, make_provider: ProviderFactory
) -> None:
    provider, buyer, rid = await _hold_one_request(stub, make_provider)
    await _send(provider, {"type": "nak", "in_reply_to": rid,
                           "error": {"code": "unknown_message_type", "message": "?"}})  # fmt: skip
    assert (await buyer)[0] == 502
    status = next(p for p in stub.status()["providers"] if p["provider_id"] == "p1")
    assert (
        status["http_forwarding_only"] and "http_forwarding_only" in status["not_routable_reasons"]
    )


async def test_nak_with_another_code_is_only_logged(
    stub: CoordinatorStub, make_provider: ProviderFactory
) -> None:
    provider, buyer, rid = await _hold_one_request(stub, make_provider)
    error = {"code": "invalid_settlement_metadata", "message": "?"}
    await _send(provider, {"type": "nak", "in_reply_to": rid, "error": error})
    await stub.wait_frame("p1", "nak")
    assert rid in stub.in_flight
    provider.release()
    assert (await buyer)[0] == 200


async def test_drain_status_complete_closes_and_removes_at_once(
    stub: CoordinatorStub, ready_provider: ScriptedProvider
) -> None:
    await stub.drain("p1")
    await _send(ready_provider, {"type": "drain_status", "phase": "starting",
                                 "inflight_requests": 0, "estimated_drain_seconds": 3})  # fmt: skip
    await stub.wait_provider_state("p1", "draining")
    await _send(ready_provider, {"type": "drain_status", "phase": "complete",
                                 "inflight_requests": 0, "estimated_drain_seconds": 0})  # fmt: skip
    await asyncio.wait_for(ready_provider.closed.wait(), 5)
    assert ready_provider.ws is not None and ready_provider.ws.protocol.close_rcvd is None
    removal = await stub.wait_removed("p1")
    assert removal.cause == "drained"


async def test_first_frame_auth_version_string_routes_to_v2(stub: CoordinatorStub) -> None:
    async with connect(stub.ws_url, proxy=None) as ws:
        await ws.send(json.dumps({**AUTH, "version": "2", "provider_ecdh_public_key": "short"}))
        await ws.wait_closed()
        # Parsed as v2 (a numeric string is accepted), refused on the key exchange.
        assert (ws.close_code, ws.close_reason) == (4013, "tier2_key_exchange_failed")
