"""Hypothesis strategies for hostile input, each case carrying the answer it must get.

Two families:

- :func:`bad_bodies` / :func:`valid_bodies`: chat completion bodies (the
  ``inference_request.body`` and the buyer's HTTP body). A bad body knows
  which field the error must name.
- :func:`frame_cases`: WebSocket frames at the provider, each with the
  answer it must get (a ``nak`` and what it names, an end frame, a
  ``preflight_ack``, or nothing); :func:`frame_batch` draws a batch of them
  in fixed proportions.

:func:`draw` turns a strategy into a list of examples (the same every run),
so one long-lived provider can be fed a whole batch from inside an async
test.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from provider.coordinator.messages import MAX_FRAME_BYTES, MAX_TYPE_ECHO
from provider.openai.request import MAX_BODY_BYTES, MAX_MESSAGES, MAX_STOP, MAX_TOKENS_LIMIT

T = TypeVar("T")

#: The scripted engine's context (it counts prompt characters).
CONTEXT_CHARS = 4096

ROLES = ("system", "developer", "user", "assistant", "tool")

#: Strings that break naive handling: NUL and other controls, bidi overrides,
#: emoji (astral, ZWJ sequences), BOM, noncharacters, combining marks, line
#: and paragraph separators, quotes and backslashes, markup.
EDGE_STRINGS = (
    "\x00",
    "\x00\x00nul",
    "\x1b[31m",
    "\u202eevil\u202c",
    "\u200f\u05e9\u05dc\u05d5\u05dd",
    "\u0627\u0644\u0633\u0644\u0627\u0645",
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "\ufeff",
    "\uffff\ufffe",
    "\U0010ffff",
    "e\u0301\u0301\u0301",
    "\u2028\u2029",
    '"',
    "\\",
    "\\u0000",
    "</script><script>",
    "%s%n{0}",
    "\U0001d54f" * 8,
)


def draw(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """``n`` examples of ``strategy``, the same ones every run."""
    drawn: list[T] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: T) -> None:
        drawn.append(value)

    collect()
    return drawn


@functools.cache
def edge_text(max_size: int = 24) -> st.SearchStrategy[str]:
    """Short text, biased to :data:`EDGE_STRINGS`."""
    return st.one_of(
        st.sampled_from(EDGE_STRINGS),
        st.text(max_size=max_size),
        st.lists(st.sampled_from(EDGE_STRINGS), min_size=1, max_size=4).map("".join),
    )


def repeat_to(piece: str, n_bytes: int) -> str:
    """``piece`` repeated to about ``n_bytes`` of UTF-8 (at least once)."""
    return piece * max(1, n_bytes // max(1, len(piece.encode())))


@functools.cache
def long_text(min_bytes: int, max_bytes: int, *, controls: bool = True) -> st.SearchStrategy[str]:
    """A long string of an edge piece, ``min_bytes`` to ``max_bytes`` of UTF-8.

    ``controls=False`` leaves out control characters, which JSON escapes
    to six bytes each (so the JSON size stays close to the UTF-8 size).
    """
    pieces = ("a", "\u202e\u05e9", "\U0001f600", "\u20ac", "e\u0301")
    if controls:
        pieces += ("ab\x00", "\x1b\n")

    def build(piece: str, n: int) -> str:
        text = repeat_to(piece, n)
        return text + "x" * (min_bytes - len(text.encode()))

    return st.builds(build, st.sampled_from(pieces), st.integers(min_bytes, max_bytes))


@functools.cache
def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
        st.floats(allow_nan=False, allow_infinity=False),
        edge_text(),
    )


@functools.cache
def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value (nesting stays shallow: deep nesting has its own tests)."""
    return st.recursive(
        scalars(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(edge_text(8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


@functools.cache
def not_of(*kinds: type) -> st.SearchStrategy[Any]:
    """JSON values of none of ``kinds`` (``bool`` is never an ``int`` here)."""

    def ok(value: Any) -> bool:
        if isinstance(value, bool):
            return bool not in kinds
        if value is None:
            return type(None) not in kinds
        return not isinstance(value, kinds)

    return json_values(6).filter(ok)


def dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))


# --------------------------------------------------------------------------
# Chat completion bodies


@dataclass(frozen=True)
class BadBody:
    """A body ``decode_chat_request`` must refuse.

    ``path`` is the JSON path the error must name (without ``$.``), and
    ``missing`` the required field it must name as missing; both ``None``
    for errors about the whole body (not JSON, not an object, too large).
    """

    label: str
    body: str
    path: str | None = None
    missing: str | None = None
    mention: str = ""

    def mentions(self) -> list[str]:
        """Substrings the error message must contain."""
        found = [self.mention] if self.mention else []
        if self.missing is not None:
            found.append(f"missing required field `{self.missing}`")
            if self.path is not None:
                found.append(f"at `$.{self.path}`")
        elif self.path is not None:
            found.append(f"`$.{self.path}`")
        return found

    @property
    def param(self) -> str | None:
        """The OpenAI ``error.param`` the stub must answer with."""
        parts = [p for p in (self.path, self.missing) if p]
        return ".".join(parts) or None


@dataclass(frozen=True)
class ValidBody:
    body: str
    stream: bool
    #: Whether the prompt fits the scripted engine's context.
    fits: bool


def _message(role: str = "user", content: Any = "hi") -> dict[str, Any]:
    return {"role": role, "content": content}


_CONTENT = st.one_of(
    edge_text(60),
    st.none(),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": edge_text(30)}), max_size=3),
)
_GOOD_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from([r for r in ROLES if r != "tool"]), "content": _CONTENT},
    optional={"name": edge_text(16)},
) | st.fixed_dictionaries(
    {"role": st.just("tool"), "content": _CONTENT, "tool_call_id": edge_text(16).filter(bool)}
)


