"""Settlement receipts v0.4: what the provider signs about one request. Pure.

A request that carries ``settlement`` metadata ends with a receipt in its
``inference_response_end``: ``base64(tuple) "." base64(signature)`` (standard
base64, padded), where ``tuple`` is the canonical JSON
(:mod:`~provider.coordinator.canonical`) of exactly these keys::

    account_scope attempt_n catalog_body_digest catalog_id
    expected_catalog_model_hash issued_at_unix_ms model_hash model_id
    output_hash output_prefix_end_byte output_prefix_start_byte prompt_hash
    provider_id provider_receipt_key_id receipt_version ("4") request_id
    route_snapshot_digest route_snapshot_mode route_snapshot_policy_version
    signature_key_alg ("Ed25519") terminal_state terminal_state_ts_unix_ms
    usage {billable_input_tokens billable_output_tokens delivered_output_bytes
           observed_input_tokens observed_output_tokens}

and the signature is plain Ed25519 over those bytes with the receipt key
(key id ``ed25519-sha256:<hex sha256 of the raw public key>``).

``output_hash`` binds what the buyer was actually sent (:class:`Delivered`):
the content with ``\\r\\n`` and ``\\r`` made ``\\n`` and then NFC, the
finish reason and the tool calls (their ``arguments`` hashed as sent, not
normalised), the terminal state and the byte range. A request that did not
finish normally binds only its delivered prefix: no finish reason, no tool
calls; if nothing was delivered, nothing is billable.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider.coordinator.canonical import RawString, canonical_json, canonical_sha256

__all__ = [
    "RECEIPT_VERSION",
    "Delivered",
    "InvalidSettlement",
    "Settlement",
    "ToolCall",
    "build_receipt",
    "normalize_content",
    "output_hash",
    "output_object",
    "parse_settlement",
    "receipt_key_id",
    "settlement_usage",
    "terminal_state",
]

RECEIPT_VERSION = "4"
SIGNATURE_ALG = "Ed25519"
KEY_ID_PREFIX = "ed25519-sha256:"
#: ``late_receipt_settlement`` on an end frame: we never settle a receipt late.
LATE_RECEIPT_SETTLEMENT = "not_settled"

TerminalState = Literal[
    "normal_done", "provider_error", "buyer_cancel", "gateway_timeout",
    "upstream_transport_disconnect",
]  # fmt: skip
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INT64_MAX = 2**63 - 1


def receipt_key_id(public_key: bytes) -> str:
    """``ed25519-sha256:<hex>`` of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return KEY_ID_PREFIX + hashlib.sha256(public_key).hexdigest()


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------
# Settlement metadata (coordinator -> provider, on inference_request)


class InvalidSettlement(ValueError):
    """Settlement metadata we cannot sign for; the message names the field."""


class Settlement(msgspec.Struct, kw_only=True):
    """``inference_request.settlement``, with the coordinator's Go types."""

    account_scope: str
    request_id: str
    attempt_n: int
    provider_id: str
    provider_receipt_key_id: str
    model_id: str
    expected_catalog_model_hash: str
    catalog_id: str
    catalog_body_digest: str
    route_snapshot_digest: str
    route_snapshot_policy_version: str
    route_snapshot_mode: str
    prompt_hash: str
    output_prefix_start_byte: int
    pending_deadline_seconds: int
    # Only for pool loopback runtimes, which this provider is not.
    pool_runtime_authorization: dict[str, Any] | None = None


def parse_settlement(raw: Any, *, request_id: str, provider_id: str, key_id: str) -> Settlement:
    """Check settlement metadata (the decoded JSON object) for one request.

    Raises :class:`InvalidSettlement` (answered with ``nak
    invalid_settlement_metadata``) when a field is missing or has the wrong
    type, an integer is negative, a digest is not lowercase hex, or the
    metadata names another request, provider or receipt key.
    """
    try:
        meta = msgspec.convert(raw, Settlement)
    except msgspec.ValidationError as exc:
        raise InvalidSettlement(f"settlement metadata is malformed: {exc}") from None
    for name in ("attempt_n", "output_prefix_start_byte", "pending_deadline_seconds"):
        value = getattr(meta, name)
        if not 0 <= value <= _INT64_MAX:
            raise InvalidSettlement(f"settlement {name} must be a non-negative int64")
    digests = ("expected_catalog_model_hash", "catalog_body_digest", "route_snapshot_digest",
               "prompt_hash")  # fmt: skip
    for name in digests:
        if not _HEX64.fullmatch(getattr(meta, name)):
            raise InvalidSettlement(f"settlement {name} is not a lowercase SHA-256 hex digest")
    if meta.request_id != request_id:
        raise InvalidSettlement(
            f"settlement request_id {meta.request_id!r} is not this request ({request_id!r})"
        )
    if meta.provider_id != provider_id:
        raise InvalidSettlement(f"settlement provider_id {meta.provider_id!r} is not this provider")
    if meta.provider_receipt_key_id != key_id:
        raise InvalidSettlement(
            f"settlement provider_receipt_key_id {meta.provider_receipt_key_id!r} is not this "
            f"provider's receipt key ({key_id})"
        )
    return meta


# --------------------------------------------------------------------------
# What was delivered


@dataclass(frozen=True)
class ToolCall:
    """One tool call as the buyer received it; ``arguments`` is the raw JSON string."""

    id: str
    name: str
    arguments: str


