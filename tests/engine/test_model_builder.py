"""provider.testing.model: the random-weight model directory and its CLI subcommand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from provider.testing.model import build_test_model, register


def test_make_test_model_subcommand_writes_a_quantized_model(tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import get_total_parameters

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["make-test-model", str(tmp_path / "q"), "--quantize", "--seed", "3"])
    assert args.size == "tiny"
    assert args.func(args) == 0

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    weights = mx.load(str(tmp_path / "q" / "model.safetensors"))
    scales = [v for k, v in weights.items() if k.endswith(".scales")]
    assert scales and all(s.dtype == mx.float32 for s in scales)

    model, tokenizer = load(str(tmp_path / "q"))
    assert get_total_parameters(model) == 557_696  # logical, as unquantized
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert len(list(generate_step(mx.array(prompt), model, max_tokens=3))) == 3


def test_same_seed_same_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_test_model(tmp_path / "again", size="tiny", seed=0)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
