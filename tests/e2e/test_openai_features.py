"""Buyers get what they asked for: each request feature through the official openai client.

Stub + provider + MlxEngine on the tiny random-weight model (and the same
weights with a Qwen2.5-style tool template): random weights write random
text, so these tests check shapes and guarantees, not wording. Constrained
output must be valid even here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

Q = [{"role": "user", "content": "What is the weather in Oslo?"}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            # Bounded: random weights would write digits until the token limit.
            "properties": {
                "a": {"type": "integer", "minimum": -999, "maximum": 999},
                "b": {"type": "integer", "minimum": -999, "maximum": 999},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}

#: Bounded in every part, so even random weights finish it within the token limit.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}


async def collect_stream(stream: Any) -> dict[str, Any]:
    """Content, calls (by index), finish, logprobs and usage of a streamed answer."""
    out: dict[str, Any] = {
        "content": "",
        "calls": {},
        "finish": None,
        "logprobs": [],
        "usage": None,
    }
    async for chunk in stream:
        if chunk.usage:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            out["content"] += delta.content or ""
            for tc in delta.tool_calls or []:
                call = out["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert call["id"] is None, "the id comes once"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            if choice.logprobs and choice.logprobs.content:
                out["logprobs"].extend(choice.logprobs.content)
            out["finish"] = choice.finish_reason or out["finish"]
    return out


# -- structured output -------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_json_schema_output_always_validates_even_from_random_weights(
    system: Any, concurrency: int
) -> None:
    async with system(max_concurrency=concurrency) as s:

        async def one(seed: int, stream: bool) -> str:
            kw: dict[str, Any] = dict(
                model=s.model,
                messages=Q,
                response_format=PERSON_FORMAT,
                max_tokens=300,
                temperature=1.0,
                seed=seed,
            )
            if stream:
                got = await collect_stream(await s.buyer.chat.completions.create(stream=True, **kw))
                assert got["finish"] == "stop"
                return str(got["content"])
            done = await s.buyer.chat.completions.create(**kw)
            assert done.choices[0].finish_reason == "stop"
            return str(done.choices[0].message.content)

        texts: list[str] = []
        for first in range(0, 6, concurrency):  # no more at once than there are slots
            seeds = range(first, first + concurrency)
            texts += await asyncio.gather(*(one(seed, seed % 2 == 0) for seed in seeds))
        for text in texts:
            jsonschema.validate(json.loads(text), PERSON)
        # Written as json.dumps writes it: no stray whitespace.
        assert all(json.dumps(json.loads(t), ensure_ascii=False) == t for t in texts)


async def test_json_object_is_constrained_to_an_object(system: Any) -> None:
    # Any object is unbounded, so random weights may not close it in time:
    # then the end says so. Either way the text is an object (or its start).
    async with system() as s:
        content = ""
        try:
            stream = await s.buyer.chat.completions.create(
                model=s.model,
                messages=Q,
                response_format={"type": "json_object"},
                max_tokens=200,
                stream=True,
            )
            async for chunk in stream:
                for choice in chunk.choices:
                    content += choice.delta.content or ""
        except openai.APIError as exc:
            assert "max_tokens" in str(exc)
            assert content.startswith("{")
        else:
            assert isinstance(json.loads(content), dict)


async def test_json_cut_by_the_token_limit_is_malformed_json_response(system: Any) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    async with system(ignore_eos=False) as s:
        with pytest.raises(openai.APIStatusError) as info:
            await s.buyer.chat.completions.create(
                model=s.model, messages=Q, response_format=rf, max_tokens=3
            )
        assert info.value.status_code == 502
        assert info.value.body["code"] == "malformed_json_response"
        assert "max_tokens" in info.value.body["message"]
        # Streamed: the content goes out, then an error event instead of the finish.
        stream = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, response_format=rf, max_tokens=3, stream=True
        )
        with pytest.raises(openai.APIError) as streamed:
            await collect_stream(stream)
        assert "max_tokens" in str(streamed.value)


async def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(system: Any) -> None:
    async with system() as s:
        with pytest.raises(openai.BadRequestError) as info:
            await s.buyer.chat.completions.create(
                model=s.model,
                messages=Q,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}},
                },
            )
        assert info.value.body["param"].startswith("response_format")


# -- tools ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_required_tool_call(system: Any, tool_model_dir: Path, stream: bool) -> None:
    async with system(model=tool_model_dir, max_concurrency=2) as s:
        kw: dict[str, Any] = dict(
            model=s.model,
            messages=Q,
            tools=[WEATHER, ADD],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=120,
        )
        if stream:
            got = await collect_stream(await s.buyer.chat.completions.create(stream=True, **kw))
            assert got["finish"] == "tool_calls" and list(got["calls"]) == [0]
            call = got["calls"][0]
            call_id, name, arguments = call["id"], call["name"], call["arguments"]
        else:
            done = await s.buyer.chat.completions.create(**kw)
            choice = done.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.content is None
            (tc,) = choice.message.tool_calls
            assert tc.type == "function"
            call_id, name, arguments = tc.id, tc.function.name, tc.function.arguments
        assert call_id.startswith("call_") and len(call_id) == 29
        params = {"get_weather": WEATHER, "add": ADD}[name]["function"]["parameters"]
        jsonschema.validate(json.loads(arguments), params)


async def test_named_tool_choice_calls_that_function(system: Any, tool_model_dir: Path) -> None:
    async with system(model=tool_model_dir) as s:
        done = await s.buyer.chat.completions.create(
            model=s.model,
            messages=Q,
            tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "add"}},
            parallel_tool_calls=False,
            max_tokens=80,
        )
        (tc,) = done.choices[0].message.tool_calls
        assert tc.function.name == "add"
        args = json.loads(tc.function.arguments)
        assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())


async def test_tool_history_and_tools_reach_the_template(system: Any, tool_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    history = [
        {"role": "system", "content": "You check the weather."},
        *Q,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "4 degrees, rain"},
    ]
    hf = AutoTokenizer.from_pretrained(tool_model_dir)
    as_template_sees_it = [dict(m) for m in history]
    as_template_sees_it[2] = {
        **history[2],
        "content": "",
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}},
            }
        ],
    }
    text = hf.apply_chat_template(
        as_template_sees_it, tools=[WEATHER], add_generation_prompt=True, tokenize=False
    )
    assert "<tool_response>\n4 degrees, rain\n</tool_response>" in text
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' in text
    expected = len(hf.encode(text, add_special_tokens=False))
    async with system(model=tool_model_dir) as s:
        done = await s.buyer.chat.completions.create(
            model=s.model, messages=history, tools=[WEATHER], max_tokens=2
        )
        assert done.usage.prompt_tokens == expected
        # tool_choice none: the tools stay out of the prompt.
        none = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, tools=[WEATHER], tool_choice="none", max_tokens=2
        )
        plain = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=2)
        assert none.usage.prompt_tokens == plain.usage.prompt_tokens
        assert none.choices[0].message.tool_calls is None


async def test_a_template_without_tools_refuses_them_by_name(system: Any) -> None:
    async with system() as s:  # the ChatML test template has no tool support
        with pytest.raises(openai.APIStatusError) as info:
            await s.buyer.chat.completions.create(
                model=s.model, messages=Q, tools=[WEATHER], max_tokens=2
            )
        assert "`tools`" in info.value.body["message"]
        assert "no tool-call support" in info.value.body["message"]
        # Without tools the same model answers.
        ok = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=2)
        assert ok.choices[0].finish_reason in ("length", "stop")


# -- logprobs ----------------------------------------------------------------------------


async def test_logprobs_whole_and_streamed(system: Any) -> None:
    async with system(ignore_eos=True) as s:
        done = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=10, logprobs=True, top_logprobs=3
        )
        entries = done.choices[0].logprobs.content
        assert len(entries) == done.usage.completion_tokens == 10
        for e in entries:
            assert len(e.top_logprobs) == 3
            # Greedy: the chosen token is the likeliest one.
            assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
            assert (
                e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
            )
            assert e.logprob <= 0.0
        joined = b"".join(bytes(e.bytes) for e in entries)
        assert joined.decode() == done.choices[0].message.content

        got = await collect_stream(
            await s.buyer.chat.completions.create(
                model=s.model,
                messages=Q,
                max_tokens=10,
                logprobs=True,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert len(got["logprobs"]) == got["usage"].completion_tokens == 10
        assert [e.token for e in got["logprobs"]] == [e.token for e in entries]
        assert all(e.top_logprobs == [] for e in got["logprobs"])
        # Without logprobs, none.
        plain = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=3)
        assert plain.choices[0].logprobs is None


# -- sampling -------------------------------------------------------------------------


async def test_seed_gives_the_same_tokens_alone_and_batched(system: Any) -> None:
    sampling: dict[str, Any] = dict(
        temperature=0.9,
        top_p=0.95,
        seed=1234,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        extra_body={"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.05},
    )
    async with system(max_concurrency=3, ignore_eos=True) as s:

        async def ask(**kw: Any) -> str:
            done = await s.buyer.chat.completions.create(
                model=s.model, messages=Q, max_tokens=24, **kw
            )
            return str(done.choices[0].message.content)

        alone = await ask(**sampling)
        batched = await asyncio.gather(
            ask(**sampling), ask(temperature=1.0, seed=7), ask(**{**sampling, "seed": 99})
        )
        assert batched[0] == alone
        assert batched[2] != alone  # another seed, other tokens
        again = await ask(**sampling)
        assert again == alone


async def test_logit_bias_forces_and_forbids_tokens(system: Any) -> None:
    async with system(ignore_eos=True, record_token_ids=True) as s:
        forced = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=5, logit_bias={"100": 100}
        )
        stats = next(reversed(s.engine.last_stats.values()))
        assert stats.token_ids == [100] * 5
        assert forced.usage.completion_tokens == 5
        greedy = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=1, logprobs=True
        )
        first = s.engine.tokenizer.encode(greedy.choices[0].message.content)[0]
        await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=1, logit_bias={str(first): -100}
        )
        stats = next(reversed(s.engine.last_stats.values()))
        assert stats.token_ids[0] != first
        with pytest.raises(openai.APIStatusError) as info:
            await s.buyer.chat.completions.create(
                model=s.model, messages=Q, max_tokens=1, logit_bias={"99999": 5}
            )
        assert "`logit_bias`" in info.value.body["message"]


async def test_unknown_fields_and_models_are_refused(system: Any) -> None:
    async with system() as s:
        with pytest.raises(openai.BadRequestError) as bad:
            await s.buyer.chat.completions.create(
                model=s.model, messages=Q, extra_body={"ignore_eos": True}
            )
        assert bad.value.body["param"] == "ignore_eos"
        with pytest.raises(openai.NotFoundError) as missing:
            await s.buyer.chat.completions.create(model="gpt-9", messages=Q)
        assert s.model in missing.value.body["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            await s.buyer.chat.completions.create(model=s.model, messages=Q, store=True)
        assert refused.value.body["param"] == "store"
