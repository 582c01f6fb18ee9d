"""JSON as the coordinator's Go code reads and writes it (``encoding/json``).

The stub stands for a Go program, so it must refuse exactly what Go refuses
and accept exactly what Go accepts. Python's :mod:`json` parses the text (in
C); hooks keep what Go's rules need:

* every number keeps its literal text (:class:`GoNumber`): Go decodes ``1.0``
  and ``1e3`` into ``float64`` but refuses them for ``int``/``int64``/
  ``uint64``, and refuses ``1e400`` even for ``float64``;
* every object keeps its members in order (:class:`GoObject`): a later
  duplicate key wins, as in Go, and struct fields match keys case-
  insensitively (:func:`field`), as Go's struct decoding does;
* ``NaN`` and ``Infinity`` are not JSON (Go refuses them);
* a lone UTF-16 surrogate escape decodes to U+FFFD, as in Go (:func:`text`).

The ``unmarshal_*`` functions are Go's ``json.Unmarshal`` into one Go type.
``null`` leaves a Go value untouched, so they return :data:`ABSENT` for it and
the caller keeps its zero value, exactly where Go would.

:func:`marshal` is Go's ``json.Marshal`` for the stub's outbound frames: HTML
characters and U+2028/U+2029 are escaped like Go does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, Final

#: Go's int / int64 range (the coordinator is built for amd64/arm64).
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
UINT64_MAX: Final = 2**64 - 1

_SURROGATES = re.compile("[\ud800-\udfff]")
_INT_LITERAL = re.compile(r"-?(?:0|[1-9][0-9]*)")


class GoJSONError(ValueError):
    """Text Go's decoder refuses, or a value that does not fit the Go type."""