def _good_messages() -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(_GOOD_MESSAGE, min_size=1, max_size=3)


_WRONG_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=MAX_TOKENS_LIMIT + 1),
        st.sampled_from([0, -1, 10**12, 10**30, -(10**30)]),
        not_of(int, type(None)),
    ),
    "max_completion_tokens": st.one_of(st.sampled_from([0, -5, 10**12]), not_of(int, type(None))),
    "temperature": st.one_of(
        st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
        st.floats(min_value=2.000001, allow_nan=False, allow_infinity=False),
        not_of(int, float, type(None)),
    ),
    "top_p": st.one_of(
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
        st.floats(min_value=1.000001, allow_nan=False, allow_infinity=False),
        not_of(int, float, type(None)),
    ),
    "n": st.one_of(st.integers().filter(lambda v: v != 1), st.just(2), not_of(int)),
    "stream": not_of(bool),
    "seed": not_of(int, type(None)),
    "model": not_of(str, type(None)),
    "stream_options": not_of(dict, type(None)),
}


@st.composite
def _wrong_field(draw_: st.DrawFn) -> BadBody:
    name = draw_(st.sampled_from(sorted(_WRONG_FIELD)))
    value = draw_(_WRONG_FIELD[name])
    body = {"messages": draw_(_good_messages()), name: value}
    return BadBody(f"wrong {name}", dumps(body, draw_(st.booleans())), path=name)


@st.composite
def _wrong_stop(draw_: st.DrawFn) -> BadBody:
    kind = draw_(st.sampled_from(["too_many", "empty", "too_long", "type", "item_type"]))
    path = "stop"
    if kind == "too_many":
        stop: Any = draw_(st.lists(edge_text().filter(bool), min_size=MAX_STOP + 1, max_size=9))
    elif kind == "too_long":
        i = draw_(st.integers(0, MAX_STOP - 1))
        stop = ["ok"] * i + ["x" * draw_(st.integers(257, 5000))]
        path = f"stop[{i}]"
    elif kind == "empty":
        stop = [""]
        path = "stop[0]"
    elif kind == "item_type":
        stop = [draw_(not_of(str))]
        path = "stop[0]"
    else:
        stop = draw_(not_of(str, list, type(None)))
    body = {"messages": [_message()], "stop": stop}
    return BadBody(f"stop {kind}", dumps(body, draw_(st.booleans())), path=path)


