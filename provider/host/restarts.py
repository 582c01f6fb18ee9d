"""How many times this provider has started before: ``restart_count``.

Like the official provider's stats store, each process start is counted in a
small JSON file next to the config (``state.json``: ``provider_id``,
``starts``, ``last_start_unix``); the restart count is the number of earlier
starts of the same ``provider_id`` (0 on the first start, or when the file is
missing, unreadable or names another provider). The file is replaced
atomically, mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("mlx_provider.host")

STATE_FILE = "state.json"


def record_start(path: Path, provider_id: str, *, now: float | None = None) -> int:
    """Count one start of ``provider_id`` in ``path``; return the starts before it."""
    previous = 0
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("provider_id") == provider_id:
            starts = data.get("starts")
            previous = starts if isinstance(starts, int) and starts > 0 else 0
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("restart counter %s unreadable (%s); starting again from 0", path, exc)
    record = {
        "provider_id": provider_id,
        "starts": previous + 1,
        "last_start_unix": round(time.time() if now is None else now, 3),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                json.dump(record, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("restart counter %s not written: %s", path, exc)
    return previous
