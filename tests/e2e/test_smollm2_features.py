"""Tools, structured output and logprobs on a real model, through the official openai client.

SmolLM2-135M-Instruct's weights and tokenizer with a Qwen2.5-style tool
template (ChatML, like SmolLM2's own, plus tools): what random weights
cannot show, that the tools reach the prompt, that mlx-lm's parser for the
template reads what the model writes, and that a real answer comes back in
the requested JSON. One stub + provider serves the module; prompts are
short, the tool prompt is the long one (prefill on this CPU is slow).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

from provider.testing.templates import QWEN25_TOOLS, with_chat_template

from .conftest import System, starter

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city name"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smol_tools(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    path = with_chat_template(
        smollm2_dir, tmp_path_factory.mktemp("smol") / "smol-tools", QWEN25_TOOLS
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        async with starter(path)(stub_options={"warmup_gate": False}, warmup_tokens=4) as s:
            yield s


async def test_a_required_call_names_the_city_asked_about(smol_tools: System) -> None:
    s = smol_tools
    stream = await s.buyer.chat.completions.create(
        model=s.model,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
        stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] == "get_weather"
    args = json.loads(call["arguments"])
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()


async def test_structured_output_is_a_real_answer_in_the_schema(smol_tools: System) -> None:
    s = smol_tools
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    }
    done = await s.buyer.chat.completions.create(
        model=s.model,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": schema},
        },
        max_tokens=30,
        temperature=0,
    )
    value = json.loads(done.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert "paris" in value["city"].lower()
    assert done.choices[0].finish_reason == "stop"


async def test_logprobs_of_a_real_answer(smol_tools: System) -> None:
    s = smol_tools
    done = await s.buyer.chat.completions.create(
        model=s.model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    entries = done.choices[0].logprobs.content
    assert len(entries) == done.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode() == done.choices[0].message.content
    assert "Paris" in done.choices[0].message.content
    paris = next(e for e in entries if "Paris" in e.token)
    assert paris.logprob == pytest.approx(paris.top_logprobs[0].logprob)
    assert paris.logprob > -1.0  # the model is sure of it
