"""provider.engine.sampling: penalties, the grammar processor, refusals against the model."""

from __future__ import annotations

import json
import threading
from typing import Any

import mlx.core as mx
import pytest

from provider.engine import EngineError
from provider.engine.mlx import MlxEngine
from provider.engine.sampling import GrammarProcessor, TokenTable, make_logits_processors
from provider.openai.request import decode_chat_request
from provider.openai.structured import schema_grammar

from .conftest import MakeEngine
from .helpers import collect, text_of

V = 16


def step(processors: list[Any], tokens: list[int]) -> list[float]:
    logits = mx.zeros((1, V))
    for p in processors:
        logits = p(mx.array(tokens), logits)
    return [round(x, 4) for x in logits[0].tolist()]


def test_penalties_count_the_completion_not_the_prompt() -> None:
    procs = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25)
    prompt = [1, 1, 2]
    # First call (prompt only): nothing generated yet, nothing penalised.
    assert step(procs, prompt) == [0.0] * V
    # Then token 3 was generated, then 3 again, then 4.
    assert step(procs, [*prompt, 3])[1:5] == [0.0, 0.0, -0.75, 0.0]
    assert step(procs, [*prompt, 3, 3])[1:5] == [0.0, 0.0, -1.0, 0.0]
    assert step(procs, [*prompt, 3, 3, 4])[1:5] == [0.0, 0.0, -1.0, -0.75]


def test_logit_bias_and_no_processors() -> None:
    assert make_logits_processors() == []
    (bias,) = make_logits_processors(logit_bias={5: 3.0, 7: -100.0})
    out = step([bias], [0])
    assert out[5] == 3.0 and out[7] == -100.0 and out[6] == 0.0


async def test_grammar_processor_allows_only_what_the_grammar_allows(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()
    table = engine._token_table()
    schema = {"type": "object", "properties": {"a": {"enum": [1, 22]}}, "required": ["a"]}
    grammar = GrammarProcessor(table, schema_grammar(schema))
    hf = engine.tokenizer
    tokens: list[int] = list(hf.encode("hi"))
    logits = mx.zeros((1, table.vocab_size))
    allowed = mx.isfinite(grammar(mx.array(tokens), logits))[0]
    text_allowed = {hf.decode([i]) for i in range(table.vocab_size) if allowed[i].item()}
    assert text_allowed and all("{".startswith(t[:1]) for t in text_allowed)
    for t in hf.encode('{"a": 22}', add_special_tokens=False):
        tokens.append(t)
        assert mx.isfinite(grammar(mx.array(tokens), logits))[0].any().item()
    # Complete: only EOS is left.
    last = mx.isfinite(grammar(mx.array([*tokens, tokens[-1]]), logits))[0]
    assert {i for i in range(table.vocab_size) if last[i].item()} <= set(hf.eos_token_ids)
    assert grammar.error is None


def test_token_table_bytes(tiny_model_dir: Any) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = TokenTable(hf, vocab_size=len(hf), eos_token_ids=[hf.eos_token_id])
    ids = hf.encode("héllo wörld", add_special_tokens=False)
    assert b"".join(table.token_bytes(i) for i in ids).decode() == "héllo wörld"
    assert table.token_bytes(hf.eos_token_id) == hf.eos_token.encode()


def req(**fields: Any) -> Any:
    return decode_chat_request(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields})
    )


@pytest.mark.parametrize(
    ("fields", "mention"),
    [
        ({"reasoning_effort": "high"}, "`reasoning_effort`"),
        ({"reasoning_effort": "medium"}, "does not reason"),
        ({"logit_bias": {"5000": 1}}, "`logit_bias`: token id 5000"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "`tools`"),
    ],
)
async def test_what_this_model_cannot_honour_is_refused(
    make_engine: MakeEngine, fields: dict[str, Any], mention: str
) -> None:
    engine = await make_engine()
    with pytest.raises(EngineError) as info:
        await collect(engine, req(max_tokens=2, **fields))
    assert info.value.status == "error_internal" and mention in str(info.value)
    assert engine.active == 0
    # reasoning_effort none is accepted by every model.
    assert text_of(await collect(engine, req(max_tokens=2, reasoning_effort="none")))


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_cancel_stops_a_constrained_generation_within_a_step(
    make_engine: MakeEngine, concurrency: int
) -> None:
    engine: MlxEngine = await make_engine(max_concurrency=concurrency)
    # An unbounded string: it would run to the token limit.
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "s",
            "schema": {
                "type": "object",
                "properties": {"s": {"type": "string"}},
                "required": ["s"],
            },
        },
    }
    cancel = threading.Event()
    seen: list[int] = []

    def hook(stats: Any, kind: str) -> None:
        if kind == "decode":
            seen.append(stats.decode_steps)
            if stats.decode_steps == 6:
                cancel.set()

    engine.step_hook = hook
    batches = await collect(engine, req(max_tokens=400, response_format=fmt), cancel)
    assert batches[-1].finish_reason == "cancelled"
    stats = next(reversed(engine.last_stats.values()))
    assert stats.decode_steps <= 7
    assert text_of(batches).startswith('{"s": "')


async def test_chat_template_kwargs_reach_the_template(tiny_model_dir: Any, tmp_path: Any) -> None:
    from provider.testing.model import CHAT_TEMPLATE
    from provider.testing.templates import with_chat_template

    template = "{% if persona %}{{ persona }}{% endif %}" + CHAT_TEMPLATE
    path = with_chat_template(tiny_model_dir, tmp_path / "kw", template)
    engine = MlxEngine(path)
    try:
        await engine.load()
        plain = engine.count_tokens(req())
        told = engine.count_tokens(req(chat_template_kwargs={"persona": "You are a pirate. " * 4}))
        assert told > plain
        with pytest.raises(ValueError, match="may not set add_generation_prompt"):
            req(chat_template_kwargs={"add_generation_prompt": False})
    finally:
        await engine.close()