class _Absent:
    """``null`` decoded into a Go value: the value stays as it was."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


#: What ``null`` unmarshals into: nothing (Go keeps the zero value).
ABSENT: Final = _Absent()


class GoNumber:
    """A JSON number with its literal text (Go's ``json.Number``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def is_integer_literal(self) -> bool:
        """Whether the literal has no fraction and no exponent."""
        return _INT_LITERAL.fullmatch(self.text) is not None

    def __repr__(self) -> str:
        return f"GoNumber({self.text})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GoNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class GoObject(dict[str, Any]):
    """A JSON object: a dict where the last duplicate key won, plus every pair in order."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _constant(name: str) -> Any:
    raise GoJSONError(f"invalid character {name[0]!r} looking for beginning of value")


_decoder = json.JSONDecoder(
    object_pairs_hook=GoObject,
    parse_int=GoNumber,
    parse_float=GoNumber,
    parse_constant=_constant,
)


def loads(data: str | bytes) -> Any:
    """Parse ``data`` as Go would (one JSON value, nothing after it).

    Raises :class:`GoJSONError` for anything Go's decoder refuses.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GoJSONError(f"invalid UTF-8: {exc}") from None
    try:
        return _decoder.decode(data)
    except GoJSONError:
        raise
    except (ValueError, RecursionError) as exc:
        raise GoJSONError(str(exc)) from None


def text(value: str) -> str:
    """A decoded JSON string as Go holds it (lone surrogates become U+FFFD)."""
    return _SURROGATES.sub("\ufffd", value)


def type_name(value: Any) -> str:
    """The JSON kind of a decoded value, as Go's errors name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, GoNumber):
        return "number " + value.text[:32]
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _mismatch(value: Any, go_type: str) -> GoJSONError:
    return GoJSONError(f"cannot unmarshal {type_name(value)} into Go value of type {go_type}")


# ---------------------------------------------------------------------------
# json.Unmarshal into one Go type


def unmarshal_int(value: Any, go_type: str = "int") -> int | _Absent:
    """``int``/``int64`` (64-bit): an integer literal in range; ``null`` is :data:`ABSENT`."""
    if value is None:
        return ABSENT
    if not isinstance(value, GoNumber) or not value.is_integer_literal:
        raise _mismatch(value, go_type)
    number = int(value.text)
    if not INT64_MIN <= number <= INT64_MAX:
        raise _mismatch(value, go_type)
    return number


def unmarshal_uint64(value: Any) -> int | _Absent:
    """``uint64``: a non-negative integer literal below 2**64."""
    if value is None:
        return ABSENT
    if not isinstance(value, GoNumber) or not value.is_integer_literal:
        raise _mismatch(value, "uint64")
    number = int(value.text)
    if not 0 <= number <= UINT64_MAX or value.text.startswith("-"):
        raise _mismatch(value, "uint64")
    return number


def unmarshal_float(value: Any) -> float | _Absent:
    """``float64``: any number whose value is finite."""
    if value is None:
        return ABSENT
    if not isinstance(value, GoNumber):
        raise _mismatch(value, "float64")
    number = float(value.text)
    if number in (float("inf"), float("-inf")):
        raise _mismatch(value, "float64")
    return number


def unmarshal_string(value: Any) -> str | _Absent:
    """``string``: a JSON string (surrogates repaired)."""
    if value is None:
        return ABSENT
    if not isinstance(value, str):
        raise _mismatch(value, "string")
    return text(value)


def unmarshal_bool(value: Any) -> bool | _Absent:
    """``bool``: ``true`` or ``false``."""
    if value is None:
        return ABSENT
    if not isinstance(value, bool):
        raise _mismatch(value, "bool")
    return value


def unmarshal_strings(value: Any) -> list[str] | _Absent:
    """``[]string``: an array whose ``null`` elements decode to ``""``."""
    if value is None:
        return ABSENT
    if not isinstance(value, list):
        raise _mismatch(value, "[]string")
    out = []
    for item in value:
        decoded = unmarshal_string(item)
        out.append("" if decoded is ABSENT else decoded)
    return out  # type: ignore[return-value]


def unmarshal_object(value: Any, go_type: str) -> GoObject | _Absent:
    """A Go struct or map: a JSON object; ``null`` is :data:`ABSENT`."""
    if value is None:
        return ABSENT
    if not isinstance(value, GoObject):
        raise _mismatch(value, go_type)
    return value


def field(obj: GoObject, name: str) -> tuple[bool, Any]:
    """A struct field of ``obj`` as Go matches it: ``(present, value)``.

    Go's struct decoding matches keys case-insensitively (an exact match is
    preferred, but a struct has one field per name), and a later key
    overwrites an earlier one.
    """
    folded = name.casefold()
    found: tuple[bool, Any] = (False, None)
    for key, value in obj.pairs:
        if key == name or key.casefold() == folded:
            found = (True, value)
    return found


def struct_value(obj: GoObject, name: str) -> Any:
    """``field(obj, name)[1]``: the value, or ``None`` when absent (Go: zero value)."""
    return field(obj, name)[1]


# ---------------------------------------------------------------------------
# Raw member spans (json.RawMessage)


def _skip_value(s: str, i: int) -> int:
    """Index just past the JSON value starting at ``s[i]`` (``s`` is valid JSON)."""
    c = s[i]
    if c == '"':
        i += 1
        while True:
            c = s[i]
            if c == "\\":
                i += 2
                continue
            i += 1
            if c == '"':
                return i
    if c in "[{":
        depth = 0
        while True:
            c = s[i]
            if c == '"':
                i = _skip_value(s, i)
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
    j = i
    while j < len(s) and s[j] not in ",]} \t\r\n":
        j += 1
    return j


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def raw_members(data: str) -> Iterator[tuple[str, str]]:
    """``(key, raw value text)`` of each member of the top-level object in ``data``.

    ``data`` must already be known to be valid JSON (:func:`loads`). The raw
    text is what Go keeps in a ``json.RawMessage``: the value's exact bytes,
    without the whitespace around it.
    """
    i = _skip_ws(data, 0)
    if i >= len(data) or data[i] != "{":
        return
    i = _skip_ws(data, i + 1)
    if data[i] == "}":
        return
    while True:
        key_end = _skip_value(data, i)
        key = text(json.loads(data[i:key_end]))
        i = _skip_ws(data, key_end)
        i = _skip_ws(data, i + 1)  # the colon
        value_end = _skip_value(data, i)
        yield key, data[i:value_end]
        i = _skip_ws(data, value_end)
        if data[i] == "}":
            return
        i = _skip_ws(data, i + 1)  # the comma


def raw_member(data: str, key: str) -> str | None:
    """The raw text of top-level member ``key`` (the last one, as Go keeps), or ``None``."""
    found = None
    for name, raw in raw_members(data):
        if name == key:
            found = raw
    return found


# ---------------------------------------------------------------------------
# json.Marshal


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Go escapes these even outside HTML: <, >, & (HTMLEscape) and the two JavaScript
# line terminators.
_ESCAPES.update({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})
_ESCAPES.update({"\u2028": "\\u2028", "\u2029": "\\u2029"})
_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')


def _escape(match: re.Match[str]) -> str:
    c = match.group(0)
    if c in _ESCAPES:
        return _ESCAPES[c]
    if "\ud800" <= c <= "\udfff":
        return "\ufffd"
    return f"\\u{ord(c):04x}"


def marshal_string(value: str) -> str:
    """A Go-encoded JSON string literal."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'


