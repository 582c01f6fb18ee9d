"""provider.engine.output: content, reasoning and tool calls from scripted text streams.

The tokenizer is a stand-in with the attributes mlx-lm's text state machine
reads, and mlx-lm's own ``json_tools`` (Qwen2.5/Hermes) and ``qwen3_coder``
parsers; the text arrives in pieces cut at every awkward place (inside
markers, inside JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from mlx_lm.tool_parsers import json_tools, qwen3_coder

from provider.engine.output import OutputParser, Pieces, new_call_id

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
]


@dataclass
class FakeTokenizer:
    """What TextStateMachine and OutputParser read of an mlx-lm TokenizerWrapper."""

    has_thinking: bool = False
    think_start: str | None = None
    think_end: str | None = None
    tool_parser: Any = None
    tool_call_start: str | None = None
    tool_call_end: str | None = None
    structural_markers: list[str] = field(default_factory=list)
    response_transitions: dict[str, Any] = field(default_factory=dict)
    response_initial_state: str | None = None
    prompt_opens_think: bool = False

    @property
    def has_tool_calling(self) -> bool:
        return self.tool_call_start is not None

    def rfind_think_start(self, prompt: list[int]) -> int:
        return 1 if self.prompt_opens_think else -1

    def rfind_think_end(self, prompt: list[int]) -> int:
        return -1


def qwen(**kw: Any) -> FakeTokenizer:
    return FakeTokenizer(
        tool_parser=json_tools.parse_tool_call,
        tool_call_start=json_tools.tool_call_start,
        tool_call_end=json_tools.tool_call_end,
        **kw,
    )


def thinking(**kw: Any) -> FakeTokenizer:
    return qwen(has_thinking=True, think_start="<think>", think_end="</think>", **kw)


def run(parser: OutputParser, text: str, step: int, reason: str = "stop") -> Pieces:
    out = Pieces()
    for i in range(0, len(text), step):
        out.add(parser.feed(text[i : i + step]))
    out.add(parser.finish(reason))
    return out


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_a_call_is_parsed_whatever_the_pieces(step: int) -> None:
    parser = OutputParser(qwen(), prompt=[], tools=TOOLS)
    out = run(parser, "Let me check.\n" + CALL, step)
    assert out.content == "Let me check.\n"
    assert [c.function.name for c in out.tool_calls] == ["get_weather"]
    assert json.loads(out.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert out.tool_calls[0].id.startswith("call_") and len(out.tool_calls[0].id) == 29
    assert parser.calls == 1 and not parser.stop_requested


@pytest.mark.parametrize("step", [1, 5])
def test_parallel_calls_each_get_an_id(step: int) -> None:
    second = CALL.replace("get_weather", "add").replace('{"city": "Oslo"}', '{"a": 1, "b": 2}')
    parser = OutputParser(qwen(), prompt=[], tools=TOOLS)
    out = run(parser, CALL + "\n" + second, step)
    assert [c.function.name for c in out.tool_calls] == ["get_weather", "add"]
    assert len({c.id for c in out.tool_calls}) == 2
    assert out.content.strip() == ""


def test_not_parallel_asks_to_stop_after_the_first_call() -> None:
    parser = OutputParser(qwen(), prompt=[], tools=TOOLS, parallel=False)
    out = parser.feed(CALL + "\n<tool_")
    assert len(out.tool_calls) == 1 and parser.stop_requested


def test_a_call_that_does_not_parse_is_delivered_as_content() -> None:
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    out = run(OutputParser(qwen(), prompt=[], tools=TOOLS), broken, 4)
    assert out.tool_calls == [] and out.content == broken


def test_a_call_to_a_function_not_offered_is_content() -> None:
    call = CALL.replace("get_weather", "rm_rf")
    out = run(OutputParser(qwen(), prompt=[], tools=TOOLS), call, 3)
    assert out.tool_calls == [] and out.content == call


def test_tools_off_means_calls_are_content() -> None:
    out = run(OutputParser(qwen(), prompt=[], tools=None), CALL, 2)
    assert out.tool_calls == [] and out.content == CALL


def test_a_call_cut_by_the_token_limit_is_content_without_end_marker() -> None:
    cut = CALL[:40]
    out = run(OutputParser(qwen(), prompt=[], tools=TOOLS), cut, 3, reason="length")
    assert out.tool_calls == [] and out.content == cut


def test_a_call_ended_by_eos_without_end_marker_is_still_a_call() -> None:
    # Some models stop right after the JSON; mlx_lm.server parses it too.
    text = CALL.removesuffix("\n</tool_call>")
    out = run(OutputParser(qwen(), prompt=[], tools=TOOLS), text, 5, reason="stop")
    assert [c.function.name for c in out.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("step", [1, 4, 100])
def test_reasoning_is_separated_from_the_answer(step: int) -> None:
    out = run(
        OutputParser(thinking(), prompt=[], tools=None),
        "<think>It is 2+2.</think>The answer is 4.",
        step,
    )
    assert out.reasoning == "It is 2+2." and out.content == "The answer is 4."


def test_a_template_that_opens_the_think_block_starts_in_reasoning() -> None:
    tok = thinking(prompt_opens_think=True)
    out = run(OutputParser(tok, prompt=[1, 2], tools=None), "hmm</think>Yes.", 2)
    assert out.reasoning == "hmm" and out.content == "Yes."


def test_reasoning_then_a_call() -> None:
    out = run(
        OutputParser(thinking(), prompt=[], tools=TOOLS), "<think>need data</think>" + CALL, 3
    )
    assert out.reasoning == "need data" and len(out.tool_calls) == 1 and out.content == ""


def test_xml_style_calls_use_their_own_parser() -> None:
    tok = FakeTokenizer(
        tool_parser=qwen3_coder.parse_tool_call,
        tool_call_start=qwen3_coder.tool_call_start,
        tool_call_end=qwen3_coder.tool_call_end,
    )
    text = (
        "<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
        "<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>"
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                },
            },
        }
    ]
    out = run(OutputParser(tok, prompt=[], tools=tools), text, 6)
    assert [c.function.name for c in out.tool_calls] == ["add"]
    assert json.loads(out.tool_calls[0].function.arguments) == {"a": 1, "b": 2}


def test_call_ids_are_distinct_and_openai_shaped() -> None:
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(i.startswith("call_") and i[5:].isalnum() for i in ids)
