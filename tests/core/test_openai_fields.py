"""The field rule: every chat-completions field is honoured, accepted or refused by name.

The lists come from the installed official ``openai`` client, so a client
release that adds a field fails here until the field is given a treatment in
:data:`provider.openai.request.FIELDS` (and a line in ``docs/openai.md``).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionStreamOptionsParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
    completion_create_params,
)
from openai.types.shared_params import FunctionDefinition, ResponseFormatJSONSchema

from coordinator_stub.buyer_api import error_param
from provider.openai import request as rq
from provider.openai.request import FIELDS, BadRequest, decode_chat_request

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openai.md"
MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def keys(typed_dict: Any) -> set[str]:
    return set(typing.get_type_hints(typed_dict, include_extras=False))


def struct_fields(cls: type[msgspec.Struct]) -> set[str]:
    return set(cls.__struct_fields__)


def body(**fields: Any) -> str:
    return json.dumps({"messages": MSG, **fields})


def test_every_field_of_the_openai_client_has_a_treatment() -> None:
    client = keys(completion_create_params.CompletionCreateParamsBase) | {"stream"}
    missing = client - set(FIELDS)
    assert not missing, f"new OpenAI request fields with no treatment in FIELDS: {sorted(missing)}"


def test_the_request_struct_and_the_field_table_agree() -> None:
    assert struct_fields(rq.ChatCompletionRequest) == set(FIELDS)
    assert all(f.doc and f.treatment for f in FIELDS.values())


@pytest.mark.parametrize(
    ("param", "struct"),
    [
        (ChatCompletionUserMessageParam, rq.ChatMessage),
        (ChatCompletionSystemMessageParam, rq.ChatMessage),
        (ChatCompletionAssistantMessageParam, rq.ChatMessage),
        (ChatCompletionToolMessageParam, rq.ChatMessage),
        (ChatCompletionContentPartTextParam, rq.ContentPart),
        (ChatCompletionContentPartImageParam, rq.ContentPart),
        (ChatCompletionMessageFunctionToolCallParam, rq.ToolCall),
        (ChatCompletionFunctionToolParam, rq.Tool),
        (FunctionDefinition, rq.FunctionDefinition),
        (ChatCompletionStreamOptionsParam, rq.StreamOptions),
        (ResponseFormatJSONSchema, rq.JsonSchemaFormat),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_nested_fields_of_the_openai_client_are_known(param: Any, struct: Any) -> None:
    # Known fields decode (then are honoured or refused by value); an unknown
    # one would be refused as unrecognized, so a new client field fails here.
    known = struct_fields(struct) | ({"type"} if struct is rq.JsonSchemaFormat else set())
    assert keys(param) - known == set()


def test_every_field_is_documented() -> None:
    text = DOCS.read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    assert rows >= set(FIELDS), f"docs/openai.md misses {sorted(set(FIELDS) - rows)}"


# A value each refused or conditional field refuses, and one it accepts.
REFUSED: dict[str, tuple[Any, Any]] = {
    "n": (2, 1),
    "store": (True, False),
    "service_tier": ("flex", "auto"),
    "modalities": (["text", "audio"], ["text"]),
    "verbosity": ("high", "medium"),
    "prompt_cache_retention": ("24h", "in_memory"),
    "prompt_cache_options": ({"mode": "explicit"}, {"mode": "implicit"}),
    "audio": ({"voice": "alloy", "format": "wav"}, None),
    "prediction": ({"type": "content", "content": "x"}, None),
    "web_search_options": ({}, None),
    "moderation": ({"model": "omni-moderation-latest"}, None),
    "functions": ([{"name": "f"}], None),
    "function_call": ("auto", None),
}


def test_every_refusable_field_has_a_case() -> None:
    refusable = {k for k, f in FIELDS.items() if f.treatment in ("refused", "conditional")}
    # reasoning_effort depends on the model: the engine refuses it (tests/engine).
    assert refusable - {"reasoning_effort"} == set(REFUSED)


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_values_are_refused_by_name(field: str) -> None:
    bad, good = REFUSED[field]
    with pytest.raises(BadRequest) as info:
        decode_chat_request(body(**{field: bad}))
    message = str(info.value)
    assert f"`{field}" in message
    assert re.split(r"[.\[]", error_param(message) or "")[0] == field
    decode_chat_request(body(**{field: good}))  # and the value it can honour passes


ACCEPTED: dict[str, Any] = {
    "user": "u-1",
    "safety_identifier": "hash",
    "prompt_cache_key": "k",
    "metadata": {"a": "b"},
    "model": "m",
    "max_tokens": 5,
    "max_completion_tokens": 5,
    "temperature": 0.5,
    "top_p": 0.9,
    "stop": ["x"],
    "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "seed": 1,
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
    "logit_bias": {"5": -100},
    "logprobs": True,
    "top_logprobs": None,
    "response_format": {"type": "json_object"},
    "tools": [TOOL],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning_effort": "none",
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "chat_template_kwargs": {"enable_thinking": False},
}


def test_every_honoured_or_accepted_field_has_a_case() -> None:
    plain = {k for k, f in FIELDS.items() if f.treatment in ("honoured", "accepted")}
    assert plain - {"messages"} == set(ACCEPTED) - {"reasoning_effort"}


@pytest.mark.parametrize("field", sorted(ACCEPTED))
def test_honoured_fields_decode(field: str) -> None:
    decode_chat_request(body(**{field: ACCEPTED[field]}))


@pytest.mark.parametrize(
    ("fields", "mention"),
    [
        ({"ignore_eos": True}, "unrecognized request field `ignore_eos`"),
        ({"best_of": 2}, "`best_of`"),
        (
            {"messages": [{"role": "user", "content": "x", "foo": 1}]},
            "unrecognized request field `messages[0].foo`",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "content part type `input_audio` is not supported",
        ),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "role `function`"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tool type `custom`"),
        ({"tools": [TOOL, TOOL]}, "same function name"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g'"),
        ({"tool_choice": "required"}, "`tools` is empty"),
        ({"top_logprobs": 3}, "needs `logprobs: true`"),
        ({"logprobs": True, "top_logprobs": 21}, "$.top_logprobs"),
        ({"logit_bias": {"x": 1}}, "token ids"),
        ({"logit_bias": {"1": 101}}, "$.logit_bias"),
        ({"chat_template_kwargs": {"tokenize": False}}, "may not set tokenize"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x y"}}},
            "$.response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "not a valid JSON Schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}},
                }
            },
            "cannot be enforced",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    }
                ]
            },
            "not valid JSON",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "needs `tool_call_id`"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "tool_call_id"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_it(fields: dict[str, Any], mention: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_chat_request(json.dumps({"messages": MSG, **fields}))
    assert mention in str(info.value)


def test_null_means_absent() -> None:
    nulls = {name: None for name in FIELDS if name not in ("messages", "stream")}
    req = decode_chat_request(body(**nulls))
    assert req.tool_mode() == "off" and req.json_mode() == "off" and req.top_logprobs_n() is None


def test_history_with_tool_calls_reaches_the_template_intact() -> None:
    req = decode_chat_request(
        json.dumps(
            {
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": "weather?", "name": "ann"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "w", "arguments": '{"city": "Oslo"}'},
                            }
                        ],
                    },
                    {
                        "role": "tool",
                        "tool_call_id": "call_1",
                        "content": [{"type": "text", "text": "5C"}],
                    },
                ]
            }
        )
    )
    dicts = [m.template_dict() for m in req.messages]
    assert dicts[0] == {"role": "system", "content": "be brief"}
    assert dicts[1]["name"] == "ann"
    assert dicts[2]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "w", "arguments": {"city": "Oslo"}},
        }
    ]
    assert dicts[3] == {"role": "tool", "content": "5C", "tool_call_id": "call_1"}


def test_tool_choice_narrows_the_offered_tools() -> None:
    g = {"type": "function", "function": {"name": "g"}}
    req = decode_chat_request(
        body(tools=[TOOL, g], tool_choice={"type": "function", "function": {"name": "g"}})
    )
    assert req.tool_mode() == "required" and [f.name for f in req.offered_tools()] == ["g"]
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    }
    req = decode_chat_request(body(tools=[TOOL, g], tool_choice=allowed))
    assert req.tool_mode() == "auto" and [f.name for f in req.offered_tools()] == ["f"]
    req = decode_chat_request(body(tools=[TOOL], tool_choice="none"))
    assert req.tool_mode() == "off" and req.offered_tools() == []