def marshal(value: Any) -> str:
    """Encode ``value`` as Go's ``json.Marshal`` does (dict order is kept).

    Supports ``None``, ``bool``, ``int``, ``float`` (finite), ``str``,
    :class:`GoNumber`, lists and dicts (keys in the order given: callers pass
    struct fields in declaration order, as Go writes them).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("json: unsupported value: non-finite float")
        return _go_float(value)
    if isinstance(value, GoNumber):
        return value.text
    if isinstance(value, str):
        return marshal_string(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(marshal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(marshal_string(k) + ":" + marshal(v) for k, v in value.items()) + "}"
    raise TypeError(f"cannot marshal {type(value).__name__}")


def _go_float(value: float) -> str:
    # strconv.FormatFloat(f, 'f' or 'e', -1, 64) as encoding/json picks it:
    # shortest digits, exponent form below 1e-6 and from 1e21, "e-09" -> "e-9".
    shortest = Decimal(repr(value))
    absolute = abs(value)
    if absolute != 0 and (absolute < 1e-6 or absolute >= 1e21):
        mantissa, _, exponent = f"{shortest:e}".partition("e")
        if "." in mantissa:
            mantissa = mantissa.rstrip("0").rstrip(".")
        number = int(exponent)
        return f"{mantissa}e{'-' if number < 0 else '+'}{abs(number):02d}".replace("e-0", "e-")
    fixed = format(shortest, "f")
    if "." in fixed:
        fixed = fixed.rstrip("0").rstrip(".")
    return fixed


# ---------------------------------------------------------------------------
# Struct decoding


def pointer(decode: Any) -> Any:
    """A pointer field (``*T``): ``null`` sets it to ``None`` instead of keeping it."""

    def decode_pointer(value: Any) -> Any:
        return None if value is None else decode(value)

    return decode_pointer


def decode_struct(value: Any, fields: dict[str, Any], go_type: str) -> dict[str, Any]:
    """``json.Unmarshal`` of ``value`` into a Go struct with ``fields``.

    ``fields`` maps each JSON field name to its decoder (``unmarshal_*``, a
    :func:`pointer`, or a nested ``decode_struct`` call). Keys match
    case-insensitively and later keys overwrite earlier ones; unknown keys
    are ignored; a value of the wrong type is an error (the first one is
    raised, after the whole object was walked, as Go does). Absent and
    ``null`` (non-pointer) fields are missing from the result.
    """
    obj = unmarshal_object(value, go_type)
    out: dict[str, Any] = {}
    if obj is ABSENT:
        return out
    assert isinstance(obj, GoObject)
    folded = {name.casefold(): name for name in fields}
    error: GoJSONError | None = None
    for key, item in obj.pairs:
        name = key if key in fields else folded.get(key.casefold())
        if name is None:
            continue
        try:
            decoded = fields[name](item)
        except GoJSONError as exc:
            if error is None:
                error = GoJSONError(f"{go_type}.{name}: {exc}")
            continue
        if decoded is not ABSENT:
            out[name] = decoded
    if error is not None:
        raise error
    return out