@st.composite
def _wrong_messages(draw_: st.DrawFn) -> BadBody:
    kind = draw_(
        st.sampled_from(
            [
                "empty",
                "not_list",
                "too_many",
                "item",
                "role",
                "role_type",
                "no_role",
                "content",
                "part",
                "part_type",
                "part_no_text",
                "name",
            ]
        )
    )
    good = draw_(_good_messages())
    i = draw_(st.integers(0, len(good)))
    messages: Any = list(good)
    path: str | None = f"messages[{i}]"
    missing = None
    if kind == "empty":
        messages, path = [], "messages"
    elif kind == "not_list":
        messages, path = draw_(not_of(list)), "messages"
    elif kind == "too_many":
        messages, path = [_message()] * (MAX_MESSAGES + draw_(st.integers(1, 50))), "messages"
        i = -1
    elif kind == "item":
        messages.insert(i, draw_(not_of(dict)))
    elif kind == "role":
        role = draw_(edge_text().filter(lambda r: r not in ROLES))
        messages.insert(i, _message(role))
        path += ".role"
    elif kind == "role_type":
        messages.insert(i, _message(draw_(not_of(str))))
        path += ".role"
    elif kind == "no_role":
        messages.insert(i, {"content": "hi"})
        missing = "role"
    elif kind == "content":
        messages.insert(i, _message(content=draw_(not_of(str, list, type(None)))))
        path += ".content"
    elif kind == "part":
        messages.insert(i, _message(content=[draw_(not_of(dict))]))
        path += ".content[0]"
    elif kind == "part_type":
        part_type = draw_(edge_text().filter(lambda t: t != "text"))
        messages.insert(i, _message(content=[{"type": part_type, "text": "x"}]))
        path += ".content[0].type"
    elif kind == "part_no_text":
        messages.insert(i, _message(content=[{"type": "text"}]))
        path += ".content[0]"
        missing = "text"
    else:
        messages.insert(i, {**_message(), "name": draw_(not_of(str, type(None)))})
        path += ".name"
    body = {"messages": messages}
    return BadBody(f"messages {kind}", dumps(body, draw_(st.booleans())), path, missing)


@st.composite
def _no_messages(draw_: st.DrawFn) -> BadBody:
    # Known fields with valid values only, so `messages` is the first error.
    extra = draw_(
        st.fixed_dictionaries(
            {},
            optional={
                "stream": st.booleans(),
                "seed": st.integers(-(2**63), 2**63 - 1),
                "user": edge_text(20),
                "model": edge_text(20),
            },
        )
    )
    return BadBody("no messages", dumps(extra, draw_(st.booleans())), missing="messages")


@st.composite
def _unknown_field(draw_: st.DrawFn) -> BadBody:
    """A field OpenAI's API does not have: refused by name, as OpenAI refuses it."""
    from provider.openai.request import FIELDS

    name = draw_(
        st.sampled_from(["logprobs_unknown_field", "\U0001f600", "ignore_eos", "best_of"])
        | edge_text(8).filter(lambda k: k and k not in FIELDS and "`" not in k)
    )
    body = {"messages": draw_(_good_messages()), name: draw_(json_values(6))}
    return BadBody(f"unknown field {name!r}", dumps(body, draw_(st.booleans())), path=name)


@st.composite
def _not_object(draw_: st.DrawFn) -> BadBody:
    value = draw_(not_of(dict))
    return BadBody("not an object", dumps(value, True), mention="Expected `object`")


#: Bodies that are not JSON at all (or not only JSON).
NOT_JSON = (
    "",
    " ",
    "not json",
    "{'messages': []}",
    '{"messages": [}',
    '{"messages":[{"role":"user","content":"hi"}]} trailing',
    '{"messages":[{"role":"user","content":"hi"}],}',
    '{"messages":[{"role":"user","content":"\\ud800"}]}',
    '{"messages":[{"role":"user","content":"\\udc00x"}]}',
    '{"messages":[{"role":"user","content":"a\x00b"}]}',
    '{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
    '{"messages":[{"role":"user","content":"hi"}],"temperature":Infinity}',
    "\ufeff{}",
    "null garbage",
)


