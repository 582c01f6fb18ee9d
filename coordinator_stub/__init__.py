"""A faithful stand-in for the real coordinator, for tests, demos and benchmarks.

It speaks the provider protocol on ``/ws/provider`` (WebSocket) with the real
coordinator's hostile timers, and serves an OpenAI-compatible buyer API over
HTTP. Start it with :class:`CoordinatorStub` or the ``coordinator-stub``
command.
"""

from .app import CoordinatorStub
from .config import WS_PATH, StubConfig
from .observe import FrameRecord, RejectRecord
from .pool import DropRecord, ProviderRecord, RemovalRecord

__all__ = [
    "WS_PATH",
    "CoordinatorStub",
    "DropRecord",
    "FrameRecord",
    "ProviderRecord",
    "RejectRecord",
    "RemovalRecord",
    "StubConfig",
]
