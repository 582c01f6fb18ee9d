"""Settlement: route snapshots, request metadata, output hashes and receipt verification.

Ports of the coordinator's ``internal/billing`` (``route_snapshot.go``,
``settlement_output.go``, ``settlement_verifier.go``) and of the buyer
side's prompt hash and output trackers (``internal/buyer``). Pure: callers
pass the clock readings in.

The flow the stub runs for each request when settlement is on:

1. :class:`RouteSnapshot` of the routing decision; its digest and the
   :func:`metadata` go to the provider in ``inference_request.settlement``;
2. what the stub relays to the buyer feeds an :class:`OutputTracker`
   (stream) or :func:`output_from_chat_response` (non-stream);
3. the end frame's ``receipt`` goes through :func:`verify_receipt` with the
   output hash and usage the stub computed itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Final

from . import gojson, jcs
from .gojson import (
    ABSENT,
    GoJSONError,
    GoObject,
    decode_struct,
    unmarshal_int,
    unmarshal_string,
)
from .jcs import RawJSONString
from .tier2 import ed25519_verify, receipt_key_id

ROUTE_SNAPSHOT_POLICY_VERSION: Final = "spec022-prereq-v1"
PAID_ENTRYPOINT: Final = "coordinator_buyer_v1_chat_completions"
PROMPT_HASH_BASIS: Final = "coordinator_prompt_canonical_v1"
KEY_SOURCE_AUTH_SESSION: Final = "auth_session"
MAX_PENDING_DEADLINE_SECONDS: Final = 900
MAX_CLOCK_SKEW_MS: Final = 60_000
USAGE_SOURCE_COORDINATOR_OBSERVED: Final = "coordinator_observed"

MODE_OBSERVE: Final = "observe"
MODE_ENFORCE: Final = "enforce"

NORMAL_DONE: Final = "normal_done"
PROVIDER_ERROR: Final = "provider_error"
BUYER_CANCEL: Final = "buyer_cancel"
GATEWAY_TIMEOUT: Final = "gateway_timeout"
UPSTREAM_TRANSPORT_DISCONNECT: Final = "upstream_transport_disconnect"
TERMINAL_STATES: Final = frozenset(
    {NORMAL_DONE, PROVIDER_ERROR, BUYER_CANCEL, GATEWAY_TIMEOUT, UPSTREAM_TRANSPORT_DISCONNECT}
)

TUPLE_KEYS: Final = frozenset(
    {
        "account_scope",
        "attempt_n",
        "catalog_body_digest",
        "catalog_id",
        "expected_catalog_model_hash",
        "issued_at_unix_ms",
        "model_hash",
        "model_id",
        "output_hash",
        "output_prefix_end_byte",
        "output_prefix_start_byte",
        "prompt_hash",
        "provider_id",
        "provider_receipt_key_id",
        "receipt_version",
        "request_id",
        "route_snapshot_digest",
        "route_snapshot_mode",
        "route_snapshot_policy_version",
        "signature_key_alg",
        "terminal_state",
        "terminal_state_ts_unix_ms",
        "usage",
    }
)
USAGE_KEYS: Final = (
    "billable_input_tokens",
    "billable_output_tokens",
    "delivered_output_bytes",
    "observed_input_tokens",
    "observed_output_tokens",
)

HEX64: Final = re.compile(r"[0-9a-f]{64}")
RECEIPT_KEY_ID: Final = re.compile(r"ed25519-sha256:[0-9a-f]{64}")


class SettlementError(ValueError):
    """A route snapshot, prompt or output the settlement path cannot hash."""


def account_scope(account_id: str) -> str:
    """``AccountScopeForSettlement``."""
    account_id = account_id.strip()
    if not account_id:
        return "legacy_direct"
    digest = hashlib.sha256(("spec015-account-scope-v1:" + account_id).encode()).hexdigest()
    return "acct_sha256:" + digest


# ---------------------------------------------------------------------------
# Prompt hash (buyer/settlement.go coordinatorPromptHash)


def _normalize_line_endings(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _content(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return _normalize_line_endings(value)
    if isinstance(value, list):
        return [_content_part(item) for item in value]
    raise SettlementError("unsupported message content")


def _content_part(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SettlementError("content part must be object")
    typ = value.get("type")
    if not isinstance(typ, str):
        raise SettlementError("content part type must be string")
    if typ == "text":
        text = value.get("text")
        if not isinstance(text, str):
            raise SettlementError("text content must be string")
        return {"type": "text", "text": _normalize_line_endings(text)}
    if typ == "image_url":
        image = value.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise SettlementError("image_url.url must be string")
        return {
            "type": "image_url",
            "image_url": {"url": image["url"], "detail": image.get("detail")},
        }
    if typ == "input_audio":
        audio = value.get("input_audio")
        if not isinstance(audio, dict):
            raise SettlementError("input_audio must be object")
        if not isinstance(audio.get("data"), str) or not isinstance(audio.get("format"), str):
            raise SettlementError("input_audio data and format must be strings")
        return {
            "type": "input_audio",
            "input_audio": {"data": audio["data"], "format": audio["format"]},
        }
    raise SettlementError(f"unsupported content part type {typ!r}")


def _tools(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SettlementError("tools must be array")
    out = []
    for item in value:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise SettlementError("tool.function must be object")
        if not isinstance(function.get("name"), str):
            raise SettlementError("tool.function.name must be string")
        out.append(
            {
                "type": "function",
                "function": {
                    "name": function["name"],
                    "description": function.get("description"),
                    "parameters": function.get("parameters"),
                },
            }
        )
    return out


def _tool_calls(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SettlementError("tool_calls must be array")
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise SettlementError("tool_call must be object")
        call_id, function = item.get("id"), item.get("function")
        if not isinstance(call_id, str) or not isinstance(function, dict):
            raise SettlementError("tool_call id and function are required")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise SettlementError("tool_call function name and arguments are required")
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": RawJSONString(arguments)},
            }
        )
    return out


def prompt_hash(body: str | bytes) -> str:
    """The ``coordinator_prompt_canonical_v1`` hash of a chat completion body."""
    try:
        root = gojson.loads(body)
    except GoJSONError as exc:
        raise SettlementError(str(exc)) from None
    if not isinstance(root, dict):
        raise SettlementError("request must be object")
    messages = root.get("messages")
    if not isinstance(messages, list):
        raise SettlementError("messages must be array")
    canonical_messages = []
    for message in messages:
        if not isinstance(message, dict):
            raise SettlementError("message must be object")
        role = message.get("role")
        if not isinstance(role, str):
            raise SettlementError("message role must be string")
        canonical_messages.append(
            {
                "role": role,
                "content": _content(message.get("content")),
                "name": message.get("name"),
                "tool_call_id": message.get("tool_call_id"),
                "tool_calls": _tool_calls(message.get("tool_calls")),
            }
        )
    value: dict[str, Any] = {
        "model": root.get("model"),
        "messages": canonical_messages,
        "tools": _tools(root.get("tools")),
    }
    for name in (
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "response_format",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "n",
    ):
        value[name] = root.get(name)
    return jcs.canonical_sha256_hex(value)


# ---------------------------------------------------------------------------
# Route snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSnapshot:
    """``billing.RouteSnapshot`` (the members a catalog route uses)."""

    account_scope: str
    request_id: str
    attempt_n: int
    provider_id: str
    provider_session_id: str | None
    provider_generation_id: str | None
    paid_entrypoint: str
    provider_receipt_key_id: str
    provider_receipt_key_source: str
    model_id: str
    provider_reported_model_hash: str
    expected_catalog_model_hash: str
    catalog_id: str
    catalog_body_digest: str
    catalog_signature_key_id: str
    catalog_signature_pubkey_fingerprint: str
    catalog_expires_at_unix_ms: int
    spec008_hash_status: str
    route_snapshot_policy_version: str
    route_snapshot_mode: str
    route_decision_ts_unix_ms: int
    request_start_ts_unix_ms: int
    pending_deadline_seconds: int
    prompt_hash_basis: str
    prompt_hash: str
    provider_reported_model_hash_algorithm: str = ""
    expected_catalog_model_hash_algorithm: str = ""

    def value(self) -> dict[str, Any]:
        """``RouteSnapshot.Value``: the object whose JCS digest is pinned."""
        value: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "account_scope",
                "request_id",
                "attempt_n",
                "provider_id",
                "provider_session_id",
                "provider_generation_id",
                "paid_entrypoint",
                "provider_receipt_key_id",
                "provider_receipt_key_source",
                "model_id",
                "provider_reported_model_hash",
                "expected_catalog_model_hash",
                "catalog_id",
                "catalog_body_digest",
                "catalog_signature_key_id",
                "catalog_signature_pubkey_fingerprint",
                "catalog_expires_at_unix_ms",
                "spec008_hash_status",
                "route_snapshot_policy_version",
                "route_snapshot_mode",
                "route_decision_ts_unix_ms",
                "request_start_ts_unix_ms",
                "pending_deadline_seconds",
                "prompt_hash_basis",
                "prompt_hash",
            )
        }
        if (
            self.provider_reported_model_hash_algorithm
            or self.expected_catalog_model_hash_algorithm
        ):
            value["provider_reported_model_hash_algorithm"] = (
                self.provider_reported_model_hash_algorithm
            )
            value["expected_catalog_model_hash_algorithm"] = (
                self.expected_catalog_model_hash_algorithm
            )
        return value

    def validate(self) -> None:
        """``RouteSnapshot.Validate``; raises :class:`SettlementError`."""
        for name in (
            "account_scope",
            "request_id",
            "provider_id",
            "paid_entrypoint",
            "provider_receipt_key_id",
            "provider_receipt_key_source",
            "model_id",
            "provider_reported_model_hash",
            "expected_catalog_model_hash",
            "catalog_id",
            "catalog_body_digest",
            "catalog_signature_key_id",
            "catalog_signature_pubkey_fingerprint",
            "spec008_hash_status",
            "route_snapshot_policy_version",
            "route_snapshot_mode",
            "prompt_hash_basis",
            "prompt_hash",
        ):
            if not getattr(self, name).strip():
                raise SettlementError(f"route snapshot missing {name}")
        if self.attempt_n < 0:
            raise SettlementError("route snapshot attempt_n must be >= 0")
        if not RECEIPT_KEY_ID.fullmatch(self.provider_receipt_key_id):
            raise SettlementError("route snapshot provider_receipt_key_id invalid")
        if self.provider_receipt_key_source not in (
            "auth_session",
            "rotation_grace",
            "operator_pin",
        ):
            raise SettlementError("route snapshot provider_receipt_key_source invalid")
        if self.route_snapshot_mode not in (MODE_OBSERVE, MODE_ENFORCE):
            raise SettlementError("route snapshot route_snapshot_mode invalid")
        if (
            (
                self.provider_reported_model_hash_algorithm
                or self.expected_catalog_model_hash_algorithm
            )
            and self.provider_reported_model_hash_algorithm
            != self.expected_catalog_model_hash_algorithm
        ):
            raise SettlementError("route snapshot model hash algorithm invalid")
        for name in (
            "provider_reported_model_hash",
            "expected_catalog_model_hash",
            "catalog_body_digest",
            "prompt_hash",
        ):
            if not HEX64.fullmatch(getattr(self, name)):
                raise SettlementError(f"route snapshot {name} must be 64 lowercase hex chars")
        if not RECEIPT_KEY_ID.fullmatch(self.catalog_signature_pubkey_fingerprint):
            raise SettlementError("route snapshot catalog_signature_pubkey_fingerprint invalid")
        if (
            self.catalog_expires_at_unix_ms <= 0
            or self.route_decision_ts_unix_ms <= 0
            or self.request_start_ts_unix_ms <= 0
        ):
            raise SettlementError("route snapshot timestamps must be positive")
        if not 0 < self.pending_deadline_seconds <= MAX_PENDING_DEADLINE_SECONDS:
            raise SettlementError(
                "route snapshot pending_deadline_seconds must be between 1 and "
                f"{MAX_PENDING_DEADLINE_SECONDS}"
            )

    def digest(self) -> str:
        """``RouteSnapshot.Digest``: hex SHA-256 of the JCS of :meth:`value`."""
        self.validate()
        return jcs.canonical_sha256_hex(self.value())


def metadata(
    snapshot: RouteSnapshot, digest: str, output_prefix_start_byte: int = 0
) -> dict[str, Any]:
    """``inference_request.settlement`` (``SettlementReceiptMetadata``, wire order)."""
    return {
        "account_scope": snapshot.account_scope,
        "request_id": snapshot.request_id,
        "attempt_n": snapshot.attempt_n,
        "provider_id": snapshot.provider_id,
        "provider_receipt_key_id": snapshot.provider_receipt_key_id,
        "model_id": snapshot.model_id,
        "expected_catalog_model_hash": snapshot.expected_catalog_model_hash,
        "catalog_id": snapshot.catalog_id,
        "catalog_body_digest": snapshot.catalog_body_digest,
        "route_snapshot_digest": digest,
        "route_snapshot_policy_version": snapshot.route_snapshot_policy_version,
        "route_snapshot_mode": snapshot.route_snapshot_mode,
        "prompt_hash": snapshot.prompt_hash,
        "output_prefix_start_byte": output_prefix_start_byte,
        "pending_deadline_seconds": snapshot.pending_deadline_seconds,
    }


# ---------------------------------------------------------------------------
# Settlement output (what was delivered to the buyer)


def canonical_content(content: str) -> str:
    """Newlines normalised (``\\r\\n`` and ``\\r`` to ``\\n``), then NFC."""
    return unicodedata.normalize("NFC", _normalize_line_endings(content))


def delivered_output_bytes(content: str) -> int:
    """``SettlementDeliveredOutputBytes``."""
    return len(canonical_content(content).encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    type: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    """``billing.SettlementOutput``."""

    content: str = ""
    finish_reason: str | None = None
    available: bool = False
    output_prefix_start_byte: int = 0
    output_prefix_end_byte: int = 0
    terminal_state: str
    terminal_state_ts_unix_ms: int = 0
    tool_calls: tuple[ToolCall, ...] = ()

    def value(self) -> dict[str, Any]:
        tool_calls = None
        if self.tool_calls:
            tool_calls = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.name, "arguments": RawJSONString(call.arguments)},
                }
                for call in self.tool_calls
            ]
        return {
            "content": self.content,
            "finish_reason": self.finish_reason,
            "output_prefix_end_byte": self.output_prefix_end_byte,
            "output_prefix_start_byte": self.output_prefix_start_byte,
            "terminal_state": self.terminal_state,
            "tool_calls": tool_calls,
        }

    def validate(self) -> None:
        if self.terminal_state not in TERMINAL_STATES:
            raise SettlementError(f"invalid terminal_state {self.terminal_state!r}")
        start, end = self.output_prefix_start_byte, self.output_prefix_end_byte
        if start < 0 or end < start:
            raise SettlementError(f"invalid output byte range [{start},{end})")
        if delivered_output_bytes(self.content) != end - start:
            raise SettlementError("delivered bytes do not match the output byte range")
        for call in self.tool_calls:
            if not call.id or call.type != "function" or not call.name:
                raise SettlementError("invalid tool call")
            if not _json_valid(call.arguments):
                raise SettlementError("tool call arguments are not valid JSON")

    def digest(self) -> str:
        """``output_hash``: hex SHA-256 of the JCS of :meth:`value`."""
        self.validate()
        return jcs.canonical_sha256_hex(self.value())


def _json_valid(text: str) -> bool:
    try:
        gojson.loads(text)
    except GoJSONError:
        return False
    return True


def output_for_content(
    content: str,
    finish_reason: str | None,
    tool_calls: tuple[ToolCall, ...],
    terminal_state: str,
    terminal_state_ts_unix_ms: int,
    start_byte: int = 0,
) -> Output:
    """``settlementOutputForContentAt``."""
    content = canonical_content(content)
    return Output(
        content=content,
        finish_reason=finish_reason,
        available=True,
        output_prefix_start_byte=start_byte,
        output_prefix_end_byte=start_byte + delivered_output_bytes(content),
        terminal_state=terminal_state,
        terminal_state_ts_unix_ms=terminal_state_ts_unix_ms,
        tool_calls=tool_calls,
    )


def unavailable_output(terminal_state: str, terminal_state_ts_unix_ms: int) -> Output:
    return Output(
        terminal_state=terminal_state, terminal_state_ts_unix_ms=terminal_state_ts_unix_ms
    )


def _tool_calls_from_raw(raw: list[Any] | None) -> tuple[ToolCall, ...] | None:
    out = []
    for item in raw or ():
        try:
            call = decode_struct(
                item,
                {
                    "id": unmarshal_string,
                    "type": unmarshal_string,
                    "function": lambda v: decode_struct(
                        v, {"name": unmarshal_string, "arguments": unmarshal_string}, "function"
                    ),
                },
                "toolCall",
            )
        except GoJSONError:
            return None
        function = call.get("function", {})
        tool = ToolCall(
            call.get("id", ""),
            call.get("type", ""),
            function.get("name", ""),
            function.get("arguments", ""),
        )
        if (
            not tool.id
            or tool.type != "function"
            or not tool.name
            or not _json_valid(tool.arguments)
        ):
            return None
        out.append(tool)
    return tuple(out)


def output_from_chat_response(
    body: str | bytes, terminal_state: str, terminal_state_ts_unix_ms: int
) -> Output | None:
    """``settlementOutputFromChatResponseAt``: ``None`` when the body is not usable."""
    try:
        value = gojson.loads(body)
        response = decode_struct(value, {"choices": lambda v: v}, "chatResponse")
    except GoJSONError:
        return None
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    try:
        choice = decode_struct(
            choices[0],
            {
                "message": lambda v: decode_struct(
                    v, {"content": lambda c: c, "tool_calls": lambda t: t}, "message"
                ),
                "finish_reason": gojson.pointer(unmarshal_string),
            },
            "choice",
        )
    except GoJSONError:
        return None
    message = choice.get("message", {})
    content = message.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        return None
    tool_raw = message.get("tool_calls")
    if tool_raw is not None and not isinstance(tool_raw, list):
        return None
    tool_calls = _tool_calls_from_raw(tool_raw)
    if tool_calls is None:
        return None
    return output_for_content(
        gojson.text(content),
        choice.get("finish_reason"),
        tool_calls,
        terminal_state,
        terminal_state_ts_unix_ms,
    )


@dataclass
class _StreamToolCall:
    id: str = ""
    type: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class OutputTracker:
    """``settlementStreamOutputTracker``: what an SSE stream delivered.

    Feed it the bytes relayed to the buyer (:meth:`feed`); lines may be split
    across chunks. A stream the tracker cannot follow sets :attr:`error`.
    """

    content: str = ""
    finish_reason: str | None = None
    tool_calls: dict[int, _StreamToolCall] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    _pending: str = ""

    def feed(self, data: str) -> None:
        if self.error is not None:
            return
        self._pending += data
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            try:
                self._observe_line(line.rstrip("\r"))
            except (SettlementError, GoJSONError) as exc:
                self.error = str(exc)
                return

    def _observe_line(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:]
        if data.startswith(" "):
            data = data[1:]
        if data == "":
            return
        if data == "[DONE]":
            self.done = True
            return
        if self.done:
            raise SettlementError("settlement stream data arrived after [DONE]")
        if not data.strip().startswith("{"):
            raise SettlementError("settlement stream data is not JSON")
        chunk = decode_struct(gojson.loads(data), {"choices": lambda v: v}, "chunk")
        choices = chunk.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise SettlementError("choices must be an array")
        for item in choices or ():
            choice = decode_struct(
                item,
                {
                    "delta": lambda v: decode_struct(
                        v,
                        {"content": gojson.pointer(unmarshal_string), "tool_calls": lambda t: t},
                        "delta",
                    ),
                    "finish_reason": gojson.pointer(unmarshal_string),
                },
                "choice",
            )
            delta = choice.get("delta", {})
            if delta.get("content") is not None:
                self.content += delta["content"]
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
            calls = delta.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise SettlementError("tool_calls must be an array")
            for raw_call in calls or ():
                call = decode_struct(
                    raw_call,
                    {
                        "index": unmarshal_int,
                        "id": gojson.pointer(unmarshal_string),
                        "type": gojson.pointer(unmarshal_string),
                        "function": gojson.pointer(
                            lambda v: decode_struct(
                                v,
                                {
                                    "name": gojson.pointer(unmarshal_string),
                                    "arguments": gojson.pointer(unmarshal_string),
                                },
                                "function",
                            )
                        ),
                    },
                    "toolCallDelta",
                )
                acc = self.tool_calls.setdefault(call.get("index", 0), _StreamToolCall())
                if call.get("id") is not None:
                    acc.id = call["id"]
                if call.get("type") is not None:
                    acc.type = call["type"]
                function = call.get("function")
                if function is not None:
                    if function.get("name") is not None:
                        acc.name += function["name"]
                    if function.get("arguments") is not None:
                        acc.arguments += function["arguments"]

    def output(self, terminal_state: str, terminal_state_ts_unix_ms: int) -> Output:
        """``outputAt``: the settlement output, or an unavailable one."""
        calls = []
        for index in sorted(self.tool_calls):
            acc = self.tool_calls[index]
            typ = acc.type or "function"
            if not acc.id or not acc.name or not _json_valid(acc.arguments) or typ != "function":
                return unavailable_output(terminal_state, terminal_state_ts_unix_ms)
            calls.append(ToolCall(acc.id, typ, acc.name, acc.arguments))
        return output_for_content(
            self.content,
            self.finish_reason,
            tuple(calls),
            terminal_state,
            terminal_state_ts_unix_ms,
        )


def terminal_state_from_attempt(status: int, error_message: str, error_code: str) -> str:
    """``terminalStateFromAttempt``."""
    if error_message in (
        "Buyer disconnected during request",
        "Buyer disconnected during streaming",
        "Buyer disconnected during buffered streaming",
    ):
        return BUYER_CANCEL
    if status == 504 or error_code == "provider_timeout":
        return GATEWAY_TIMEOUT
    if status >= 400 or error_message or error_code:
        return PROVIDER_ERROR
    return NORMAL_DONE


@dataclass(frozen=True, slots=True)
class Usage:
    """``billing.SettlementUsage``."""

    billable_input_tokens: int = 0
    billable_output_tokens: int = 0
    delivered_output_bytes: int = 0
    observed_input_tokens: int = 0
    observed_output_tokens: int = 0


def ledger_usage(
    terminal_state: str, delivered_bytes: int, prompt_tokens: int, completion_tokens: int
) -> Usage:
    """The usage the coordinator's ledger expects a receipt to carry.

    Observed tokens are the end frame's ``usage``; an attempt that ended
    abnormally having delivered nothing bills nothing.
    """
    billable = not (terminal_state != NORMAL_DONE and delivered_bytes == 0)
    return Usage(
        billable_input_tokens=prompt_tokens if billable else 0,
        billable_output_tokens=completion_tokens if billable else 0,
        delivered_output_bytes=delivered_bytes,
        observed_input_tokens=prompt_tokens,
        observed_output_tokens=completion_tokens,
    )


# ---------------------------------------------------------------------------
# Receipt verification (VerifySettlementReceipt)

OUTCOME_PENDING: Final = "pending"
OUTCOME_VERIFIED: Final = "verified"
OUTCOME_QUARANTINED: Final = "quarantined"
OUTCOME_ZERO_SETTLED: Final = "zero_settled"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyInput:
    """``SettlementVerifyInput``."""

    header: str
    provider_receipt_pubkey: bytes
    route_snapshot: RouteSnapshot
    account_scope: str
    request_id: str
    attempt_n: int
    provider_id: str
    provider_receipt_key_id: str
    terminal_state: str
    terminal_state_ts_unix_ms: int
    output_hash: str
    output_prefix_start_byte: int
    output_prefix_end_byte: int
    expected_usage: Usage
    receipt_received_unix_ms: int
    usage_source: str = USAGE_SOURCE_COORDINATOR_OBSERVED
    usage_cross_checked: bool = True
    overlapping_or_duplicate: bool = False
    now_unix_ms: int = 0
    receipt_missing: bool = False
    trust_root_inconclusive: bool = False
    canonical_hashes_available: bool = True
    already_deadline_quarantined: bool = False
    terminal_outcome_final: bool = False

    def deadline_unix_ms(self) -> int:
        return self.terminal_state_ts_unix_ms + self.route_snapshot.pending_deadline_seconds * 1000


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``SettlementVerifyResult`` (without the facts)."""

    outcome: str
    receipt_result: str
    reason: str
    receipt_version: str = ""
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Verified, or verified as a zero settlement."""
        return self.receipt_result == "valid"


def _invalid(reason: str, version: str = "", checks: dict[str, bool] | None = None) -> VerifyResult:
    return VerifyResult(OUTCOME_QUARANTINED, "invalid", reason, version, dict(checks or {}))


def _pending(data: VerifyInput, reason: str) -> VerifyResult:
    now = data.now_unix_ms or data.receipt_received_unix_ms
    if now > data.deadline_unix_ms():
        return _invalid(reason + "_deadline_elapsed")
    return VerifyResult(OUTCOME_PENDING, "inconclusive", reason)


@dataclass(slots=True)
class _Tuple:
    values: dict[str, Any]
    usage: Usage
    raw: bytes
    canonical: bytes
    signature: bytes

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def decode_std_base64(value: str) -> bytes:
    """Go's ``base64.StdEncoding.DecodeString`` (CR/LF ignored, padding required)."""
    cleaned = value.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("illegal base64 data") from None