@st.composite
def _not_json(draw_: st.DrawFn) -> BadBody:
    choice = draw_(st.integers(0, 2))
    if choice == 0:
        body = draw_(st.sampled_from(NOT_JSON))
    elif choice == 1:  # a valid body, truncated
        full = dumps({"messages": draw_(_good_messages())}, draw_(st.booleans()))
        body = full[: draw_(st.integers(0, len(full) - 1))]
    else:
        body = draw_(st.text(min_size=1)).strip()
        if body[:1] in '{["-0123456789tfn':
            body = "@" + body
    return BadBody("not JSON", body)


@st.composite
def _too_large(draw_: st.DrawFn) -> BadBody:
    # Multi-byte text: under the limit in characters, over it in bytes.
    content = draw_(long_text(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 48 * 1024, controls=False))
    body = dumps({"messages": [_message(content=content)]}, False)
    return BadBody("too large", body, mention="request body is")


def bad_bodies() -> st.SearchStrategy[BadBody]:
    """Bodies that must be refused, naming the field when there is one."""
    return st.one_of(
        _wrong_field(),
        _wrong_field(),
        _wrong_stop(),
        _wrong_messages(),
        _wrong_messages(),
        _no_messages(),
        _unknown_field(),
        _not_object(),
        _not_json(),
        _too_large(),
    )


_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.sampled_from([1, 2, MAX_TOKENS_LIMIT]) | st.none(),
    "max_completion_tokens": st.integers(1, MAX_TOKENS_LIMIT),
    "temperature": st.floats(0.0, 2.0) | st.none(),
    "top_p": st.floats(0.0, 1.0, exclude_min=True),
    "n": st.just(1),
    "seed": st.integers(-(2**63), 2**63 - 1) | st.none(),
    "stop": st.none()
    | st.text(max_size=20)
    | st.lists(edge_text(8).filter(bool), max_size=MAX_STOP),
    "model": edge_text(20) | st.none(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": edge_text(20),
    "top_k": st.integers(-1, 100),
}


@st.composite
def valid_bodies(draw_: st.DrawFn) -> ValidBody:
    """Bodies that must be served (or refused for context length when too long)."""
    messages = draw_(_good_messages())
    if draw_(st.integers(0, 9)) == 0:
        messages.append(_message(content=draw_(long_text(CONTEXT_CHARS * 4, 200_000))))
    body: dict[str, Any] = {"messages": messages}
    stream = draw_(st.booleans())
    if stream or draw_(st.booleans()):
        body["stream"] = stream
    for name in draw_(st.lists(st.sampled_from(sorted(_OPTIONAL)), unique=True, max_size=5)):
        body[name] = draw_(_OPTIONAL[name])
    prompt = 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            prompt += len(content)
        elif isinstance(content, list):
            prompt += sum(len(part["text"]) for part in content)
    return ValidBody(dumps(body, draw_(st.booleans())), stream, prompt <= CONTEXT_CHARS)


# --------------------------------------------------------------------------
# Frames at the provider

#: ``ignored``: no answer at all (a frame of a type the provider does not
#: know: a nak would make the coordinator stop routing to it).
Answer = Literal["nak", "end", "ack", "none", "ignored"]

#: Frames stay this far under the 4 MiB limit (room for the request id).
FRAME_ROOM = MAX_FRAME_BYTES - 4096

#: Stands for the case's (unique) request id in a frame template.
RID = "@@RID@@"


@dataclass(frozen=True)
class FrameCase:
    """One frame and the answer it must get.

    ``template`` is the frame; a JSON string ``"@@RID@@"`` in it is replaced
    with a request id unique to the case (:meth:`render`). ``in_reply_to``
    is what a nak names; :data:`RID` there stands for that request id (a
    frame with a usable ``request_id`` gets a nak naming the request).
    """

    label: str
    template: str | bytes
    answer: Answer
    in_reply_to: str = "unknown"
    code: str = "malformed_message"
    mentions: tuple[str, ...] = ()
    #: Acceptable end statuses (``answer == "end"``), fnmatch patterns.
    statuses: tuple[str, ...] = ()
    rid_prefix: str = "r"
    ascii_only: bool = True
    #: For a preflight: whether the estimate exceeds the context.
    too_big: bool = False

    def render(self, index: int) -> tuple[str | bytes, str]:
        """The frame to send and its request id (``""`` if it has none)."""
        if isinstance(self.template, bytes) or f'"{RID}"' not in self.template:
            return self.template, ""
        rid = f"{self.rid_prefix}#{index}"
        return self.template.replace(f'"{RID}"', dumps(rid, self.ascii_only)), rid

    def reply_to(self, rid: str) -> str:
        """The ``in_reply_to`` a nak must carry, for the rendered request id."""
        return rid if self.in_reply_to == RID else self.in_reply_to


