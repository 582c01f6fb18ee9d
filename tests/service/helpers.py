"""Helpers for the service-layer tests: fake executables, polling."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path


class FakeBin:
    """A directory first on PATH where tests drop fake executables."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, name: str, script: str) -> Path:
        exe = self.path / name
        exe.write_text(script)
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return exe

    def recorder(self, name: str, *, body: str = "exit 0") -> Path:
        """A fake that appends its argv (tab-separated, one call a line) to <name>.calls."""
        calls = self.path / f"{name}.calls"
        self.add(
            name,
            "#!/bin/sh\n"
            f'for a in "$@"; do printf "%s\\t" "$a" >> "{calls}"; done\n'
            f'printf "\\n" >> "{calls}"\n'
            f"{body}\n",
        )
        return calls


def read_calls(calls: Path) -> list[list[str]]:
    """The argv of each call a recorder fake saw, in order."""
    if not calls.exists():
        return []
    return [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll for something another process does; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
