"""Fixtures for the service-layer tests: fake macOS tools on PATH, clean logging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.service.helpers import FakeBin


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBin:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return FakeBin(bin_dir)
