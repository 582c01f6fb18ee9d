"""Decoding at the edge, at unit level, on hypothesis-generated input.

``decode_coordinator_frame`` and ``decode_provider_frame`` never raise;
``decode_chat_request`` raises nothing but ``BadRequest``, naming the field.
Every valid message hypothesis can build decodes to itself, however its JSON
is written.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from coordinator_stub.buyer_api import error_param
from provider.coordinator.messages import (
    CoordinatorMessage,
    Invalid,
    ProviderMessage,
    decode_coordinator_frame,
    decode_provider_frame,
    encode,
    message_type,
)
from provider.openai.request import BadRequest, ChatCompletionRequest, decode_chat_request

from .strategies import (
    EDGE_STRINGS,
    BadBody,
    FrameCase,
    ValidBody,
    bad_bodies,
    dumps,
    frame_cases,
    json_values,
    valid_bodies,
)
from .structs import reserialized, valid_struct

#: Deterministic: the same examples every run.
FIXED: dict[str, Any] = {"deadline": None, "derandomize": True, "database": None}
FAST = settings(max_examples=150, **FIXED)
DEEP = "[" * 10_000 + "]" * 10_000
COORDINATOR_TYPES = CoordinatorMessage.__args__  # type: ignore[attr-defined]
PROVIDER_TYPES = ProviderMessage.__args__  # type: ignore[attr-defined]


def no_string_is_invalid_utf8(data: bytes) -> bool:
    """Without a quote there is no JSON string whose UTF-8 could be invalid."""
    try:
        data.decode()
    except UnicodeDecodeError:
        return b'"' not in data
    return True


def as_input(value: Any, form: str) -> str | bytes:
    text = dumps(value, form == "ascii")
    return text.encode() if form == "bytes" else text


# --------------------------------------------------------------------------
# Never raise


@FAST
@given(json_values(), st.sampled_from(["ascii", "utf8", "bytes"]))
def test_frame_decoders_never_raise_on_json(value: Any, form: str) -> None:
    data = as_input(value, form)
    for decode in (decode_coordinator_frame, decode_provider_frame):
        result = decode(data)
        if not isinstance(value, dict) or "type" not in value:
            assert isinstance(result, Invalid) and result.code == "malformed_message"


@FAST
@given(st.one_of(st.text(), st.binary().filter(no_string_is_invalid_utf8)))
def test_frame_decoders_never_raise_on_text_or_bytes(data: str | bytes) -> None:
    for decode in (decode_coordinator_frame, decode_provider_frame):
        result = decode(data)
        assert isinstance(result, Invalid | msgspec.Struct)
        if isinstance(result, Invalid):
            assert result.code in ("malformed_message", "unknown_message_type")
            assert result.message


@FAST
@given(st.one_of(json_values(), st.dictionaries(st.sampled_from(["messages", "x"]), json_values())))
def test_decode_chat_request_raises_only_bad_request_on_json(value: Any) -> None:
    for form in ("ascii", "utf8", "bytes"):
        try:
            decode_chat_request(as_input(value, form))
        except BadRequest as exc:
            assert str(exc)


@FAST
@given(st.one_of(st.text(), st.binary().filter(no_string_is_invalid_utf8)))
def test_decode_chat_request_raises_only_bad_request_on_text_or_bytes(data: str | bytes) -> None:
    try:
        decode_chat_request(data)
    except BadRequest as exc:
        assert str(exc)


# --------------------------------------------------------------------------
# Bad bodies name the field


@settings(max_examples=200, **FIXED)
@given(bad_bodies())
def test_bad_bodies_are_refused_naming_the_field(bad: BadBody) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_chat_request(bad.body)
    message = str(caught.value)
    for mention in bad.mentions():
        assert mention in message, (bad.label, message)
    # What the stub's HTTP API puts in error.param.
    assert error_param(message) == bad.param, (bad.label, message)
    with pytest.raises(BadRequest):
        decode_chat_request(bad.body.encode())


@settings(max_examples=100, **FIXED)
@given(valid_bodies())
def test_valid_bodies_are_accepted(good: ValidBody) -> None:
    for body in (good.body, good.body.encode()):
        request = decode_chat_request(body)
        assert request.stream is good.stream and request.n == 1
        assert all(isinstance(m.text(), str) for m in request.messages)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 10**12),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("n", 2),
        ("max_completion_tokens", 0),
        ("temperature", 2.5),
        ("top_p", 0),
    ],
)
def test_limits_named(field: str, value: int) -> None:
    body = dumps({"messages": [{"role": "user", "content": "x"}], field: value}, True)
    with pytest.raises(BadRequest, match=rf"`\$\.{field}`"):
        decode_chat_request(body)


def test_body_limit_counts_bytes_not_characters() -> None:
    # 700,000 three-byte characters: under 2 MiB as characters, over it as bytes.
    body = dumps({"messages": [{"role": "user", "content": "\u20ac" * 700_000}]}, False)
    assert len(body) < 2 * 1024 * 1024 < len(body.encode())
    with pytest.raises(BadRequest, match="request body is"):
        decode_chat_request(body)


# --------------------------------------------------------------------------
# Frames: the decoder agrees with each case's expected answer


@settings(max_examples=250, **FIXED)
@given(frame_cases())
def test_frame_cases_decode_as_expected(case: FrameCase) -> None:
    frame, rid = case.render(7)
    msg = decode_coordinator_frame(frame)
    if case.answer in ("nak", "ignored"):
        assert isinstance(msg, Invalid), case.label
        assert msg.code == case.code, (case.label, msg)
        if case.answer == "nak":
            assert msg.in_reply_to == case.reply_to(rid), (case.label, msg)
        else:
            assert (msg.type or "unknown") == case.in_reply_to, case.label
        for mention in case.mentions:
            assert mention in msg.message, (case.label, msg.message)
        return
    assert not isinstance(msg, Invalid), (case.label, msg)
    expected = {
        "end": ("inference_request", "cancel_request"),
        "ack": ("preflight",),
        "none": ("hello_ack",),
    }[case.answer]
    assert message_type(msg) in expected
    if rid:
        assert msg.request_id == rid  # type: ignore[union-attr]
    if message_type(msg) == "inference_request":
        try:
            decode_chat_request(msg.body)  # type: ignore[union-attr]
        except BadRequest as exc:
            assert any(fnmatch.fnmatch("error_internal", s) for s in case.statuses)
            for mention in case.mentions:
                assert mention in str(exc), (case.label, str(exc))


# --------------------------------------------------------------------------
# Every valid message decodes to itself


@st.composite
def coordinator_messages(draw: st.DrawFn) -> msgspec.Struct:
    return draw(valid_struct(draw(st.sampled_from(COORDINATOR_TYPES))))


@st.composite
def provider_messages(draw: st.DrawFn) -> msgspec.Struct:
    return draw(valid_struct(draw(st.sampled_from(PROVIDER_TYPES))))


@settings(max_examples=150, **FIXED)
@given(coordinator_messages(), st.data())
def test_every_valid_coordinator_message_decodes(msg: msgspec.Struct, data: st.DataObject) -> None:
    encoded = encode(msg)
    assert decode_coordinator_frame(encoded) == msg
    assert decode_coordinator_frame(encoded.decode()) == msg
    assert decode_coordinator_frame(data.draw(reserialized(encoded))) == msg
    assert isinstance(decode_provider_frame(encoded), Invalid)


@settings(max_examples=150, **FIXED)
@given(provider_messages(), st.data())
def test_every_valid_provider_message_decodes(msg: msgspec.Struct, data: st.DataObject) -> None:
    encoded = encode(msg)
    assert decode_provider_frame(encoded) == msg
    assert decode_provider_frame(data.draw(reserialized(encoded))) == msg
    assert isinstance(decode_coordinator_frame(encoded), Invalid)


@settings(max_examples=120, **FIXED)
@given(valid_struct(ChatCompletionRequest), st.data())
def test_every_valid_chat_request_decodes(req: ChatCompletionRequest, data: st.DataObject) -> None:
    encoded = encode(req)
    assume(len(encoded) <= 2 * 1024 * 1024)
    assert decode_chat_request(encoded) == req
    assert decode_chat_request(data.draw(reserialized(encoded, unknown_keys=False))) == req


def test_unicode_edge_strings_survive_a_round_trip() -> None:
    from provider.coordinator.messages import CancelRequest

    for text in EDGE_STRINGS:
        msg = CancelRequest(request_id=text, reason=text * 50)
        assert decode_coordinator_frame(encode(msg)) == msg
        assert decode_coordinator_frame(dumps(msgspec.to_builtins(msg), True)) == msg


# --------------------------------------------------------------------------
# Known bugs (see the reasons)

NESTED = [
    '{"type":"drain","x":' + DEEP + "}",
    '{"type":"preflight","request_id":' + DEEP + ',"estimated_tokens":1}',
    '{"x":' + DEEP + "}",
]


@pytest.mark.parametrize("frame", NESTED, ids=["unknown-field", "field", "no-type"])
@pytest.mark.parametrize("decode", [decode_coordinator_frame, decode_provider_frame])
def test_deeply_nested_frame_is_invalid_not_an_exception(decode: Any, frame: str) -> None:
    assert isinstance(decode(frame), Invalid)


def test_deeply_nested_body_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        decode_chat_request('{"messages":[{"role":"user","content":"x"}],"x":' + DEEP + "}")


@pytest.mark.parametrize(
    ("decode", "frame"),
    [
        (decode_coordinator_frame, b'{"type":"\xff"}'),
        (decode_provider_frame, b'{"type":"\xff"}'),
        (
            decode_coordinator_frame,
            b'{"type":"preflight","request_id":"\xed\xa0\x80","estimated_tokens":1}',
        ),
        (
            decode_provider_frame,
            b'{"type":"inference_response_chunk","request_id":"r","seq":0,"data":"\xc3("}',
        ),
    ],
    ids=["coordinator-type", "provider-type", "coordinator-field", "provider-field"],
)
def test_invalid_utf8_in_a_binary_frame_is_invalid_not_an_exception(
    decode: Any, frame: bytes
) -> None:
    assert isinstance(decode(frame), Invalid)


def test_invalid_utf8_in_a_body_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        decode_chat_request(b'{"messages":[{"role":"user","content":"\xff"}]}')
