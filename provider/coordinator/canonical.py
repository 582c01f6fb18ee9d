"""Canonical JSON (RFC 8785, "JCS") as the coordinator computes it: pure.

Receipts, identity signatures, the auth transcript hash and the catalog row
policy digest are all SHA-256 or Ed25519 over these bytes, so they must match
the coordinator's ``billing.CanonicalJSON`` byte for byte:

- objects: keys sorted by UTF-16 code units, compact (no whitespace); keys
  are written as given (not normalised);
- strings: NFC-normalised first, except :class:`RawString` values (tool-call
  arguments); escaped as ``\\"`` ``\\\\`` ``\\b`` ``\\t`` ``\\n`` ``\\f``
  ``\\r``, any other character below U+0020 as ``\\u00xx`` (lowercase hex),
  everything else (``/``, ``<``, U+007F, U+2028, non-ASCII) as raw UTF-8;
- integers: decimal, within int64 (the coordinator's Go type);
- floats: finite only. An integral float within int64 is written as the
  integer (what the coordinator does with a JSON number it decoded), any
  other float in ECMAScript ``Number.prototype.toString`` form;
- ``None``, ``True``, ``False``: ``null``, ``true``, ``false``.

Anything else (a lone surrogate, NaN, a tuple of bytes) raises
:class:`CanonicalJSONError`: a value the coordinator could not have hashed
the same way must not be signed.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CanonicalJSONError", "RawString", "canonical_json", "canonical_sha256", "loads"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
for _code in range(0x20):
    _ESCAPES.setdefault(chr(_code), f"\\u{_code:04x}")
_ESCAPE_TABLE = str.maketrans(_ESCAPES)


class CanonicalJSONError(ValueError):
    """A value that has no canonical JSON form the coordinator would agree on."""


class RawString(str):
    """A string written without NFC normalisation (the coordinator's ``RawJSONString``)."""

    __slots__ = ()


def _string(value: str, *, normalize: bool) -> str:
    if normalize and not isinstance(value, RawString):
        value = unicodedata.normalize("NFC", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalJSONError("string holds a lone surrogate; it is not valid UTF-8") from None
    return '"' + value.translate(_ESCAPE_TABLE) + '"'


def _digits_and_exponent(value: float) -> tuple[str, int]:
    """Shortest round-trip digits (no leading or trailing zeros) and the
    exponent ``e`` such that ``value == 0.DIGITS * 10**e``."""
    text = repr(value)
    if "e" in text or "E" in text:
        mantissa, _, exp_text = text.lower().partition("e")
        exponent = int(exp_text)
    else:
        mantissa, exponent = text, 0
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    leading = len(whole + fraction) - len(digits)
    point = len(whole) - leading + exponent
    return digits.rstrip("0") or "0", point


def _ecmascript_number(value: float) -> str:
    """``Number.prototype.toString`` for a finite, non-zero, positive float."""
    digits, e = _digits_and_exponent(value)
    k = len(digits)
    if k <= e <= 21:
        return digits + "0" * (e - k)
    if 0 < e <= 21:
        return digits[:e] + "." + digits[e:]
    if -6 < e <= 0:
        return "0." + "0" * -e + digits
    exponent = e - 1
    mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"


def _number(value: int | float) -> str:
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise CanonicalJSONError(f"integer {value} does not fit in int64")
        return str(value)
    if not math.isfinite(value):
        raise CanonicalJSONError(f"{value} has no JSON form")
    if value == 0:
        return "0"
    if value == math.trunc(value) and _INT64_MIN <= value < 2.0**63:
        return str(int(value))
    return ("-" if value < 0 else "") + _ecmascript_number(abs(value))


def _write(value: Any, out: list[str], normalize: bool) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value, normalize=normalize))
    elif isinstance(value, int | float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalJSONError(f"object key {key!r} is not a string")
        out.append("{")
        # UTF-16 big-endian bytes compare like UTF-16 code units.
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(_string(key, normalize=False))
            out.append(":")
            _write(value[key], out, normalize)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out, normalize)
        out.append("]")
    else:
        raise CanonicalJSONError(f"{type(value).__name__} has no canonical JSON form")


def _utf16_key(key: str) -> bytes:
    try:
        return key.encode("utf-16-be")
    except UnicodeEncodeError:
        raise CanonicalJSONError("object key holds a lone surrogate") from None


def canonical_json(value: Any, *, normalize_strings: bool = True) -> bytes:
    """The canonical UTF-8 bytes of ``value`` (dicts, lists, str, int, float, bool, None).

    ``normalize_strings=False`` writes every string as given, like the
    coordinator's ``CanonicalJSONRawStrings``.
    """
    out: list[str] = []
    _write(value, out, normalize_strings)
    return "".join(out).encode("utf-8")


def canonical_sha256(value: Any) -> str:
    """Lowercase hex SHA-256 of :func:`canonical_json` (``CanonicalSHA256Hex``)."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def loads(data: str | bytes) -> Any:
    """Parse JSON the way the coordinator does before canonicalising it.

    Duplicate keys keep the last value (Go's ``encoding/json``), and the
    constants ``NaN``/``Infinity`` that Python would accept are refused.
    """

    def refuse(name: str) -> Any:
        raise CanonicalJSONError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)
