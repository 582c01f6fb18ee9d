"""Small helpers shared by the engine tests."""

from __future__ import annotations

import threading
from typing import Any

from provider.engine import TokenBatch
from provider.engine.mlx import MlxEngine
from provider.openai.request import ChatCompletionRequest, ChatMessage


def chat(content: str = "Hello there, how are you?", **fields: Any) -> ChatCompletionRequest:
    """A one-message chat request."""
    return ChatCompletionRequest(messages=[ChatMessage(role="user", content=content)], **fields)


async def collect(
    engine: MlxEngine,
    request: ChatCompletionRequest,
    cancel: threading.Event | None = None,
    request_id: str | None = None,
) -> list[TokenBatch]:
    """Every batch of one generation."""
    cancel = cancel or threading.Event()
    return [b async for b in engine.generate(request, cancel, request_id=request_id)]


def text_of(batches: list[TokenBatch]) -> str:
    return "".join(b.text for b in batches)

