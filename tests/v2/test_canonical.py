"""Canonical JSON against the coordinator's own vectors (testdata/spec015) and RFC 8785."""

from __future__ import annotations

import base64
import hashlib
import json
import math

import pytest

from provider.coordinator.canonical import (
    CanonicalJSONError,
    RawString,
    canonical_json,
    canonical_sha256,
)

# testdata/spec015/v04_settlement_receipts.json: settlement_output_parity_edge_cases.
EDGE_OUTPUT = {
    "content": "edge \U0001f9ea\u2028\u2029\u0001",
    "finish_reason": None,
    "output_prefix_end_byte": 16,
    "output_prefix_start_byte": 0,
    "terminal_state": "provider_error",
    "tool_calls": None,
}
EDGE_CANONICAL_B64 = (
    "eyJjb250ZW50IjoiZWRnZSDwn6eq4oCo4oCpXHUwMDAxIiwiZmluaXNoX3JlYXNvbiI6bnVsbCwib3V0cHV0X3By"
    "ZWZpeF9lbmRfYnl0ZSI6MTYsIm91dHB1dF9wcmVmaXhfc3RhcnRfYnl0ZSI6MCwidGVybWluYWxfc3RhdGUiOiJw"
    "cm92aWRlcl9lcnJvciIsInRvb2xfY2FsbHMiOm51bGx9"
)


def test_coordinator_vector_with_control_and_line_separators() -> None:
    raw = canonical_json(EDGE_OUTPUT)
    assert raw == base64.b64decode(EDGE_CANONICAL_B64)
    assert (
        hashlib.sha256(raw).hexdigest()
        == "b3c901ce42c46d2e0bc6652039d38cca873efa1463ec54f71e5ead9e2b914780"
    )


def test_coordinator_vector_int64_edges() -> None:
    usage = {
        "billable_input_tokens": 0,
        "billable_output_tokens": 0,
        "delivered_output_bytes": 0,
        "observed_input_tokens": 9007199254740993,
        "observed_output_tokens": 9223372036854775807,
    }
    assert (
        canonical_sha256(usage)
        == "44dda78f7545f5e50143436c6057fce7d211474de81872a36a4aa0ee2affbc38"
    )
    with pytest.raises(CanonicalJSONError):
        canonical_json({"x": 2**63})


def test_route_snapshot_vector_many_keys() -> None:
    # testdata/spec015: route_snapshot_v1_normal_done (25 keys, sorted by JCS).
    snapshot = {
        "account_scope": "acct_scope_test_001",
        "attempt_n": 0,
        "catalog_body_digest": "3" * 64,
        "catalog_expires_at_unix_ms": 1782950400000,
        "catalog_id": "catalog-2026-06-30T00:00:00Z",
        "catalog_signature_key_id": "catalog-key-2026-06",
        "catalog_signature_pubkey_fingerprint": "ed25519-sha256:" + "4" * 64,
        "expected_catalog_model_hash": "2" * 64,
        "model_id": "mlx-community/Qwen3-32B-4bit",
        "paid_entrypoint": "openai-chat-completions",
        "pending_deadline_seconds": 90,
        "prompt_hash": "1" * 64,
        "prompt_hash_basis": "coordinator-openai-chat-v1",
        "provider_generation_id": "generation-42",
        "provider_id": "provider-mac-001",
        "provider_receipt_key_id": (
            "ed25519-sha256:56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
        ),
        "provider_receipt_key_source": "auth_session",
        "provider_reported_model_hash": "2" * 64,
        "provider_session_id": "session-spec015-v04",
        "request_id": "req_spec015_v04_normal_nonzero",
        "request_start_ts_unix_ms": 1782864000456,
        "route_decision_ts_unix_ms": 1782864000123,
        "route_snapshot_mode": "observe",
        "route_snapshot_policy_version": "spec022-policy-v1",
        "spec008_hash_status": "verified",
    }
    shuffled = dict(reversed(list(snapshot.items())))
    assert (
        canonical_sha256(shuffled)
        == "34d81c152767aa26215a6562805c7170b9e55e0dd151771cd353a32dcf2c17f4"
    )


def test_values_are_nfc_keys_are_not_raw_strings_are_not() -> None:
    decomposed = "Cafe\u0301"
    out = canonical_json({decomposed: decomposed, "raw": RawString(decomposed)}).decode()
    assert out == '{"Cafe\u0301":"Caf\u00e9","raw":"Cafe\u0301"}'


def test_escapes_and_what_stays_raw() -> None:
    text = '"\\\b\t\n\f\r\x00\x1f\x7f/<>&\u2028é😀'
    out = canonical_json(text).decode()
    assert out == '"\\"\\\\\\b\\t\\n\\f\\r\\u0000\\u001f\x7f/<>&\u2028é😀"'
    assert json.loads(out) == text


def test_keys_sort_by_utf16_code_units() -> None:
    # U+1F600 is D83D DE00 in UTF-16: before U+FB01 there, after it in code points.
    keys = {"\ufb01": 1, "\U0001f600": 2, "a": 3, "\u00e9": 4}
    assert canonical_json(keys).decode() == '{"a":3,"\u00e9":4,"\U0001f600":2,"\ufb01":1}'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-3.0, "-3"),
        (0.5, "0.5"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e21, "1e+21"),
        (1.5e-7, "1.5e-7"),
        (1e-6, "0.000001"),
        (123456.789, "123456.789"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (2.0**60, "1152921504606846976"),  # integral within int64: the integer
        (1e300, "1e+300"),
    ],
)
def test_numbers_in_ecmascript_form(value: float, text: str) -> None:
    assert canonical_json(value).decode() == text


@pytest.mark.parametrize("bad", [math.nan, math.inf, b"x", object(), {1: "x"}, "\ud800"])
def test_no_canonical_form(bad: object) -> None:
    with pytest.raises(CanonicalJSONError):
        canonical_json(bad)


def test_nested_and_compact() -> None:
    assert canonical_json({"b": [1, {"d": None, "c": True}], "a": False}) == (
        b'{"a":false,"b":[1,{"c":true,"d":null}]}'
    )
