"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest


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
