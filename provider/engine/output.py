"""One request's output split into answer, reasoning and tool calls, the way mlx_lm.server does it.

:class:`OutputParser` reads the decoded text of one request (stop strings
already cut) through mlx-lm's :class:`~mlx_lm.generate.TextStateMachine`
for the model's tokenizer: thinking models' ``<think>...</think>`` becomes
``reasoning_content``, and the text between the template's tool-call
markers goes to the tool parser mlx-lm picked for the chat template
(``tokenizer.tool_parser``), which turns each complete call into a
:class:`~provider.openai.response.ToolCallOut` with a fresh ``call_...`` id
and its arguments as a JSON string.

Nothing is dropped: when tools are off, or a call does not parse, or names
a function that was not offered, its text reaches the buyer as content,
markers included. With ``parallel_tool_calls: false`` the parser asks the
job to stop after the first call.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from provider.openai.response import FunctionCallOut, ToolCallOut

log = logging.getLogger("mlx_provider.engine")

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(slots=True)
class Pieces:
    """What one piece of decoded text turned out to be."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def add(self, other: Pieces) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


def initial_state(tokenizer: Any, prompt: list[int]) -> str:
    """``reasoning`` when the prompt leaves the model inside a think block, else ``normal``.

    As mlx_lm.server decides it: the template may open ``<think>`` itself.
    """
    state = "normal"
    if getattr(tokenizer, "has_thinking", False):
        if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state


class OutputParser:
    """Splits one request's text into content, reasoning and tool calls (see the module doc).

    ``tools`` are the functions offered (``None``: tools are off, so tool
    text is content); ``parallel`` False stops after one call.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        prompt: list[int],
        tools: list[dict[str, Any]] | None,
        parallel: bool = True,
    ) -> None:
        from mlx_lm.generate import TextStateMachine, make_text_state_machine

        self._sm = TextStateMachine
        self._tokenizer = tokenizer
        self._tools = tools
        self._names = {t["function"]["name"] for t in tools or ()}
        self._parallel = parallel
        # Building the machine costs a few microseconds: one per request, nothing shared.
        machine = make_text_state_machine(tokenizer)
        self._state = machine.make_state(initial_state(tokenizer, prompt))
        self._current = self._state[0]
        self._tool_text = ""
        self.calls = 0
        #: Set once a call is complete and ``parallel`` is False.
        self.stop_requested = False

    def feed(self, text: str) -> Pieces:
        """Consume decoded text; return what is known to be content, reasoning or calls."""
        if not text:
            return Pieces()
        self._state, segments = self._sm.split(self._state, text)
        return self._segments(segments)

    def finish(self, reason: str | None) -> Pieces:
        """Flush at the end: held text goes out; a call cut short is parsed or becomes content."""
        self._state, held, state = self._sm.flush(self._state)
        out = self._segments([(state, held)])
        if self._current == "tool" and self._tool_text:
            out.add(self._close_call(complete=reason != "length"))
        return out

    def _segments(self, segments: list[tuple[str | None, str]]) -> Pieces:
        out = Pieces()
        for state, text in segments:
            if self._current == "tool" and state != "tool":
                out.add(self._close_call(complete=True))
            if state == "reasoning":
                out.reasoning += text
            elif state == "tool":
                self._tool_text += text
            elif text:
                out.content += text
            self._current = state
        return out

    def _close_call(self, *, complete: bool) -> Pieces:
        text, self._tool_text = self._tool_text, ""
        calls = self._parse(text) if complete else None
        if calls is None:
            tok = self._tokenizer
            end = (tok.tool_call_end or "") if complete else ""
            return Pieces(content=f"{tok.tool_call_start}{text}{end}")
        self.calls += len(calls)
        if not self._parallel and self.calls:
            self.stop_requested = True
        return Pieces(tool_calls=calls)

    def _parse(self, text: str) -> list[ToolCallOut] | None:
        """The calls in one tool block, or None when it is not a call to an offered tool."""
        if self._tools is None:
            return None
        try:
            parsed = self._tokenizer.tool_parser(text, self._tools)
        except Exception as exc:  # parsers raise ValueError, JSONDecodeError, KeyError...
            log.warning("a tool call did not parse (%s): delivered as content", exc)
            return None
        out = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            name = call.get("name") if isinstance(call, dict) else None
            if name not in self._names:
                log.warning(
                    "the model called %r, which was not offered: delivered as content", name
                )
                return None
            args = call.get("arguments", {})
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            out.append(
                ToolCallOut(id=new_call_id(), function=FunctionCallOut(name=name, arguments=args))
            )
        return out or None