@dataclass
class Delivered:
    """One request's output as it was sent to the buyer (the receipt's input).

    The relay appends ``content`` pieces as their frames are queued, and sets
    ``finish_reason`` (and ``tool_calls``) with the last frame.
    """

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None

    def add(self, text: str) -> None:
        if text:
            self.parts.append(text)

    @property
    def content(self) -> str:
        return "".join(self.parts)


def normalize_content(text: str) -> str:
    """``\\r\\n`` and lone ``\\r`` become ``\\n``, then NFC (the settlement rule)."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def terminal_state(status: str) -> TerminalState:
    """The settlement terminal state of an end frame's status."""
    if status == "complete":
        return "normal_done"
    if status == "cancelled":
        return "buyer_cancel"
    return "provider_error"


def output_object(
    delivered: Delivered, state: TerminalState, start: int
) -> tuple[dict[str, Any], int]:
    """The ``settlement_output_v1`` object and its end byte."""
    content = normalize_content(delivered.content)
    end = start + len(content.encode("utf-8"))
    normal = state == "normal_done"
    calls = delivered.tool_calls if normal else None
    value = {
        "content": content,
        "finish_reason": (delivered.finish_reason or None) if normal else None,
        "output_prefix_end_byte": end,
        "output_prefix_start_byte": start,
        "terminal_state": state,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": RawString(call.arguments)},
            }
            for call in calls
        ]
        if calls
        else None,
    }
    return value, end


def output_hash(delivered: Delivered, state: TerminalState, start: int) -> str:
    return canonical_sha256(output_object(delivered, state, start)[0])


def settlement_usage(
    state: TerminalState, delivered_bytes: int, prompt_tokens: int, completion_tokens: int
) -> dict[str, int]:
    """Billable equals observed, except that an unfinished request that delivered
    nothing bills nothing (the coordinator refuses anything else)."""
    billable = state == "normal_done" or delivered_bytes > 0
    return {
        "billable_input_tokens": prompt_tokens if billable else 0,
        "billable_output_tokens": completion_tokens if billable else 0,
        "delivered_output_bytes": delivered_bytes,
        "observed_input_tokens": prompt_tokens,
        "observed_output_tokens": completion_tokens,
    }


def receipt_tuple(
    settlement: Settlement,
    *,
    model_hash: str,
    delivered: Delivered,
    state: TerminalState,
    prompt_tokens: int,
    completion_tokens: int,
    terminal_ts_ms: int,
    issued_at_ms: int,
) -> dict[str, Any]:
    start = settlement.output_prefix_start_byte
    output, end = output_object(delivered, state, start)
    return {
        "account_scope": settlement.account_scope,
        "attempt_n": settlement.attempt_n,
        "catalog_body_digest": settlement.catalog_body_digest,
        "catalog_id": settlement.catalog_id,
        "expected_catalog_model_hash": settlement.expected_catalog_model_hash,
        "issued_at_unix_ms": issued_at_ms,
        "model_hash": model_hash,
        "model_id": settlement.model_id,
        "output_hash": canonical_sha256(output),
        "output_prefix_end_byte": end,
        "output_prefix_start_byte": start,
        "prompt_hash": settlement.prompt_hash,
        "provider_id": settlement.provider_id,
        "provider_receipt_key_id": settlement.provider_receipt_key_id,
        "receipt_version": RECEIPT_VERSION,
        "request_id": settlement.request_id,
        "route_snapshot_digest": settlement.route_snapshot_digest,
        "route_snapshot_mode": settlement.route_snapshot_mode,
        "route_snapshot_policy_version": settlement.route_snapshot_policy_version,
        "signature_key_alg": SIGNATURE_ALG,
        "terminal_state": state,
        "terminal_state_ts_unix_ms": terminal_ts_ms,
        "usage": settlement_usage(state, end - start, prompt_tokens, completion_tokens),
    }


def sign_receipt(key: Ed25519PrivateKey, tuple_value: dict[str, Any]) -> str:
    """``base64(canonical tuple) "." base64(Ed25519 signature)``."""
    raw = canonical_json(tuple_value)
    signature = key.sign(raw)
    return base64.b64encode(raw).decode() + "." + base64.b64encode(signature).decode()


def build_receipt(
    key: Ed25519PrivateKey,
    settlement: Settlement,
    *,
    model_hash: str,
    delivered: Delivered,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    terminal_ts_ms: int,
    issued_at_ms: int,
) -> str:
    """The signed v0.4 receipt for a request that ended with ``status``.

    ``model_hash`` must be the hash this provider reports and the one the
    coordinator expects (``ValueError`` otherwise: such a receipt could only
    fail verification).
    """
    if model_hash != settlement.expected_catalog_model_hash:
        raise ValueError(
            "the served model's hash differs from the catalog's expected_catalog_model_hash"
        )
    if receipt_key_id(public_key_bytes(key)) != settlement.provider_receipt_key_id:
        raise ValueError("the settlement names another receipt key")
    value = receipt_tuple(
        settlement,
        model_hash=model_hash,
        delivered=delivered,
        state=terminal_state(status),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        terminal_ts_ms=terminal_ts_ms,
        issued_at_ms=issued_at_ms,
    )
    return sign_receipt(key, value)
