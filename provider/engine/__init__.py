"""The inference engine interface the session talks to.

The session never imports MLX: it holds an :class:`Engine` and drives it with
:meth:`Engine.generate`. The MLX implementation is :mod:`provider.engine.mlx`
(:class:`~provider.engine.mlx.MlxEngine`); tests may use any object with the
same shape.

Contract of :meth:`Engine.generate`:

- It returns an async iterator of :class:`TokenBatch`. Each batch holds the
  text produced since the previous batch (stop strings already cut out) and
  running token counts. The last batch has ``finish_reason`` set and exact
  usage; the iterator then ends.
- ``cancel`` is a :class:`threading.Event` the generation thread checks on
  every decode step and between prefill chunks. Once it is set, the iterator
  yields one last batch with ``finish_reason="cancelled"`` and the partial
  usage (within one step, or one prefill chunk: about ``prefill_slice_ms``),
  and ends.
- A request the engine cannot serve raises :class:`EngineError` carrying the
  ``inference_response_end`` status and a buyer-facing message, before or
  instead of any batch (e.g. ``error_context_exceeded``).
- Leaving the iterator early (``aclose()``, task cancellation) sets ``cancel``
  and frees the engine's slot.
- ``conversation_key`` (keyword, optional) is the coordinator's hint that
  requests belong to one conversation. An engine may use it to decide what to
  keep cached; it must never make one request see another's data beyond what
  identical token prefixes give (a prefix cache is keyed by tokens alone).
  Callers pass it only when they have one, so engines without caches need
  not accept it.
- Every batch carries ``cached_tokens``: how many prompt tokens came from a
  prefix cache instead of being prefilled (OpenAI's
  ``usage.prompt_tokens_details.cached_tokens``).

:meth:`Engine.estimated_wait_ms` and :meth:`Engine.memory_status` tell the
session and the status page how loaded the engine is.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from provider.openai.request import ChatCompletionRequest
from provider.openai.response import FinishReason, TokenLogprob, ToolCallOut

#: The ``inference_response_end`` statuses an engine may end a request with
#: (besides ``complete`` and ``cancelled``, which come as a finish reason).
EngineStatus = Literal[
    "error_queue_full",
    "error_context_exceeded",
    "error_model_not_loaded",
    "error_internal",
    "provider_timeout",
]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the provider announces about its model in hello and heartbeats."""

    model_id: str
    model_params_b: float
    max_context_tokens: int
    model_load_time_ms: int
    throughput_tps_estimate: float
    model_hash: str | None = None


@dataclass(slots=True)
class TokenBatch:
    """Output of one hand-off from the generation thread to the event loop.

    ``text`` is answer content; ``reasoning`` a thinking model's reasoning;
    ``tool_calls`` the calls completed in this batch (finish reason
    ``tool_calls`` when any were made); ``logprobs`` one entry per completion
    token counted in this batch, when the request asked for them (else None).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class MemoryStatus:
    """The engine's KV memory and prefix cache, for ``status`` and ``/metrics``.

    ``budget_bytes`` bounds the KV caches of running requests (each reserved
    at its whole context: prompt plus completion limit) plus the prefix
    cache; ``reserved_bytes`` is what running requests hold now, and
    ``waiting_for_memory`` how many admitted requests wait for it. The
    ``prompt_cache_*`` fields describe the prefix cache: its bytes, its own
    cap (it also yields to running requests), entries, lookups, hits (a
    lookup that reused at least one token), and prompt tokens looked up and
    reused.
    """

    budget_bytes: int
    reserved_bytes: int
    waiting_for_memory: int
    kv_bytes_per_token: float
    prompt_cache_bytes: int
    prompt_cache_max_bytes: int
    prompt_cache_entries: int
    prompt_cache_lookups: int
    prompt_cache_hits: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def hit_rate(self) -> float:
        """Lookups that reused something, over all lookups (0 before any)."""
        lookups = self.prompt_cache_lookups
        return self.prompt_cache_hits / lookups if lookups else 0.0

    @property
    def token_hit_rate(self) -> float:
        """Prompt tokens reused, over prompt tokens looked up (0 before any)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class EngineTimings:
    """What the engine measures of its own pace, for ``status`` and ``/metrics``.

    Inter-token latency is the time between two consecutive tokens of one
    request, as the generation thread samples them, over the latest gaps of
    all requests (``inter_token_samples`` of them; ``None`` before any).
    ``prefill_slice_s`` is the time budget of one prefill chunk (``None``:
    chunks are a fixed ``prefill_step_size``); ``prefill_chunk_tokens`` is
    the size of the latest chunk and ``prefill_tokens_per_s`` the prefill
    speed measured on it (``None`` before the first).
    """

    inter_token_p50_s: float | None = None
    inter_token_p99_s: float | None = None
    inter_token_max_s: float | None = None
    inter_token_samples: int = 0
    prefill_slice_s: float | None = None
    prefill_chunk_tokens: int | None = None
    prefill_tokens_per_s: float | None = None


class EngineError(Exception):
    """A request the engine will not or cannot complete.

    ``status`` is the ``inference_response_end`` status, ``str(exc)`` is the
    message a buyer can act on.
    """

    def __init__(self, status: EngineStatus, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.status: EngineStatus = status
        self.retryable = retryable


@runtime_checkable
class Engine(Protocol):
    @property
    def info(self) -> ModelInfo | None:
        """Model facts, or ``None`` until :meth:`load` has finished."""
        ...

    @property
    def loading(self) -> bool:
        """True while :meth:`load` runs (heartbeats then carry ``loading``)."""
        ...

    async def load(self) -> ModelInfo:
        """Load the model and measure throughput; idempotent."""
        ...

    def generate(
        self, request: ChatCompletionRequest, cancel: threading.Event
    ) -> AsyncIterator[TokenBatch]:
        """Run one chat completion; see the module docstring for the contract."""
        ...

    def estimated_wait_ms(self, context_tokens: int) -> int:
        """How long a new request of ``context_tokens`` (prompt plus completion) would
        wait now before its prefill starts: for a slot, for memory, for prompts ahead."""
        ...

    def memory_status(self) -> MemoryStatus | None:
        """KV memory and prefix cache figures, or ``None`` when the engine has none."""
        ...

    async def warm_up(self) -> None:
        """Run a tiny generation without taking a request slot (``warm_up`` message)."""
        ...

    def timings(self) -> EngineTimings:
        """Inter-token latency and prefill pacing as measured so far (cheap; from the loop)."""
        ...

    async def close(self) -> None:
        """Stop the generation thread; in-flight requests end cancelled."""
        ...