def _split_envelope(header: str) -> tuple[bytes, bytes]:
    dot = header.find(".")
    if dot <= 0 or dot == len(header) - 1 or "." in header[dot + 1 :]:
        raise ValueError("bad receipt envelope")
    raw = decode_std_base64(header[:dot])
    signature = decode_std_base64(header[dot + 1 :])
    if len(signature) != 64:
        raise ValueError("bad signature length")
    return raw, signature


def _raw_object(raw: Any) -> GoObject:
    if not isinstance(raw, GoObject):
        raise GoJSONError("not an object")
    return raw


_TUPLE_STRINGS = (
    "account_scope",
    "catalog_body_digest",
    "catalog_id",
    "expected_catalog_model_hash",
    "model_hash",
    "model_id",
    "output_hash",
    "prompt_hash",
    "provider_id",
    "provider_receipt_key_id",
    "receipt_version",
    "request_id",
    "route_snapshot_digest",
    "route_snapshot_mode",
    "route_snapshot_policy_version",
    "signature_key_alg",
    "terminal_state",
)
_TUPLE_INTS = (
    "issued_at_unix_ms",
    "output_prefix_end_byte",
    "output_prefix_start_byte",
    "terminal_state_ts_unix_ms",
    "attempt_n",
)


def _int64(value: Any) -> int:
    # json.Number into int64 (UseNumber): an integer literal in range only.
    decoded = unmarshal_int(value, "int64")
    return 0 if decoded is ABSENT else decoded  # type: ignore[return-value]