#: Bad request ids: not strings, empty, or over 256 characters (even at four
#: bytes a character).
_RID_BAD = st.one_of(not_of(str), st.just(""), long_text(1100, 300_000))
#: Fields of the messages a provider receives, and how to break each.
_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "inference_request": {
        "request_id": _RID_BAD,
        "stream": not_of(bool),
        "body": not_of(str, type(None)),  # null is "no body": see _REQUIRED
    },
    "cancel_request": {"request_id": _RID_BAD, "reason": not_of(str)},
    "preflight": {
        "request_id": _RID_BAD,
        "estimated_tokens": st.one_of(st.integers(max_value=-1), st.just(-(10**40)), not_of(int)),
    },
    "hello_ack": {
        "coordinator_version": not_of(int),
        "assigned_id": not_of(str),
        "heartbeat_interval_s": st.one_of(
            st.integers(max_value=0), st.integers(min_value=3601), not_of(int)
        ),
        "tier": not_of(str),
        "assigned_provider_token": not_of(str, type(None)),
        "required_binary_version": not_of(str, type(None)),
    },
}
#: (``inference_request.body`` is optional on the wire: an encrypted request
#: carries ``enc`` instead. A plain session naks a request without a body.)
_REQUIRED = {
    "inference_request": ("request_id", "stream"),
    "cancel_request": ("request_id",),
    "preflight": ("request_id", "estimated_tokens"),
    "hello_ack": ("coordinator_version", "assigned_id"),
}
_KNOWN = ("inference_request", "cancel_request", "preflight", "hello_ack", "drain", "warm_up")
_GOOD_BODY = dumps({"messages": [_message()], "max_tokens": 2}, True)


def _valid(kind: str) -> dict[str, Any]:
    return {
        "inference_request": {"request_id": RID, "stream": False, "body": _GOOD_BODY},
        "cancel_request": {"request_id": RID, "reason": "buyer_disconnected"},
        "preflight": {"request_id": RID, "estimated_tokens": 10},
        "hello_ack": {"coordinator_version": 1, "assigned_id": "x", "heartbeat_interval_s": 1},
    }[kind]


def _names(kind: str, broken: str) -> str:
    """What the nak of a ``kind`` frame with ``broken`` field names: the request
    when its id is usable, else the type."""
    return kind if broken == "request_id" or "request_id" not in _FIELDS[kind] else RID


@st.composite
def _wrong_frame_field(draw_: st.DrawFn) -> FrameCase:
    kind = draw_(st.sampled_from(sorted(_FIELDS)))
    name = draw_(st.sampled_from(sorted(_FIELDS[kind])))
    msg = {"type": kind, **_valid(kind), name: draw_(_FIELDS[kind][name])}
    if draw_(st.booleans()):
        msg["x_unknown"] = draw_(json_values(6))
    ascii_only = draw_(st.booleans())
    return FrameCase(
        f"{kind}.{name} wrong",
        dumps(msg, ascii_only),
        "nak",
        in_reply_to=_names(kind, name),
        mentions=(f"`$.{name}`",),
        ascii_only=ascii_only,
    )


@st.composite
def _missing_frame_field(draw_: st.DrawFn) -> FrameCase:
    kind = draw_(st.sampled_from(sorted(_REQUIRED)))
    name = draw_(st.sampled_from(_REQUIRED[kind]))
    msg = {"type": kind, **_valid(kind)}
    del msg[name]
    return FrameCase(
        f"{kind}.{name} missing",
        dumps(msg, True),
        "nak",
        in_reply_to=_names(kind, name),
        mentions=(f"missing required field `{name}`",),
    )


