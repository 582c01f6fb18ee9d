"""What JSON decoding at an edge can raise, and how to say it: pure.

Both edges of the provider decode untrusted JSON with msgspec: coordinator
frames (:mod:`provider.coordinator.messages`) and buyers' request bodies
(:mod:`provider.openai.request`). Besides :class:`msgspec.DecodeError`,
hostile input can raise :class:`RecursionError` (nesting past the
interpreter's limit) and :class:`UnicodeDecodeError` (invalid UTF-8 inside a
bytes frame); :func:`describe` turns each into a message for a ``nak`` or a
buyer.
"""

from __future__ import annotations

import msgspec

#: What msgspec can raise on hostile input besides DecodeError: nesting past
#: the interpreter's recursion limit, and invalid UTF-8 inside a bytes frame.
DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def describe(exc: Exception) -> str:
    """A one-line message for a decode error (no input is quoted)."""
    if isinstance(exc, RecursionError):
        return "JSON is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"invalid UTF-8 at byte {exc.start}"
    return str(exc)