def _parse_tuple(header: str) -> _Tuple | VerifyResult:
    try:
        raw, signature = _split_envelope(header)
    except ValueError:
        return _invalid("receipt_envelope_invalid")
    try:
        fields = _raw_object(gojson.loads(raw))
    except GoJSONError:
        return _invalid("tuple_json_invalid")
    version_value = fields.get("receipt_version")
    version = gojson.text(version_value) if isinstance(version_value, str) else ""
    if version == "":
        return _invalid("not_settlement_capable")
    if version != "4":
        if version in ("1", "2", "3"):
            return _invalid("not_settlement_capable", version)
        return VerifyResult(OUTCOME_QUARANTINED, "inconclusive", "unknown_receipt_version", version)
    if set(fields) != TUPLE_KEYS:
        return _invalid("tuple_shape_invalid", version)
    usage_value = fields.get("usage")
    if not isinstance(usage_value, GoObject) or set(usage_value) != set(USAGE_KEYS):
        return _invalid("usage_shape_invalid", version)
    try:
        canonical = jcs.canonical(fields)
    except jcs.JCSError:
        return _invalid("tuple_json_invalid", version)
    # The typed decode: DisallowUnknownFields (the key set is already exact),
    # int64 fields from json.Number, strings from strings.
    try:
        values: dict[str, Any] = {}
        for name in _TUPLE_STRINGS:
            decoded = unmarshal_string(fields[name])
            values[name] = "" if decoded is ABSENT else decoded
        for name in _TUPLE_INTS:
            values[name] = _int64(fields[name])
        usage = Usage(**{name: _int64(usage_value[name]) for name in USAGE_KEYS})
    except GoJSONError:
        return _invalid("tuple_type_invalid", version)
    for name in (
        "account_scope",
        "catalog_id",
        "model_id",
        "provider_id",
        "request_id",
        "route_snapshot_mode",
        "route_snapshot_policy_version",
    ):
        if not values[name].strip():
            return _invalid(f"{name}_missing", version)
    for name in (
        "catalog_body_digest",
        "expected_catalog_model_hash",
        "model_hash",
        "output_hash",
        "prompt_hash",
        "route_snapshot_digest",
    ):
        if not HEX64.fullmatch(values[name]):
            return _invalid(f"{name}_invalid", version)
    if values["issued_at_unix_ms"] <= 0 or values["terminal_state_ts_unix_ms"] <= 0:
        return _invalid("timestamp_invalid", version)
    if (
        values["attempt_n"] < 0
        or values["output_prefix_start_byte"] < 0
        or values["output_prefix_end_byte"] < values["output_prefix_start_byte"]
    ):
        return _invalid("range_invalid", version)
    return _Tuple(values, usage, raw, canonical, signature)