@st.composite
def _unknown_type(draw_: st.DrawFn) -> FrameCase:
    kind = draw_(st.one_of(edge_text(), long_text(1000, 200_000)).filter(lambda t: t not in _KNOWN))
    msg: dict[str, Any] = {"type": kind}
    msg.update(draw_(st.dictionaries(st.sampled_from(["request_id", "x", "body"]), json_values(6))))
    ascii_only = draw_(st.booleans())
    return FrameCase(
        "unknown type",
        dumps(msg, ascii_only),
        "ignored",
        in_reply_to=kind[:MAX_TYPE_ECHO] or "unknown",  # what the decoder reports
        code="unknown_message_type",
        mentions=("unknown message type",),
    )


@st.composite
def _bad_type_field(draw_: st.DrawFn) -> FrameCase:
    msg = {"type": draw_(not_of(str)), "request_id": "x"}
    return FrameCase("type not a string", dumps(msg, True), "nak", mentions=("`$.type`",))


@st.composite
def _no_type(draw_: st.DrawFn) -> FrameCase:
    msg = draw_(st.dictionaries(edge_text(8).filter(lambda k: k != "type"), json_values(6)))
    return FrameCase(
        "no type", dumps(msg, True), "nak", mentions=("missing required field `type`",)
    )


@st.composite
def _not_object_frame(draw_: st.DrawFn) -> FrameCase:
    frame = draw_(
        st.one_of(
            not_of(dict).map(lambda v: dumps(v, True)),
            st.sampled_from(["[" * 10_000 + "]" * 10_000, "null", "[]", '""']),
            long_text(1000, 500_000).map(lambda s: dumps(s, False)),
        )
    )
    return FrameCase("not an object", frame, "nak", mentions=("Expected `object`",))


@st.composite
def _huge_number_alone(draw_: st.DrawFn) -> FrameCase:
    frame = draw_(st.sampled_from(["1" + "0" * 5000, "-1e400", "1e400", "-" + "9" * 4000]))
    return FrameCase("a huge number", frame, "nak")


@st.composite
def _not_json_frame(draw_: st.DrawFn) -> FrameCase:
    templates = (
        "",
        "   ",
        "hello",
        "{'type': 'drain'}",
        '{"type":"drain",}',
        '{"type" "drain"}',
        '{"type":"drain"} trailing',
        '{"type":"preflight","request_id":"\\ud800","estimated_tokens":1}',
        '{"type":"preflight","request_id":"\\udc00","estimated_tokens":1}',
        '{"type":"preflight","request_id":"a\x00","estimated_tokens":1}',
        '{"type":"preflight","request_id":"a","estimated_tokens":NaN}',
        '{"type":"cancel_request","request_id":"a"',
        "\ufeff{}",
    )
    choice = draw_(st.integers(0, 2))
    if choice == 0:
        frame = draw_(st.sampled_from(templates))
    elif choice == 1:  # a valid frame, truncated
        full = dumps({"type": "preflight", "request_id": "t", "estimated_tokens": 7}, True)
        frame = full[: draw_(st.integers(0, len(full) - 1))]
    else:
        frame = draw_(st.text(min_size=1)).strip()
        if frame[:1] in '{["-0123456789tfn':
            frame = "@" + frame
    return FrameCase("not JSON", frame, "nak")


@st.composite
def _binary_frame(draw_: st.DrawFn) -> FrameCase:
    data = draw_(st.binary(min_size=1, max_size=256))
    if data.lstrip()[:1] in (b"{", b""):
        data = b"\xff" + data
    return FrameCase("binary", data, "nak")


@st.composite
def _huge_number_frame(draw_: st.DrawFn) -> FrameCase:
    literal = draw_(st.sampled_from(["1e400", "-1e400", "1" + "0" * 5000, "-" + "9" * 5000]))
    frame = f'{{"type":"preflight","request_id":"{RID}","estimated_tokens":{literal}}}'
    return FrameCase(
        "huge number", frame, "nak", in_reply_to=RID, mentions=("`$.estimated_tokens`",)
    )


