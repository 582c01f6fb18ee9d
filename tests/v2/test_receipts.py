"""Receipts v0.4 against the coordinator's vectors (testdata/spec015/v04_settlement_receipts.json).

The vectors were generated with the Ed25519 key of seed bytes 0..31
(phase7-verify/testdata/generator/v04), so the exact wire receipt is
reproducible here: same canonical tuple, same (deterministic) signature.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider.coordinator.canonical import canonical_json
from provider.coordinator.receipts import (
    Delivered,
    InvalidSettlement,
    ToolCall,
    build_receipt,
    normalize_content,
    output_hash,
    parse_settlement,
    public_key_bytes,
    receipt_key_id,
    receipt_tuple,
    settlement_usage,
    terminal_state,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEY_ID = "ed25519-sha256:56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
# receipt_tuple_v4_streaming_tool_call_nonzero_prefix: the tuple's canonical
# SHA-256 and the signature of its wire receipt.
TOOL_CALL_TUPLE_SHA256 = "a84a944be89a2eb2072968b8ff17288442126c2ccec9cc1f5cd9b64840cb49f6"
TOOL_CALL_SIGNATURE = (
    "8vaQgwo+JCP1hIHOZmceciCMh23jear4/ZUsUGPYTKMvuYWDSfypG/8SaccBa/rF2VqSslU21DEB9HEi/xSEDQ=="
)


def settlement(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "account_scope": "acct_scope_test_001",
        "request_id": "req_spec015_v04_chain_0001",
        "attempt_n": 1,
        "provider_id": "provider-mac-001",
        "provider_receipt_key_id": KEY_ID,
        "model_id": "mlx-community/Qwen3-32B-4bit",
        "expected_catalog_model_hash": "2" * 64,
        "catalog_id": "catalog-2026-06-30T00:00:00Z",
        "catalog_body_digest": "3" * 64,
        "route_snapshot_digest": (
            "4b2869c2ccc137cdef7bb283f51f2b90ffea979f0511b426d323e54663dca4e6"
        ),
        "route_snapshot_policy_version": "spec022-policy-v1",
        "route_snapshot_mode": "observe",
        "prompt_hash": "1" * 64,
        "output_prefix_start_byte": 13,
        "pending_deadline_seconds": 90,
    }
    return base | overrides


def parse(raw: dict[str, object]) -> object:
    return parse_settlement(
        raw,
        request_id="req_spec015_v04_chain_0001",
        provider_id="provider-mac-001",
        key_id=KEY_ID,
    )


def test_receipt_key_id_vector() -> None:
    public = public_key_bytes(KEY)
    assert base64.b64encode(public).decode() == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert receipt_key_id(public) == KEY_ID


@pytest.mark.parametrize(
    ("content", "finish", "state", "start", "sha"),
    [
        ("", "stop", "normal_done", 0,
         "80d91b27441b392460ec11bf47003e526525c582f40b7b32e05bd09ae4953981"),
        ("Final answer.", "stop", "normal_done", 0,
         "4cfc13ae12c1a1ee4446c2927d6975e0b4b8ff77fd894a60569af151f3a2bdd9"),
        ("Final answer.", None, "upstream_transport_disconnect", 0,
         "ca68aca25618c09d1c1c49f7dc3deb88b9ea3fd35a4f47fcc51d77f6713db167"),
        ("", None, "provider_error", 0,
         "7d9cae58c417d22280fad8fb571ee48a3a469676ea3ac8574a580747654856bd"),
        ("cancelled prefix", "stop", "buyer_cancel", 0,  # a cancel binds no finish reason
         "2b95dd19723677671469f99b582ca91965f9e2d6d22659de983853e73de2b3fa"),
        ("edge \U0001f9ea\u2028\u2029\u0001", None, "provider_error", 0,
         "b3c901ce42c46d2e0bc6652039d38cca873efa1463ec54f71e5ead9e2b914780"),
    ],
)  # fmt: skip
def test_output_hash_vectors(
    content: str, finish: str | None, state: str, start: int, sha: str
) -> None:
    delivered = Delivered(finish_reason=finish)
    delivered.add(content)
    assert output_hash(delivered, state, start) == sha  # type: ignore[arg-type]


def test_tool_call_vector_keeps_raw_arguments_and_nfc_content() -> None:
    delivered = Delivered(
        finish_reason="tool_calls",
        tool_calls=[ToolCall("call_1", "lookup", '{"query":"<tag>& Cafe\u0301"}')],
    )
    delivered.add("Use <tag>& Cafe\u0301.")
    assert (
        output_hash(delivered, "normal_done", 13)
        == "e9556ec858078c95388681b39a15aa3e57e657d0831ab1148d267dfbf34ac830"
    )


def test_the_whole_wire_receipt_is_reproduced() -> None:
    delivered = Delivered(
        finish_reason="tool_calls",
        tool_calls=[ToolCall("call_1", "lookup", '{"query":"<tag>& Cafe\u0301"}')],
    )
    delivered.add("Use <tag>& Cafe\u0301.")
    receipt = build_receipt(
        KEY,
        parse(settlement()),  # type: ignore[arg-type]
        model_hash="2" * 64,
        delivered=delivered,
        status="complete",
        prompt_tokens=8,
        completion_tokens=5,
        terminal_ts_ms=1782864001789,
        issued_at_ms=1782864001999,
    )
    encoded_tuple, signature = receipt.split(".")
    tuple_raw = base64.b64decode(encoded_tuple)
    assert hashlib.sha256(tuple_raw).hexdigest() == TOOL_CALL_TUPLE_SHA256
    assert signature == TOOL_CALL_SIGNATURE
    KEY.public_key().verify(base64.b64decode(signature), tuple_raw)


def test_newlines_then_nfc() -> None:
    assert normalize_content("a\r\nb\rc\nd") == "a\nb\nc\nd"
    assert normalize_content("e\u0301") == "\u00e9"


def test_usage_rules() -> None:
    assert settlement_usage("normal_done", 0, 8, 0)["billable_input_tokens"] == 8
    assert settlement_usage("buyer_cancel", 0, 8, 3) == {
        "billable_input_tokens": 0,
        "billable_output_tokens": 0,
        "delivered_output_bytes": 0,
        "observed_input_tokens": 8,
        "observed_output_tokens": 3,
    }
    partial = settlement_usage("provider_error", 7, 8, 4)
    assert partial["billable_output_tokens"] == 4 and partial["delivered_output_bytes"] == 7
    assert [terminal_state(s) for s in ("complete", "cancelled", "provider_timeout")] == [
        "normal_done",
        "buyer_cancel",
        "provider_error",
    ]


def test_tuple_has_exactly_the_verifiers_keys() -> None:
    value = receipt_tuple(
        parse(settlement()),  # type: ignore[arg-type]
        model_hash="2" * 64,
        delivered=Delivered(),
        state="buyer_cancel",
        prompt_tokens=1,
        completion_tokens=2,
        terminal_ts_ms=1,
        issued_at_ms=2,
    )
    assert sorted(value) == sorted(
        "account_scope attempt_n catalog_body_digest catalog_id expected_catalog_model_hash "
        "issued_at_unix_ms model_hash model_id output_hash output_prefix_end_byte "
        "output_prefix_start_byte prompt_hash provider_id provider_receipt_key_id "
        "receipt_version request_id route_snapshot_digest route_snapshot_mode "
        "route_snapshot_policy_version signature_key_alg terminal_state "
        "terminal_state_ts_unix_ms usage".split()
    )
    assert canonical_json(value) == canonical_json(dict(reversed(value.items())))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"attempt_n": 1.0}, "attempt_n"),
        ({"attempt_n": -1}, "attempt_n"),
        ({"prompt_hash": "F" * 64}, "prompt_hash"),
        ({"request_id": "req-other"}, "request_id"),
        ({"provider_id": "someone-else"}, "provider_id"),
        ({"provider_receipt_key_id": "ed25519-sha256:" + "0" * 64}, "provider_receipt_key_id"),
        ({"pending_deadline_seconds": "90"}, "pending_deadline_seconds"),
    ],
)
def test_bad_settlement_metadata_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSettlement, match=field):
        parse(settlement(**change))
    missing = settlement()
    del missing["catalog_id"]
    with pytest.raises(InvalidSettlement, match="catalog_id"):
        parse(missing)


def test_no_receipt_for_another_model_hash() -> None:
    with pytest.raises(ValueError, match="expected_catalog_model_hash"):
        build_receipt(
            KEY,
            parse(settlement()),  # type: ignore[arg-type]
            model_hash="5" * 64,
            delivered=Delivered(),
            status="complete",
            prompt_tokens=1,
            completion_tokens=1,
            terminal_ts_ms=1,
            issued_at_ms=1,
        )
