"""MlxEngine generation on the tiny model: text, usage, limits, stop strings, seeds."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from provider.engine import Engine, EngineError
from provider.engine.mlx import MlxEngine
from tests.engine.conftest import MakeEngine
from tests.engine.helpers import chat, collect, text_of


def template_ids(hf_tokenizer: Any, content: str) -> list[int]:
    """Prompt tokens counted by transformers itself, not through the engine."""
    return hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def detokenize(engine: MlxEngine, tokens: list[int]) -> str:
    detokenizer = engine.tokenizer.detokenizer
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


async def test_load_reports_model_info(engine: MlxEngine, tiny_model_dir: Path) -> None:
    info = engine.info
    assert isinstance(engine, Engine)
    assert info is not None and not engine.loading
    assert info.model_id == tiny_model_dir.name
    # 557,696 weights in the tiny llama (see provider.testing.model).
    assert info.model_params_b == pytest.approx(557_696 / 1e9)
    assert info.max_context_tokens == 4096  # max_position_embeddings
    assert info.throughput_tps_estimate > 0
    assert info.model_load_time_ms >= 0
    assert info.model_hash is not None and info.model_hash.startswith("sha256:")
    assert await engine.load() is info  # idempotent


async def test_usage_counts_and_text(engine: MlxEngine, hf_tokenizer: Any) -> None:
    content = "Count my tokens, please: one two three."
    batches = await collect(engine, chat(content, max_tokens=24), request_id="usage")
    stats = engine.last_stats["usage"]
    last = batches[-1]
    assert last.finish_reason == "length"
    assert all(b.finish_reason is None for b in batches[:-1])
    assert last.prompt_tokens == len(template_ids(hf_tokenizer, content))
    assert last.completion_tokens == len(stats.token_ids) == 24
    # Running counts never go down and the text is the detokenized tokens.
    counts = [b.completion_tokens for b in batches]
    assert counts == sorted(counts)
    assert text_of(batches) == detokenize(engine, stats.token_ids)
    assert engine.count_tokens(chat(content)) == last.prompt_tokens


async def test_greedy_matches_mlx_lm_generate_step(
    engine: MlxEngine, tiny_model_dir: Path, hf_tokenizer: Any
) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    await collect(engine, chat(max_tokens=20), request_id="greedy")
    model, tokenizer = load(str(tiny_model_dir))
    mask = mx.zeros((model.args.vocab_size,))
    mask[mx.array(sorted(tokenizer.eos_token_ids))] = -float("inf")
    prompt = mx.array(template_ids(hf_tokenizer, "Hello there, how are you?"))
    expected = [
        token
        for token, _ in generate_step(
            prompt, model, max_tokens=20, sampler=lambda lp: mx.argmax(lp + mask, axis=-1)
        )
    ]
    assert engine.last_stats["greedy"].token_ids == expected


@pytest.mark.parametrize("limit", [1, 7, 50])
async def test_max_tokens_gives_length_with_exact_count(engine: MlxEngine, limit: int) -> None:
    batches = await collect(engine, chat(max_completion_tokens=limit))
    assert batches[-1].finish_reason == "length"
    assert batches[-1].completion_tokens == limit


async def test_default_max_tokens(make_engine: MakeEngine) -> None:
    engine = await make_engine(default_max_tokens=9, ignore_eos=True)
    batches = await collect(engine, chat())
    assert (batches[-1].finish_reason, batches[-1].completion_tokens) == ("length", 9)


async def test_eos_finishes_with_stop(make_engine: MakeEngine) -> None:
    """Without ignore_eos some seed samples EOS: finish "stop", EOS not counted."""
    engine = await make_engine(max_concurrency=1)
    eos = engine.tokenizer.eos_token_ids
    for seed in range(40):
        rid = f"eos-{seed}"
        batches = await collect(engine, chat(temperature=2.0, seed=seed, max_tokens=200), None, rid)
        if batches[-1].finish_reason == "stop":
            break
    else:
        pytest.fail("no seed sampled EOS")
    stats = engine.last_stats[rid]
    assert stats.decode_steps == stats.completion_tokens + 1  # the EOS step
    assert batches[-1].completion_tokens == stats.completion_tokens < 200
    assert not set(stats.token_ids) & set(eos)
    assert "<|im_end|>" not in text_of(batches) and "<|eos|>" not in text_of(batches)


async def test_context_exceeded_is_refused_before_any_batch(make_engine: MakeEngine) -> None:
    engine = await make_engine(max_context_tokens=64, ignore_eos=True)
    assert engine.info is not None and engine.info.max_context_tokens == 64
    long = "word " * 100
    prompt_tokens = engine.count_tokens(chat(long))
    assert prompt_tokens > 64
    with pytest.raises(EngineError) as caught:
        await collect(engine, chat(long, max_tokens=5))
    assert caught.value.status == "error_context_exceeded"
    assert f"prompt is {prompt_tokens} tokens" in str(caught.value)
    assert "64 tokens" in str(caught.value)
    assert engine.active == 0
    # A prompt that fits gets its completion clamped to the room left.
    short = "word " * 20
    room = 64 - engine.count_tokens(chat(short))
    batches = await collect(engine, chat(short, max_tokens=500))
    assert (batches[-1].finish_reason, batches[-1].completion_tokens) == ("length", room)


async def test_configured_context_is_capped_by_the_model(make_engine: MakeEngine) -> None:
    engine = await make_engine(max_context_tokens=1_000_000)
    assert engine.info is not None and engine.info.max_context_tokens == 4096


async def test_stop_string_from_produced_text(engine: MlxEngine) -> None:
    request = {"temperature": 1.0, "seed": 11, "max_tokens": 80}
    full = text_of(await collect(engine, chat(**request)))
    stop = full[40:44]
    assert len(stop) == 4 and stop.strip()
    cut = full.index(stop)
    batches = await collect(engine, chat(**request, stop=stop))
    text = text_of(batches)
    assert text == full[:cut]
    assert stop not in text
    assert batches[-1].finish_reason == "stop"
    assert batches[-1].completion_tokens < 80


async def test_stop_string_spanning_two_tokens(engine: MlxEngine) -> None:
    request = {"temperature": 1.0, "seed": 5, "max_tokens": 80}
    full = text_of(await collect(engine, chat(**request), request_id="span-full"))
    tokens = engine.last_stats["span-full"].token_ids
    for k in range(10, 70):
        end = len(detokenize(engine, tokens[:k]))  # a token boundary in the text
        stop = full[end - 2 : end + 2]
        if len(stop) == 4 and "\ufffd" not in stop and full.index(stop) == end - 2:
            break
    else:
        pytest.fail("no usable token boundary")
    batches = await collect(engine, chat(**request, stop=["never-there", stop]), None, "span")
    assert text_of(batches) == full[: end - 2]
    assert batches[-1].finish_reason == "stop"
    # Generation ends with the token that completed the stop string.
    streaming = engine.tokenizer.detokenizer
    needed = 0
    while len(streaming.text) < end + 2:
        streaming.add_token(tokens[needed])
        needed += 1
    assert needed > k
    assert batches[-1].completion_tokens == needed


async def test_seed_determinism(engine: MlxEngine) -> None:
    def request(seed: int) -> Any:
        return chat(temperature=1.0, seed=seed, max_tokens=40)

    first = text_of(await collect(engine, request(1)))
    again = text_of(await collect(engine, request(1)))
    other = text_of(await collect(engine, request(2)))
    assert first == again
    assert first != other


async def test_top_p_and_temperature_are_used(engine: MlxEngine) -> None:
    greedy = text_of(await collect(engine, chat(max_tokens=40)))
    assert greedy == text_of(await collect(engine, chat(max_tokens=40, temperature=0)))
    sampled = text_of(await collect(engine, chat(max_tokens=40, temperature=1.0, seed=3)))
    nucleus = text_of(
        await collect(engine, chat(max_tokens=40, temperature=1.0, seed=3, top_p=0.1))
    )
    assert sampled != greedy
    assert nucleus != sampled


async def test_generate_before_load_and_after_close(tiny_model_dir: Path) -> None:
    engine = MlxEngine(tiny_model_dir)
    assert engine.info is None and not engine.loading
    with pytest.raises(EngineError) as caught:
        await collect(engine, chat())
    assert caught.value.status == "error_model_not_loaded"
    await engine.load()
    await engine.close()
    with pytest.raises(EngineError) as caught:
        await collect(engine, chat())
    assert caught.value.status == "error_model_not_loaded"


async def test_load_failure_raises_engine_error(tmp_path: Path) -> None:
    engine = MlxEngine(tmp_path)  # exists, but holds no model
    with pytest.raises(EngineError) as caught:
        await engine.load()
    assert caught.value.status == "error_model_not_loaded"
    assert not engine.loading and engine.info is None
    await engine.close()


async def test_warm_up_runs_without_a_slot(engine: MlxEngine) -> None:
    before = len(engine.last_stats)
    await engine.warm_up()
    stats = list(engine.last_stats.values())[-1]
    assert len(engine.last_stats) == before + 1
    assert stats.request_id.startswith("warm-up")
    assert stats.finish_reason == "length" and stats.completion_tokens == 4
    assert engine.active == 0


async def test_developer_role_and_content_parts(engine: MlxEngine, hf_tokenizer: Any) -> None:
    from provider.openai.request import ChatCompletionRequest, ChatMessage, ContentPart

    request = ChatCompletionRequest(
        messages=[
            ChatMessage(role="developer", content="Be brief."),
            ChatMessage(
                role="user",
                content=[ContentPart(type="text", text=t) for t in ("Hi ", "you")],
            ),
        ],
        max_tokens=3,
    )
    expected = hf_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi you"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    batches = await collect(engine, request, threading.Event())
    assert batches[-1].prompt_tokens == len(expected)


def test_ignore_eos_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLX_ENGINE_IGNORE_EOS", "1")
    assert MlxEngine(tmp_path).ignore_eos
    assert not MlxEngine(tmp_path, ignore_eos=False).ignore_eos
    monkeypatch.delenv("MLX_ENGINE_IGNORE_EOS")
    assert not MlxEngine(tmp_path).ignore_eos
