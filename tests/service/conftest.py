"""Fixtures for the service-layer tests: fake macOS tools on PATH, clean logging."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from provider.logs import LOGGER_NAME
from tests.service.helpers import FakeBin


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBin:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return FakeBin(bin_dir)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # setup_logging changes process-wide state; give the next test (ours or
    # anyone's, caplog included) the loggers as they were.
    loggers = [logging.getLogger(n) for n in (LOGGER_NAME, "websockets", "aiohttp", "asyncio")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