def _context_mismatch(
    t: _Tuple, data: VerifyInput, route_digest: str, checks: dict[str, bool]
) -> str:
    snap = data.route_snapshot
    if t.account_scope != data.account_scope or t.account_scope != snap.account_scope:
        return "account_scope_mismatch"
    if t.request_id != data.request_id or t.request_id != snap.request_id:
        return "request_id_mismatch"
    if t.attempt_n != data.attempt_n or t.attempt_n != snap.attempt_n:
        return "attempt_mismatch"
    if t.provider_id != data.provider_id or t.provider_id != snap.provider_id:
        return "provider_id_mismatch"
    if t.provider_receipt_key_id != data.provider_receipt_key_id:
        return "provider_receipt_key_id_mismatch"
    if t.route_snapshot_digest != route_digest:
        return "route_snapshot_digest_mismatch"
    if t.route_snapshot_mode != snap.route_snapshot_mode:
        return "route_snapshot_mode_mismatch"
    if t.route_snapshot_policy_version != snap.route_snapshot_policy_version:
        return "route_snapshot_policy_version_mismatch"
    if t.model_id != snap.model_id:
        return "model_id_mismatch"
    if (
        t.model_hash != snap.provider_reported_model_hash
        or t.model_hash != snap.expected_catalog_model_hash
    ):
        return "model_hash_mismatch"
    if t.expected_catalog_model_hash != snap.expected_catalog_model_hash:
        return "expected_catalog_model_hash_mismatch"
    if t.catalog_id != snap.catalog_id or t.catalog_body_digest != snap.catalog_body_digest:
        return "catalog_snapshot_mismatch"
    checks["route_snapshot_matched"] = True
    if t.prompt_hash != snap.prompt_hash:
        return "prompt_hash_mismatch"
    checks["prompt_hash_matched"] = True
    if t.output_hash != data.output_hash:
        return "output_hash_mismatch"
    if (
        t.output_prefix_start_byte != data.output_prefix_start_byte
        or t.output_prefix_end_byte != data.output_prefix_end_byte
    ):
        return "output_prefix_mismatch"
    checks["output_hash_matched"] = True
    if t.terminal_state not in TERMINAL_STATES:
        return "terminal_state_out_of_enum"
    if t.terminal_state != data.terminal_state:
        return "terminal_state_mismatch"
    checks["terminal_state_matched"] = True
    if t.terminal_state_ts_unix_ms != data.terminal_state_ts_unix_ms:
        return "terminal_state_timestamp_mismatch"
    if (
        t.issued_at_unix_ms < snap.request_start_ts_unix_ms - MAX_CLOCK_SKEW_MS
        or t.issued_at_unix_ms > data.receipt_received_unix_ms + MAX_CLOCK_SKEW_MS
    ):
        return "issued_at_window_mismatch"
    checks["timestamp_window_valid"] = True
    return ""


