"""Canonical JSON (RFC 8785) as the coordinator computes it (``billing/jcs.go``).

Used for the auth transcript hash, identity signatures, receipts, route
snapshots and settlement outputs. The rules, ported from the Go code:

* object keys sorted by UTF-16 code units; keys are not normalised;
* string values NFC-normalised, except :class:`RawJSONString` values (tool
  call arguments), which are kept as they are;
* escapes ``\\" \\\\ \\b \\t \\n \\f \\r``, any other character below U+0020 as
  ``\\u00xx`` (lowercase hex); nothing else escaped (no HTML escaping, no
  ``\\/``, U+007F and U+2028 raw); non-ASCII as raw UTF-8;
* numbers in ECMAScript ``Number.prototype.toString`` form; a
  :class:`~coordinator_stub.gojson.GoNumber` (Go's ``json.Number``) that is an
  integer literal fitting int64 is written as that integer.

Values: ``None``, ``bool``, ``int``, ``float``, ``str``, :class:`RawJSONString`,
:class:`~coordinator_stub.gojson.GoNumber`, lists and dicts.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from typing import Any

from .gojson import INT64_MAX, INT64_MIN, GoNumber, text

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")


class RawJSONString(str):
    """A string value canonicalised without NFC (``billing.RawJSONString``)."""

    __slots__ = ()


class JCSError(ValueError):
    """A value canonical JSON cannot encode (a non-finite number, an unknown type)."""


def canonical(value: Any) -> bytes:
    """The canonical UTF-8 bytes of ``value`` (``billing.CanonicalJSON``)."""
    out: list[str] = []
    _write(out, value)
    return "".join(out).encode("utf-8", "surrogatepass")


def canonical_sha256_hex(value: Any) -> str:
    """``hex(sha256(canonical(value)))`` (``billing.CanonicalSHA256Hex``)."""
    return hashlib.sha256(canonical(value)).hexdigest()


def _write(out: list[str], value: Any) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, RawJSONString):
        out.append(escape(text(str(value))))
    elif isinstance(value, str):
        out.append(escape(unicodedata.normalize("NFC", text(value))))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, GoNumber):
        out.append(json_number(value.text))
    elif isinstance(value, float):
        out.append(double(value))
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(out, item)
        out.append("]")
    elif isinstance(value, dict):
        keys = sorted((text(k) for k in value), key=_utf16_key)
        lookup = {text(k): v for k, v in value.items()}
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(escape(key))
            out.append(":")
            _write(out, lookup[key])
        out.append("}")
    else:
        raise JCSError(f"unsupported JCS value {type(value).__name__}")


def _utf16_key(key: str) -> bytes:
    # Big-endian UTF-16 compares code unit by code unit.
    return key.encode("utf-16-be", "surrogatepass")


_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_ESCAPE = re.compile('["\\\\\x00-\x1f]')


def _escape_char(match: re.Match[str]) -> str:
    c = match.group(0)
    return _SHORT.get(c) or f"\\u{ord(c):04x}"


def escape(value: str) -> str:
    """A JCS string literal (``escapeJCSString``)."""
    return '"' + _ESCAPE.sub(_escape_char, value) + '"'


def json_number(raw: str) -> str:
    """A ``json.Number`` literal in canonical form (``canonicalJSONNumber``)."""
    if _INTEGER.fullmatch(raw):
        number = int(raw)
        if INT64_MIN <= number <= INT64_MAX:
            return str(number)
    try:
        value = float(raw)
    except ValueError:
        raise JCSError(f"invalid JSON number {raw!r}") from None
    if math.isinf(value) or math.isnan(value):
        raise JCSError(f"invalid JSON number {raw!r}")
    if value == math.trunc(value) and -(2.0**63) <= value <= 2.0**63:
        # Go converts with int64(f); 2**63 itself overflows to MinInt64 there.
        integer = int(value)
        return str(INT64_MIN if integer == 2**63 else integer)
    return double(value)


def double(value: float) -> str:
    """ECMAScript ``Number.prototype.toString`` of a finite float (``canonicalDouble``)."""
    if math.isinf(value) or math.isnan(value):
        raise JCSError("non-finite number")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    digits, exponent = _digits_and_exponent(abs(value))
    return sign + _render(digits, exponent)


def _digits_and_exponent(value: float) -> tuple[str, int]:
    # Shortest round-trip digits d1..dk and n such that value = 0.d1..dk * 10**n.
    mantissa, _, exp = repr(value).partition("e")
    point = mantissa.find(".")
    integer_digits = len(mantissa) if point < 0 else point
    digits = mantissa.replace(".", "")
    shift = int(exp) if exp else 0
    leading = len(digits) - len(digits.lstrip("0"))
    digits = digits.strip("0") or "0"
    if digits == "0":
        return "0", 1
    return digits, integer_digits - leading + shift


def _render(digits: str, e: int) -> str:
    k = len(digits)
    if k <= e <= 21:
        return digits + "0" * (e - k)
    if 0 < e <= 21:
        return digits[:e] + "." + digits[e:]
    if -6 < e <= 0:
        return "0." + "0" * (-e) + digits
    exponent = e - 1
    mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"
