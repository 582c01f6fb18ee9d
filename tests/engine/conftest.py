"""Fixtures for engine tests: a tiny random-weight model built once per session.

- ``tiny_model_dir``: the model directory (built with
  :func:`provider.testing.model.build_test_model`, size ``tiny``, seed 0).
- ``hf_tokenizer``: the model's tokenizer loaded with transformers directly,
  independent of the engine, for counting prompt tokens.
- ``make_engine``: ``await make_engine(**options)`` returns a loaded
  :class:`~provider.engine.mlx.MlxEngine` on the tiny model (recording token
  ids unless told otherwise); every engine made is closed when the test ends.
- ``engine`` / ``batch_engine``: loaded engines with ``max_concurrency`` 1 and
  4, both with ``ignore_eos=True`` so lengths are exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from provider.engine.mlx import MlxEngine
from provider.testing.model import build_test_model

MakeEngine = Callable[..., Awaitable[MlxEngine]]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
async def make_engine(tiny_model_dir: Path) -> AsyncIterator[MakeEngine]:
    engines: list[MlxEngine] = []

    async def make(**options: Any) -> MlxEngine:
        options.setdefault("record_token_ids", True)
        engine = MlxEngine(tiny_model_dir, **options)
        engines.append(engine)
        await engine.load()
        return engine

    yield make
    for engine in engines:
        await engine.close()


@pytest.fixture
async def engine(make_engine: MakeEngine) -> MlxEngine:
    return await make_engine(max_concurrency=1, ignore_eos=True)


@pytest.fixture
async def batch_engine(make_engine: MakeEngine) -> MlxEngine:
    return await make_engine(max_concurrency=4, ignore_eos=True)