def _usage_shape(t: _Tuple) -> str:
    start, end = t.output_prefix_start_byte, t.output_prefix_end_byte
    if start < 0 or end < 0 or start > end:
        return "output_prefix_invalid"
    u = t.usage
    if (
        min(
            u.billable_input_tokens,
            u.billable_output_tokens,
            u.delivered_output_bytes,
            u.observed_input_tokens,
            u.observed_output_tokens,
        )
        < 0
    ):
        return "usage_negative_value"
    if u.delivered_output_bytes != end - start:
        return "usage_delivered_bytes_mismatch"
    if t.terminal_state == NORMAL_DONE:
        if (
            u.billable_input_tokens != u.observed_input_tokens
            or u.billable_output_tokens != u.observed_output_tokens
        ):
            return "usage_observed_mismatch"
    elif u.delivered_output_bytes == 0:
        if u.billable_input_tokens != 0 or u.billable_output_tokens != 0:
            return "usage_zero_prefix_billable_tokens"
    elif (
        u.billable_input_tokens > u.observed_input_tokens
        or u.billable_output_tokens > u.observed_output_tokens
    ):
        return "usage_partial_billable_tokens"
    return ""


def _usage_ledger(usage: Usage, data: VerifyInput, checks: dict[str, bool]) -> str:
    if not data.usage_cross_checked:
        return "usage_not_cross_checked"
    if data.usage_source != USAGE_SOURCE_COORDINATOR_OBSERVED:
        return "usage_source_not_settlement_capable"
    checks["usage_cross_checked"] = True
    if usage != data.expected_usage:
        return "usage_mismatch"
    checks["usage_matched"] = True
    return ""