@st.composite
def _bad_body_request(draw_: st.DrawFn) -> FrameCase:
    bad = draw_(bad_bodies())
    msg = {
        "type": "inference_request",
        "request_id": RID,
        "stream": draw_(st.booleans()),
        "body": bad.body,
    }
    frame = dumps(msg, draw_(st.booleans()))
    if len(frame.encode()) > FRAME_ROOM:  # \uXXXX escapes grew it past the limit
        frame = dumps(msg, False)
    ascii_only = frame.isascii()
    return FrameCase(
        f"body: {bad.label}",
        frame,
        "end",
        mentions=tuple(bad.mentions()),
        statuses=("error_*",),
        rid_prefix=draw_(edge_text(40)),
        ascii_only=ascii_only,
    )


@st.composite
def _valid_request(draw_: st.DrawFn) -> FrameCase:
    good = draw_(valid_bodies())
    msg = {
        "type": "inference_request",
        "request_id": RID,
        "stream": good.stream,
        "body": good.body,
        "x_unknown": draw_(json_values(4)),
    }
    ascii_only = draw_(st.booleans())
    return FrameCase(
        "valid request",
        dumps(msg, ascii_only),
        "end",
        statuses=("complete",) if good.fits else ("error_context_exceeded",),
        rid_prefix=draw_(edge_text(40)),
        ascii_only=ascii_only,
    )


@st.composite
def _unknown_cancel(draw_: st.DrawFn) -> FrameCase:
    msg = {"type": "cancel_request", "request_id": RID, "reason": draw_(edge_text())}
    ascii_only = draw_(st.booleans())
    return FrameCase(
        "cancel unknown id",
        dumps(msg, ascii_only),
        "end",
        statuses=("cancelled",),
        rid_prefix=draw_(edge_text(200)),
        ascii_only=ascii_only,
    )


@st.composite
def _preflight(draw_: st.DrawFn) -> FrameCase:
    tokens = draw_(st.one_of(st.integers(0, 10**6), st.integers(0, 10**400), st.just(10**4000)))
    msg = {"type": "preflight", "request_id": RID, "estimated_tokens": tokens}
    return FrameCase(
        "preflight",
        dumps(msg, True),
        "ack",
        rid_prefix=draw_(edge_text(40)),
        too_big=tokens > CONTEXT_CHARS,
    )


@st.composite
def _late_hello_ack(draw_: st.DrawFn) -> FrameCase:
    msg = {
        "type": "hello_ack",
        "coordinator_version": draw_(st.integers()),
        "assigned_id": draw_(edge_text()),
        "tier": draw_(edge_text()),
    }
    return FrameCase("late hello_ack", dumps(msg, draw_(st.booleans())), "none")


#: Kinds of frames and their share of a batch.
FRAME_MIX: tuple[tuple[st.SearchStrategy[FrameCase], float], ...] = (
    (_wrong_frame_field(), 0.16),
    (_missing_frame_field(), 0.04),
    (_unknown_type(), 0.06),
    (_bad_type_field(), 0.03),
    (_no_type(), 0.03),
    (_not_object_frame(), 0.04),
    (_not_json_frame(), 0.06),
    (_binary_frame(), 0.04),
    (_huge_number_frame(), 0.02),
    (_huge_number_alone(), 0.01),
    (_bad_body_request(), 0.25),
    (_unknown_cancel(), 0.06),
    (_preflight(), 0.06),
    (_late_hello_ack(), 0.03),
    (_valid_request(), 0.06),
)
_VALID_GENERATION = FRAME_MIX[-1][0]


def frame_cases() -> st.SearchStrategy[FrameCase]:
    """Any frame at a registered provider, with the answer it must get."""
    return st.one_of([s for s, _ in FRAME_MIX])


def frame_batch(n: int, *, valid: bool = True, seed: int = 0) -> list[FrameCase]:
    """About ``n`` frames in the proportions of :data:`FRAME_MIX`, shuffled (deterministic).

    ``valid=False`` leaves out the valid requests (which start generations).
    """
    batch: list[FrameCase] = []
    for strategy, share in FRAME_MIX:
        if valid or strategy is not _VALID_GENERATION:
            batch += draw(strategy, max(1, round(n * share)))
    random.Random(seed).shuffle(batch)
    return batch
