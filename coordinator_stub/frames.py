"""Provider frames as the coordinator parses them: the first message and the rest.

:func:`check_hello` decides, for the first frame of a connection, whether it
registers and with which close code it is refused otherwise.
"""

from __future__ import annotations

import msgspec

from provider.coordinator.messages import (
    PROTOCOL_VERSION,
    Hello,
    Invalid,
    decode_provider_frame,
    message_type,
)

#: Fields the real coordinator requires in ``hello`` that
#: :class:`provider.coordinator.messages.Hello` gives defaults (so decoding
#: alone would accept a hello the real coordinator closes with 4001).
HELLO_WIRE_REQUIRED = ("version", "tier")

#: Longest close reason a close frame can carry, in bytes.
MAX_CLOSE_REASON = 123


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame (123 bytes, whole characters)."""
    return text.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")


class Refusal(Exception):
    """A first frame the coordinator closes the connection for."""

    def __init__(self, code: int, reason: str, provider_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.provider_id = provider_id


def check_hello(first: str | bytes) -> Hello:
    """The ``hello`` in ``first``, or :class:`Refusal` with the close code and reason."""
    if isinstance(first, bytes):
        raise Refusal(4000, "first message must be a hello text frame")
    msg = decode_provider_frame(first)
    if isinstance(msg, Invalid):
        if msg.type == "hello":
            raise Refusal(4001, msg.message)
        got = msg.type or "no type"
        raise Refusal(4000, f"first message must be hello, got {got}")
    if not isinstance(msg, Hello):
        raise Refusal(4000, f"first message must be hello, got {message_type(msg)}")
    raw = msgspec.json.decode(first)
    for name in HELLO_WIRE_REQUIRED:
        if name not in raw:
            raise Refusal(4001, f"Object missing required field `{name}`", msg.provider_id)
    if msg.version != PROTOCOL_VERSION:
        raise Refusal(4004, f"unsupported protocol version {msg.version}", msg.provider_id)
    return msg