def verify_receipt(data: VerifyInput) -> VerifyResult:
    """``VerifySettlementReceipt``: the verdict on one v0.4 receipt."""
    if data.already_deadline_quarantined:
        return _invalid("deadline_quarantined")
    if data.terminal_outcome_final:
        return _invalid("duplicate_receipt_after_terminal")
    if data.receipt_missing:
        return _pending(data, "missing_receipt")
    if data.trust_root_inconclusive:
        return _pending(data, "trust_root_inconclusive")
    if not data.canonical_hashes_available:
        return _invalid("canonical_hash_unavailable")
    if data.overlapping_or_duplicate:
        return _invalid("overlapping_output_prefix")
    checks = {
        "signature_verified": False,
        "route_snapshot_matched": False,
        "prompt_hash_matched": False,
        "output_hash_matched": False,
        "usage_matched": False,
        "usage_cross_checked": False,
        "no_overlap": True,
        "terminal_state_matched": False,
        "timestamp_window_valid": False,
    }
    try:
        route_digest = data.route_snapshot.digest()
    except SettlementError:
        return _invalid("route_snapshot_invalid")
    if data.receipt_received_unix_ms > data.deadline_unix_ms():
        return _invalid("receipt_after_deadline")
    parsed = _parse_tuple(data.header)
    if isinstance(parsed, VerifyResult):
        return parsed
    version = parsed.receipt_version
    if parsed.raw != parsed.canonical:
        return _invalid("non_canonical_tuple", version, checks)
    if parsed.signature_key_alg != "Ed25519":
        return _invalid("signature_key_alg_invalid", version, checks)
    if not RECEIPT_KEY_ID.fullmatch(parsed.provider_receipt_key_id):
        return _invalid("provider_receipt_key_id_invalid", version, checks)
    try:
        pinned = receipt_key_id(data.provider_receipt_pubkey)
    except ValueError:
        pinned = None
    if (
        pinned is None
        or parsed.provider_receipt_key_id != pinned
        or parsed.provider_receipt_key_id != data.route_snapshot.provider_receipt_key_id
    ):
        return _invalid("provider_receipt_key_id_mismatch", version, checks)
    if not ed25519_verify(data.provider_receipt_pubkey, parsed.raw, parsed.signature):
        return _invalid("signature_verify_failed", version, checks)
    checks["signature_verified"] = True
    reason = (
        _context_mismatch(parsed, data, route_digest, checks)
        or _usage_shape(parsed)
        or _usage_ledger(parsed.usage, data, checks)
    )
    if reason:
        return _invalid(reason, version, checks)
    if parsed.terminal_state != NORMAL_DONE and parsed.usage.delivered_output_bytes == 0:
        return VerifyResult(
            OUTCOME_ZERO_SETTLED, "valid", "verified_zero_settlement", version, checks
        )
    return VerifyResult(OUTCOME_VERIFIED, "valid", "verified_settlement", version, checks)


__all__ = [
    "Output",
    "OutputTracker",
    "RouteSnapshot",
    "Usage",
    "VerifyInput",
    "VerifyResult",
    "account_scope",
    "ledger_usage",
    "metadata",
    "output_from_chat_response",
    "prompt_hash",
    "terminal_state_from_attempt",
    "verify_receipt",
]
